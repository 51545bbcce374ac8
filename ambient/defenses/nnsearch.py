"""Sub-quadratic candidate search for `dedup=near` (`dedup.search=index`): a nearest-neighbour index
over compact descriptors, then the exact near-duplicate distance on the candidates only.

    pip install 'ambient[dedup]'      # faiss-cpu; without it `flat` falls back to a torch matmul

1. Descriptors: the cell-mean features of neardup.bound_features at shift 0 (8x8 cells per channel,
   weighted so that their l2 is a lower bound of the unshifted tiled distance), computed `chunk`
   images at a time from the uint8 images: the float dataset is never held.
2. Candidates: each image's `neighbours` nearest descriptors (faiss HNSW, or a flat exact index),
   and the SHIFTED_NEIGHBOURS nearest of the image moved by each shift (a shifted copy is often not
   among the unshifted k nearest).
3. Pruning: neardup's exact lower bound (per-shift cell means) drops candidates that cannot be
   within the threshold; the exact distance (min over shifts) is computed on the rest only, chunk
   by chunk, preprocessed from uint8.

What it can miss: a pair within the threshold that is not among either image's k nearest by the
descriptor, unshifted or shifted (e.g. a copy in a cluster of more than k near copies). The benchmark
(benchmarks/dedup.py) measures its recall against the exact all-pairs search.
Memory: uint8 images + descriptors (N x 64C float32) + the index (HNSW: ~N x (64C + 2M) x 4 bytes).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ambient.config import DEDUP_INDEXES
import torch.nn.functional as F

from ambient.defenses.neardup import TILES, overlap_windows, pair_distances, preprocess, shifts, window_features


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
    n, tiles = images_uint8.shape[0], TILES[metric]
    found, built = knn(desc, neighbours + 1, index)
    # A shifted copy is often not among the k nearest of its original (65% at k=16 on Fashion-MNIST):
    # the original moved by each shift asks for its SHIFTED_NEIGHBOURS nearest too.
    extra = [knn(desc, SHIFTED_NEIGHBOURS, index, queries=_shifted_descriptors(images_uint8, dy, dx, tiles, blur,
                                                                              resolution, chunk), built=built)[0]
             for dy, dx in shifts(max_shift) if (dy, dx) != (0, 0)]
    a, b = _candidates(np.concatenate([found, *extra], 1), n)
    i, j = _prune(images_uint8, a, b, threshold, tiles, max_shift, blur, resolution, chunk)
    d = _exact(images_uint8, i, j, tiles, max_shift, blur, resolution, chunk, progress)
    keep = d <= threshold
    return i[keep], j[keep], d[keep]


SHIFTED_NEIGHBOURS = 4


def _shifted_descriptors(images_uint8, dy, dx, tiles, blur, resolution, chunk) -> torch.Tensor:
    """Descriptors of the images moved by (dy, dx) pixels (edges repeated), chunk by chunk."""
    out = []
    for s in range(0, images_uint8.shape[0], chunk):
        x = preprocess(images_uint8[s:s + chunk], resolution, blur)
        p = max(abs(dy), abs(dx))
        x = torch.roll(F.pad(x, (p, p, p, p), mode="replicate"), (dy, dx), (2, 3))[..., p:-p, p:-p]
        out.append(window_features(x, tiles, [(0, x.shape[-2], 0, x.shape[-1])])[0])
    return torch.cat(out)


def _candidates(found: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered candidate pairs (i < j), each once, from rows of neighbour lists (-1 = none)."""
    a = np.repeat(np.arange(found.shape[0]), found.shape[1])
    b = found.reshape(-1)
    ok = (b >= 0) & (a != b)
    key = np.unique(np.minimum(a[ok], b[ok]).astype(np.int64) * n + np.maximum(a[ok], b[ok]))
    return key // n, key % n


def _prune(images_uint8, a, b, threshold, tiles, max_shift, blur, resolution, chunk):
    """The candidate pairs whose lower bound (neardup's per-shift cell means) admits the threshold:
    exact, nothing within the threshold is dropped. Memory: two (N, 64C) feature sets at a time."""
    limit = (threshold * (1 + 1e-4) + 1e-6) ** 2
    best = torch.full((len(a),), float("inf"))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    for dy, dx in shifts(max_shift):
        fa, fb = [], []
        for s in range(0, images_uint8.shape[0], chunk):
            x = preprocess(images_uint8[s:s + chunk], resolution, blur)
            a_s, b_s = window_features(x, tiles, list(overlap_windows(*x.shape[-2:], dy, dx)))
            fa.append(a_s)
            fb.append(b_s)
        fa, fb = torch.cat(fa), torch.cat(fb)
        for s in range(0, len(a), 1 << 20):
            sq = (fa[ta[s:s + (1 << 20)]] - fb[tb[s:s + (1 << 20)]]).pow(2).sum(1)
            best[s:s + (1 << 20)] = torch.minimum(best[s:s + (1 << 20)], sq)
    keep = (best <= limit).numpy()
    return a[keep], b[keep]


def _exact(images_uint8, i, j, tiles, max_shift, blur, resolution, chunk, progress) -> np.ndarray:
    """The near-duplicate distance of pairs (i, j), preprocessed from uint8 chunk by chunk."""
    out = [np.zeros(0)]
    for s in tqdm(range(0, len(i), chunk), desc="near duplicates (candidates)", disable=not progress):
        pa, pb = torch.from_numpy(i[s:s + chunk]), torch.from_numpy(j[s:s + chunk])
        x = preprocess(torch.cat([images_uint8[pa], images_uint8[pb]]), resolution, blur)
        out.append(pair_distances(x, range(len(pa)), range(len(pa), 2 * len(pa)), tiles, max_shift).numpy())
    return np.concatenate(out).astype(np.float64)
