"""Clique filter of the extraction attack (Carlini et al. 2023, Sec. 4.2).

Generations of ONE prompt (or of an unconditional model) that a model has memorized come out
nearly identical many times. Link two generations when their tiled l2 is below
`edge_threshold` (not published; reimplementations use 0.1) and flag every group of at least
`min_clique` (10) mutually linked generations.

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

from ambient.attack.distances import DEFAULT_BLOCK_SIZE, tiled_l2

METHODS = ("auto", "networkx", "greedy")


# Carlini et al. 2023, Sec. 4.2: one flagged group of near-identical generations.
@dataclass(frozen=True)
class Clique:
    members: tuple[int, ...]  # generation indices, ascending
    mean_distance: float  # mean tiled l2 over all member pairs
    medoid: int  # member with the smallest mean distance to the other members

    def __len__(self) -> int:
        return len(self.members)


def _make_clique(members, dist: np.ndarray) -> Clique:
    """Describe a member set by its mean internal distance and medoid."""
    members = np.sort(np.asarray(list(members), dtype=np.int64))
    sub = dist[np.ix_(members, members)]
    m = len(members)
    mean_distance = float(sub.sum() - np.trace(sub)) / (m * (m - 1))
    medoid = int(members[np.argmin(sub.sum(1))])
    return Clique(tuple(int(i) for i in members), mean_distance, medoid)


def _select_disjoint(candidates: list[set[int]], dist: np.ndarray, min_clique: int) -> list[Clique]:
    """Disjoint cliques out of overlapping maximal ones, largest (then tightest) first."""
    chosen: list[Clique] = []
    while candidates:
        scored = [_make_clique(c, dist) for c in candidates]
        best = min(scored, key=lambda c: (-len(c), c.mean_distance, c.members))
        chosen.append(best)
        taken = set(best.members)
        # A subset of a clique is still a clique, so trimming shared members keeps validity.
        candidates = [c - taken for c in candidates]
        candidates = [c for c in candidates if len(c) >= min_clique]
    return chosen


def _cliques_networkx(adj: np.ndarray, dist: np.ndarray, min_clique: int) -> list[Clique]:
    """Exact maximal cliques via Bron-Kerbosch (networkx) on the pruned graph."""
    import networkx as nx

    graph = nx.from_numpy_array(adj.astype(np.uint8))
    # Nodes of a k-clique have degree >= k - 1; the core drops all others up front.
    core = nx.k_core(graph, min_clique - 1)
    candidates = [set(c) for c in nx.find_cliques(core) if len(c) >= min_clique]
    return _select_disjoint(candidates, dist, min_clique)


def _cliques_greedy(adj: np.ndarray, dist: np.ndarray, min_clique: int) -> list[Clique]:
    """Polynomial fallback; grows one clique per high-degree seed."""
    alive = np.ones(len(adj), dtype=bool)
    chosen: list[Clique] = []
    while True:
        degree = (adj & alive[None, :]).sum(1) * alive
        seed = int(np.argmax(degree))
        if degree[seed] < min_clique - 1:
            return chosen
        neighbours = np.flatnonzero(adj[seed] & alive)
        members = [seed]
        for j in neighbours[np.argsort(dist[seed, neighbours], kind="stable")]:
            if adj[j, members].all():
                members.append(int(j))
        if len(members) >= min_clique:
            chosen.append(_make_clique(members, dist))
            alive[members] = False
        else:
            alive[seed] = False


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


# Carlini et al. 2023, Sec. 4.2: flag groups of >= min_clique generations linked pairwise by
# distance < edge_threshold, from a precomputed (N, N) distance matrix. Ranked by mean distance.
def cliques_from_distances(
    dist: Tensor | np.ndarray, edge_threshold: float = 0.1, min_clique: int = 10, method: str = "auto"
) -> list[Clique]:
    method = _resolve_method(method)
    if min_clique < 2:
        raise ValueError(f"min_clique must be >= 2, got {min_clique}")
    dist = dist.detach().cpu().double().numpy() if isinstance(dist, Tensor) else np.asarray(dist, float)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"need a square distance matrix, got shape {dist.shape}")
    adj = dist < edge_threshold
    np.fill_diagonal(adj, False)
    find = _cliques_networkx if method == "networkx" else _cliques_greedy
    return sorted(find(adj, dist, min_clique), key=lambda c: (c.mean_distance, c.members))


# Carlini et al. 2023, Sec. 4.2: the clique filter on generations (N, C, H, W) of one prompt.
def find_cliques(
    generations: Tensor,
    edge_threshold: float = 0.1,
    min_clique: int = 10,
    tiles: int = 4,
    method: str = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> list[Clique]:
    _resolve_method(method)  # fail on a bad name before the distance matrix is built
    with torch.no_grad():
        dist = tiled_l2(generations, generations, tiles=tiles, block_size=block_size, device=device)
    return cliques_from_distances(dist, edge_threshold, min_clique, method)
