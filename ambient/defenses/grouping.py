"""Duplicate groups from duplicate pairs, without chaining.

Connected components merge whatever a chain of close pairs links: on 50,000 Fashion-MNIST images
at threshold 0.06 one component held 572 images, most of them different items. So the default
(`dedup.grouping=kept`) is leader grouping: images are visited by priority (smallest stable
index first); an image not yet in a group keeps itself and takes every ungrouped image within the
threshold of it. Every member is then within the threshold of its group's kept image.
`pairwise` also requires every two members to be within it (complete linkage, greedy: candidates
join closest first). `connected` is the old connected components, for comparison.

Pairs under the threshold whose two images end up in different groups are "left out" and counted
in the report: they are what chaining would have merged.
"""
from __future__ import annotations

import numpy as np

from ambient.config import DEDUP_GROUPINGS


def components(n: int, i, j) -> list[np.ndarray]:
    """Connected components of the duplicate graph (union-find with path halving over the edges)."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(np.asarray(i).tolist(), np.asarray(j).tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    nodes = np.unique(np.r_[np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)])
    roots = np.array([root(a) for a in nodes.tolist()], dtype=np.int64)
    return _sorted_groups(nodes, roots)


def _sorted_groups(nodes: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """Nodes split by label, each group sorted; largest groups first, then by first node."""
    order = np.argsort(labels, kind="stable")
    groups = np.split(nodes[order], np.flatnonzero(np.diff(labels[order])) + 1) if len(nodes) else []
    return sorted((np.sort(g) for g in groups if len(g) > 1), key=lambda g: (-len(g), g[0]))


def leader_groups(n: int, i, j, d, priority=None, grouping: str = "kept") -> tuple[list[np.ndarray], np.ndarray]:
    """Groups of nodes 0..n-1 from pairs (i, j) at distance d, none chained (module doc), and the
    label of every node (its group's kept node; itself when alone). Priority: smaller keeps first.
    """
    if grouping not in DEDUP_GROUPINGS:
        raise ValueError(f"dedup.grouping={grouping!r}; allowed: {' | '.join(DEDUP_GROUPINGS)}")
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    d = np.asarray(d, dtype=np.float64)
    priority = np.arange(n) if priority is None else np.asarray(priority)
    label = np.arange(n)
    if grouping == "connected":
        groups = components(n, i, j)
        for g in groups:
            label[g] = g[np.argmin(priority[g])]
        return groups, label
    # Adjacency lists (both directions), each sorted by distance then priority: closest join first.
    a, b, dd = np.r_[i, j], np.r_[j, i], np.r_[d, d]
    order = np.lexsort((priority[b], dd, a))
    a, b = a[order], b[order]
    start = np.searchsorted(a, np.arange(n + 1))
    linked = set(zip(i.tolist(), j.tolist())) if grouping == "pairwise" else None
    grouped = np.zeros(n, dtype=bool)
    nodes = np.unique(a)
    for leader in nodes[np.argsort(priority[nodes], kind="stable")].tolist():
        if grouped[leader]:
            continue
        grouped[leader] = True
        members = [leader]
        for m in b[start[leader]:start[leader + 1]].tolist():
            if grouped[m]:
                continue
            if linked is not None and not all((m, o) in linked or (o, m) in linked for o in members[1:]):
                continue
            grouped[m] = True
            label[m] = leader
            members.append(m)
    touched = np.unique(np.r_[i, j])
    return _sorted_groups(touched, label[touched]), label


def left_out(i, j, d, label, limit: int = 20) -> tuple[int, list[dict]]:
    """How many pairs under the threshold lie across two groups, and the closest `limit` of them."""
    i, j, d = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64), np.asarray(d, dtype=np.float64)
    across = np.flatnonzero(label[i] != label[j])
    closest = across[np.argsort(d[across], kind="stable")[:limit]]
    return len(across), [{"rows": [int(i[k]), int(j[k])], "distance": round(float(d[k]), 5)} for k in closest]
