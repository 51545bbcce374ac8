"""Sub-quadratic candidate search for `dedup=near` (`dedup.search=index`): a nearest-neighbour index
over compact descriptors, then the exact near-duplicate distance on the candidates only.

    pip install 'ambient[dedup]'      # faiss-cpu; without it `flat` falls back to a torch matmul

1. Descriptors: the cell-mean features of neardup.bound_features at shift 0 (8x8 cells per channel,
   weighted so that their l2 is a lower bound of the unshifted tiled distance), computed `chunk`
   images at a time from the uint8 images: the float dataset is never held.
2. Candidates: each image's `neighbours` nearest descriptors (faiss HNSW, or a flat exact index).
   An image whose every candidate turns out to be a duplicate is asked again for 4x as many (one
   round), so a large cluster of near copies is not cut at k.
3. Verification: the exact distance (min over shifts) on candidate pairs, chunk by chunk, again
   preprocessed from uint8.

What it can miss: a pair within the threshold that is not among either image's k nearest by the
unshifted descriptor (a shifted copy among many closer distinct images). The benchmark
(benchmarks/dedup.py) measures its recall against the exact all-pairs search.
Memory: uint8 images + descriptors (N x 64C float32) + the index (HNSW: ~N x (64C + 2M) x 4 bytes).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ambient.config import DEDUP_INDEXES
from ambient.defenses.neardup import TILES, pair_distances, preprocess


def knn(desc: torch.Tensor, k: int, index: str = "hnsw", queries: torch.Tensor | None = None,
        built=None) -> tuple[np.ndarray, object]:
    """(Q, k) nearest rows of desc to each query (default: every row, itself included) and the index."""
    if index not in DEDUP_INDEXES:
        raise ValueError(f"dedup.index={index!r}; allowed: {' | '.join(DEDUP_INDEXES)}")
    q = (desc if queries is None else queries).numpy().astype(np.float32)
    k = min(k, desc.shape[0])
    try:
        import faiss
    except ImportError:
        if index != "flat":
            raise ImportError("dedup.search=index with dedup.index=hnsw needs faiss: pip install 'ambient[dedup]' "
                              "(or dedup.index=flat, exact, no faiss)") from None
        from ambient.defenses.calibrate import nearest_candidates

        return nearest_candidates(torch.from_numpy(q), desc, k + 1)[:, :k].numpy(), None
    if built is None:
        base = np.ascontiguousarray(desc.numpy().astype(np.float32))
        if index == "flat":
            built = faiss.IndexFlatL2(base.shape[1])
        else:
            built = faiss.IndexHNSWFlat(base.shape[1], 32)
            built.hnsw.efConstruction = 64
        built.add(base)
    if index == "hnsw":
        built.hnsw.efSearch = max(64, 2 * k)
    _, found = built.search(np.ascontiguousarray(q), k)
    return found, built


def index_pairs(images_uint8: torch.Tensor, threshold: float, desc: torch.Tensor, metric: str = "tiled",
                max_shift: int = 1, blur: int = 3, resolution: int = 32, neighbours: int = 16,
                index: str = "hnsw", chunk: int = 8192, progress: bool = False
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j within threshold among the candidates (module doc), as (i, j, distance)."""
    n = images_uint8.shape[0]
    found, built = knn(desc, neighbours + 1, index)
    i, j, d = _verify(images_uint8, found, threshold, metric, max_shift, blur, resolution, chunk, progress)
    # Rows whose every candidate was a duplicate: ask again, 4x as deep (one round).
    full = np.flatnonzero(np.bincount(np.r_[i, j], minlength=n) >= neighbours)
    if len(full) and neighbours * 4 < n:
        more, _ = knn(desc, neighbours * 4 + 1, index, queries=desc[torch.from_numpy(full)], built=built)
        rows = np.full((n, more.shape[1]), -1)
        rows[full] = more
        i2, j2, d2 = _verify(images_uint8, rows, threshold, metric, max_shift, blur, resolution, chunk, progress)
        i, j, d = np.r_[i, i2], np.r_[j, j2], np.r_[d, d2]
        key = np.unique(i * n + j, return_index=True)[1]
        i, j, d = i[key], j[key], d[key]
    return i, j, d


def _verify(images_uint8, found, threshold, metric, max_shift, blur, resolution, chunk, progress):
    """Exact distances of the candidate pairs (each unordered pair once), those within threshold."""
    n = images_uint8.shape[0]
    a = np.repeat(np.arange(found.shape[0]), found.shape[1])
    b = found.reshape(-1)
    ok = (b >= 0) & (a != b)
    a, b = np.minimum(a[ok], b[ok]), np.maximum(a[ok], b[ok])
    key = np.unique(a.astype(np.int64) * n + b)
    a, b = key // n, key % n
    out = [np.zeros(0, np.int64)] * 2 + [np.zeros(0)]
    hits = []
    for s in tqdm(range(0, len(a), chunk), desc="near duplicates (candidates)", disable=not progress):
        pa, pb = a[s:s + chunk], b[s:s + chunk]
        x = preprocess(torch.cat([images_uint8[torch.from_numpy(pa)], images_uint8[torch.from_numpy(pb)]]),
                       resolution, blur)
        dist = pair_distances(x, range(len(pa)), range(len(pa), 2 * len(pa)), TILES[metric], max_shift).numpy()
        keep = dist <= threshold
        hits.append((pa[keep], pb[keep], dist[keep].astype(np.float64)))
    return tuple(np.concatenate(p) for p in zip(*hits)) if hits else tuple(out)
