"""Clique filter of the extraction attack (Carlini et al. 2023, Sec. 4.2).

Generations of ONE prompt (or of an unconditional model) that a model has memorized come out
nearly identical many times. Link two generations when their tiled l2 is below
`edge_threshold` (not published; reimplementations use 0.1) and flag every group of at least
`min_clique` (10) mutually linked generations. The graph is kept as its edges only (found block
pair by block pair, streaming.stream_tiled_edges), never as an N x N matrix.

Two clique finders:
- "networkx" (default when networkx imports): exact maximal cliques (Bron-Kerbosch, via
  `networkx.find_cliques`) on the (min_clique - 1)-core of the graph, then a greedy choice of
  disjoint cliques, largest first (ties: smaller mean distance first). Worst case is
  exponential, but memorized copies form near-disjoint dense blobs, and the k-core prunes the
  sparse rest.
- "greedy" (fallback): seed at the highest-degree node, grow by adding the seed's neighbours in
  order of distance to the seed when they link to every member. Polynomial, may miss cliques.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ambient.attack.streaming import FILTER_BLOCK_SIZE, ImageSource, stream_tiled_edges

METHODS = ("auto", "networkx", "greedy")


# Carlini et al. 2023, Sec. 4.2: one flagged group of near-identical generations.
@dataclass(frozen=True)
class Clique:
    members: tuple[int, ...]  # generation indices, ascending
    mean_distance: float  # mean tiled l2 over all member pairs
    medoid: int  # member with the smallest mean distance to the other members

    def __len__(self) -> int:
        return len(self.members)


Graph = dict[int, dict[int, float]]  # node -> {neighbour: tiled l2}; only nodes with an edge


def _graph(i, j, d) -> Graph:
    """Symmetric adjacency with distances from an edge list (i, j, distance)."""
    graph: Graph = {}
    for a, b, w in zip(np.asarray(i).tolist(), np.asarray(j).tolist(), np.asarray(d, dtype=float).tolist()):
        graph.setdefault(a, {})[b] = w
        graph.setdefault(b, {})[a] = w
    return graph


def _make_clique(members, graph: Graph) -> Clique:
    """Describe a member set by its mean internal distance and medoid."""
    members = sorted(int(m) for m in members)
    sums = [sum(graph[a][b] for b in members if b != a) for a in members]
    m = len(members)
    mean_distance = sum(sums) / (m * (m - 1))
    medoid = members[int(np.argmin(sums))]
    return Clique(tuple(members), mean_distance, medoid)


def _select_disjoint(candidates: list[set[int]], graph: Graph, min_clique: int) -> list[Clique]:
    """Disjoint cliques out of overlapping maximal ones, largest (then tightest) first."""
    chosen: list[Clique] = []
    while candidates:
        scored = [_make_clique(c, graph) for c in candidates]
        best = min(scored, key=lambda c: (-len(c), c.mean_distance, c.members))
        chosen.append(best)
        taken = set(best.members)
        # A subset of a clique is still a clique, so trimming shared members keeps validity.
        candidates = [c - taken for c in candidates]
        candidates = [c for c in candidates if len(c) >= min_clique]
    return chosen


def _cliques_networkx(graph: Graph, min_clique: int) -> list[Clique]:
    """Exact maximal cliques via Bron-Kerbosch (networkx) on the pruned graph."""
    import networkx as nx

    g = nx.Graph()
    g.add_edges_from((a, b) for a, nbrs in graph.items() for b in nbrs if a < b)
    # Nodes of a k-clique have degree >= k - 1; the core drops all others up front.
    core = nx.k_core(g, min_clique - 1)
    candidates = [set(c) for c in nx.find_cliques(core) if len(c) >= min_clique]
    return _select_disjoint(candidates, graph, min_clique)


def _cliques_greedy(graph: Graph, min_clique: int) -> list[Clique]:
    """Polynomial fallback; grows one clique per high-degree seed."""
    alive = set(graph)
    chosen: list[Clique] = []
    while alive:
        degree = {v: sum(u in alive for u in graph[v]) for v in alive}
        seed = min(alive, key=lambda v: (-degree[v], v))  # highest degree, then lowest index
        if degree[seed] < min_clique - 1:
            return chosen
        neighbours = sorted((w, j) for j, w in graph[seed].items() if j in alive)
        members = [seed]
        for _, j in neighbours:
            if all(m in graph[j] for m in members):
                members.append(j)
        if len(members) >= min_clique:
            chosen.append(_make_clique(members, graph))
            alive -= set(members)
        else:
            alive.discard(seed)
    return chosen


def _resolve_method(method: str) -> str:
    """"auto" resolves to networkx when it imports, so results do not depend on luck."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    try:
        import networkx  # noqa: F401
    except ImportError:
        return "greedy"
    return "networkx"


# Carlini et al. 2023, Sec. 4.2: flag groups of >= min_clique generations linked pairwise, from the
# graph's edges (i, j, tiled l2), e.g. from stream_tiled_edges. Ranked by mean distance.
def cliques_from_edges(i, j, d, min_clique: int = 10, method: str = "auto") -> list[Clique]:
    method = _resolve_method(method)
    if min_clique < 2:
        raise ValueError(f"min_clique must be >= 2, got {min_clique}")
    graph = _graph(i, j, d)
    found = _cliques_networkx(graph, min_clique) if method == "networkx" else _cliques_greedy(graph, min_clique)
    return sorted(found, key=lambda c: (c.mean_distance, c.members))


# Carlini et al. 2023, Sec. 4.2: the same from a precomputed (N, N) distance matrix (symmetrized).
def cliques_from_distances(
    dist: Tensor | np.ndarray, edge_threshold: float = 0.1, min_clique: int = 10, method: str = "auto"
) -> list[Clique]:
    _resolve_method(method)
    dist = dist.detach().cpu().double().numpy() if isinstance(dist, Tensor) else np.asarray(dist, float)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"need a square distance matrix, got shape {dist.shape}")
    dist = (dist + dist.T) / 2
    i, j = np.nonzero(np.triu(dist < edge_threshold, 1))
    return cliques_from_edges(i, j, dist[i, j], min_clique, method)


# Carlini et al. 2023, Sec. 4.2: the clique filter on the generations (N, C, H, W) of one prompt, a
# tensor or a streaming.ImageSource (e.g. PngFiles); two blocks of images in memory at a time.
def find_cliques(
    generations: Tensor | ImageSource,
    edge_threshold: float = 0.1,
    min_clique: int = 10,
    tiles: int = 4,
    method: str = "auto",
    block_size: int = FILTER_BLOCK_SIZE,
    device=None,
) -> list[Clique]:
    _resolve_method(method)  # fail on a bad name before any distance is computed
    if min_clique < 2:
        raise ValueError(f"min_clique must be >= 2, got {min_clique}")
    with torch.no_grad():
        i, j, d = stream_tiled_edges(generations, edge_threshold, tiles, block_size, device)
    return cliques_from_edges(i, j, d, min_clique, method)
