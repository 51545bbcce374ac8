"""Sub-quadratic candidate search for `dedup=near` (`dedup.search=index`): a nearest-neighbour index
over compact descriptors, then the exact near-duplicate distance on the candidates only.

    pip install 'ambient[dedup]'      # faiss-cpu; without it `flat` falls back to a torch matmul

1. Descriptors: the cell-mean features of neardup.bound_features at shift 0 (8x8 cells per channel,
   weighted so that their l2 is a lower bound of the unshifted tiled distance), computed `chunk`
   images at a time from the uint8 images: the float dataset is never held.
2. Candidates: each image's `neighbours` nearest descriptors (faiss HNSW on the CPU; where faiss has a
   GPU build and sees a GPU, `auto` uses an exact flat index on the GPU(s) instead; or a flat exact index),
   and the SHIFTED_NEIGHBOURS nearest of the image moved by each shift of one half-plane (a shifted
   copy is often not among the unshifted k nearest; the other half is asked from the copy's side).
3. Pruning: neardup's exact lower bound (cell means, per shift and per blur-search variant: both
   images as they are, the first blurred, the second blurred; the whole-feature l2 over every pair, then
   the tighter tile-max bound, neardup.tile_bound_sq, on those it admits) drops candidates that cannot be within
   the threshold and records which (shift, variant) combinations can; the tiled distance is computed
   on the rest at those combinations only (the others exceed the threshold), chunk by chunk,
   preprocessed from uint8.

What it can miss: a pair within the threshold that is not among either image's k nearest by the
descriptor, unshifted or shifted (e.g. a copy in a cluster of more than k near copies). The benchmark
(benchmarks/dedup.py) measures its recall against the exact all-pairs search.
Memory: uint8 images + descriptors (N x 64C float32) + the index (HNSW: ~N x (64C + 2M) x 4 bytes)
+ candidate lists (N x 41 int64: 17 + 4 shifts x 6) + a (pairs x 27) bool of admitted combinations + at most PASS_MEMORY
of per-shift features (sharp and blurred windows).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ambient.config import DEDUP_INDEXES
from ambient.defenses.neardup import (
    LOWPASS,
    RESAMPLE,
    TILES,
    Filter,
    combo_distances,
    gaussian,
    overlap_windows,
    shifts,
    tile_bound_sq,
    window_features,
)


def knn(desc: torch.Tensor, k: int, index: str = "auto", queries: torch.Tensor | None = None,
        built=None) -> tuple[np.ndarray, object]:
    """(Q, k) nearest rows of desc to each query (default: every row, itself included) and the index."""
    if index not in DEDUP_INDEXES:
        raise ValueError(f"dedup.index={index!r}; allowed: {' | '.join(DEDUP_INDEXES)}")
    q = (desc if queries is None else queries).numpy().astype(np.float32)
    k = min(k, desc.shape[0])
    try:
        import faiss
    except ImportError:
        if index not in ("flat", "auto"):
            raise ImportError(f"dedup.search=index with dedup.index={index} needs faiss: pip install 'ambient[dedup]' "
                              "(or dedup.index=flat, exact, no faiss)") from None
        from ambient.defenses.calibrate import nearest_candidates

        return nearest_candidates(torch.from_numpy(q), desc, k + 1)[:, :k].numpy(), None
    index = resolve_index(index, faiss)
    if built is None:
        base = np.ascontiguousarray(desc.numpy().astype(np.float32))
        if index == "hnsw":
            built = faiss.IndexHNSWFlat(base.shape[1], HNSW_M)
            built.hnsw.efConstruction = EF_CONSTRUCTION
        else:
            built = faiss.IndexFlatL2(base.shape[1])
            if index == "gpu":  # exact k nearest by brute force on the GPU(s): faster than HNSW there, no misses
                built = faiss.index_cpu_to_all_gpus(built)
        built.add(base)
    if index == "hnsw":
        built.hnsw.efSearch = max(EF_SEARCH, 2 * k)
    _, found = built.search(np.ascontiguousarray(q), k)
    return found, built


def faiss_gpus(faiss) -> int:
    """GPUs faiss can use: 0 for the faiss-cpu wheel (no GPU build) or a machine without CUDA."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def resolve_index(index: str, faiss) -> str:
    """dedup.index as built: `auto` is `gpu` (faiss's exact flat index on the GPUs) where faiss has a GPU
    build and sees a GPU, else `hnsw`; `gpu` without one is an error naming the key."""
    if index == "auto":
        return "gpu" if faiss_gpus(faiss) > 0 else "hnsw"
    if index == "gpu" and faiss_gpus(faiss) == 0:
        raise RuntimeError("dedup.index=gpu needs faiss built with GPU support and a CUDA device (e.g. "
                           "pip install faiss-gpu-cu12 in place of faiss-cpu); faiss sees none here: use dedup.index=auto")
    return index


def index_pairs(images_uint8: torch.Tensor, threshold: float, desc: torch.Tensor, metric: str = "tiled",
                max_shift: int = 1, blur: int = 1, resolution: int = 32, neighbours: int = 16,
                index: str = "auto", chunk: int = 8192, progress: bool = False, lowpass: float = LOWPASS,
                resample: float = RESAMPLE, shard: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs i < j within threshold among the candidates (module doc), as (i, j, distance).
    shard=(k, K): only the candidate pairs with i % K == k are pruned and measured (every shard
    builds the same index and searches it; the pruning and exact distances, most of the cost, split)."""
    n, tiles, prep = images_uint8.shape[0], TILES[metric], Filter(resolution, blur, lowpass, resample)
    found, built = knn(desc, neighbours + 1, index)
    # A shifted copy is often not among the k nearest of its original (65% at k=16 on Fashion-MNIST):
    # the original moved by each shift asks for its SHIFTED_NEIGHBOURS nearest too.
    # Half the shifts suffice: a pair related by shift d is asked for from one image moved by d or from
    # the other moved by -d, and one of d, -d lies in the half-plane s > (0, 0).
    moved = [s for s in shifts(max_shift) if s > (0, 0)]
    extra = [knn(desc, SHIFTED_NEIGHBOURS, index, queries=q, built=built)[0]
             for _, (q,) in _shift_passes(images_uint8, moved, _moved_descriptors(tiles), 1, prep, chunk)]
    a, b = _candidates(np.concatenate([found, *extra], 1), n)
    mine = a % shard[1] == shard[0]
    a, b = a[mine], b[mine]
    i, j, admitted = _prune(images_uint8, a, b, threshold, tiles, max_shift, prep, chunk)
    d = _exact(images_uint8, i, j, admitted, tiles, max_shift, prep, chunk, progress)
    keep = d <= threshold
    return i[keep], j[keep], d[keep]


SHIFTED_NEIGHBOURS = 6  # half the shifts asked (at 20k: 4 and 6 both found all 407 pairs; 6 for margin)
HNSW_M, EF_CONSTRUCTION = 16, 40  # M 32 / efConstruction 64 found the same pairs at 20k, ~20% slower
EF_SEARCH = 16  # HNSW search breadth (at least 2k); 16 and 32 found the same 407 pairs at 20k
GATHER_BLOCK = 1 << 16  # pairs whose features are gathered at once for the tile-max bound
PASS_MEMORY = 1 << 30  # bytes of per-shift features held at once: more shifts per pass over the images


def _shift_passes(images_uint8, todo, features, per_shift: int, prep, chunk):
    """(shift, per-image feature tensors) for every shift in todo: as many shifts per pass over the
    images (preprocessed once per chunk and pass) as PASS_MEMORY holds. features(x, group) -> a list,
    per shift of group, of `per_shift` (chunk, D) tensors."""
    n, c = images_uint8.shape[:2]
    per_pass = max(1, PASS_MEMORY // max(1, n * per_shift * 64 * c * 4))
    for p in range(0, len(todo), per_pass):
        group = todo[p:p + per_pass]
        parts = [[[] for _ in range(per_shift)] for _ in group]
        for s in range(0, n, chunk):
            x = prep(images_uint8[s:s + chunk])
            for k, feats in enumerate(features(x, group)):
                for slot, f in zip(parts[k], feats):
                    slot.append(f)
        for shift, slots in zip(group, parts):
            yield shift, [torch.cat(slot) for slot in slots]


def _moved_descriptors(tiles: int):
    """features() of the images moved by each shift (edges repeated): their full-image descriptors,
    as windows of one edge-padded copy (moved by (dy, dx) = the window starting at (p - dy, p - dx))."""
    def features(x, group):
        h, w = x.shape[-2:]
        p = max(max(abs(dy), abs(dx)) for dy, dx in group)
        padded = F.pad(x, (p, p, p, p), mode="replicate")
        f = window_features(padded, tiles, [(p - dy, p - dy + h, p - dx, p - dx + w) for dy, dx in group])
        return [[v] for v in f]
    return features


def _candidates(found: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unordered candidate pairs (i < j), each once, from rows of neighbour lists (-1 = none)."""
    a = np.repeat(np.arange(found.shape[0]), found.shape[1])
    b = found.reshape(-1)
    ok = (b >= 0) & (a != b)
    key = np.unique(np.minimum(a[ok], b[ok]).astype(np.int64) * n + np.maximum(a[ok], b[ok]))
    return key // n, key % n


def _prune(images_uint8, a, b, threshold, tiles, max_shift, prep, chunk):
    """The candidate pairs whose lower bound (neardup's per-shift cell means, for each of the blur search's
    variants) admits the threshold, and which (shift, variant) combinations admit it (P, shifts x variants):
    exact, nothing within the threshold is dropped. Memory: four (N, 64C) feature sets at a time."""
    limit = (threshold * (1 + 1e-4) + 1e-6) ** 2
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    nv = 3 if prep.resample > 0 else 1  # neardup.variants: as is, first image blurred, second blurred
    admitted = torch.zeros(len(a), len(shifts(max_shift)) * nv, dtype=torch.bool)

    def features(x, group):  # both windows of every shift of the group, sharp and blurred (two summed-area tables)
        windows = [w for dy, dx in group for w in overlap_windows(*x.shape[-2:], dy, dx)]
        f = window_features(x, tiles, windows)
        g = window_features(gaussian(x, prep.resample), tiles, windows) if nv > 1 else f
        return [f[2 * k:2 * k + 2] + g[2 * k:2 * k + 2] for k in range(len(group))]

    order, (h, w) = {s: k for k, s in enumerate(shifts(max_shift))}, images_uint8.shape[-2:]
    for (dy, dx), (fa, fb, ga, gb) in _shift_passes(images_uint8, shifts(max_shift), features, 4, prep, chunk):
        base = order[(dy, dx)] * nv
        size = (prep.resolution,) * 2 if w > prep.resolution else (h, w)  # preprocess() resizes wider images
        window = (size[0] - abs(dy), size[1] - abs(dx))
        for v, (x, y) in enumerate([(fa, fb), (ga, fb), (fa, gb)][:nv]):
            # The whole-feature l2 (one faiss pass over every pair) first; the tighter tile-max bound on
            # the few that pass it (gathers: cheap for them, dear for all).
            ok = pair_sqdist(x, ta, y, tb) <= limit
            sel = ok.nonzero().flatten()
            for s in range(0, len(sel), GATHER_BLOCK):
                part = sel[s:s + GATHER_BLOCK]
                sq = (x[ta[part]] - y[tb[part]]).pow(2)
                ok[part] = tile_bound_sq(sq, *window, tiles) <= limit
            admitted[:, base + v] = ok
    keep = admitted.any(1)
    return a[keep.numpy()], b[keep.numpy()], admitted[keep]


def pair_sqdist(x: torch.Tensor, ia: torch.Tensor, y: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """||x[ia[k]] - y[ib[k]]||^2 for every k (float32): faiss's indexed pairwise distances when faiss is
    installed (no gathered copies: ~15x faster than the torch gathers at 1.5M pairs), else torch blocks."""
    x, y = x.float().contiguous(), y.float().contiguous()
    ia, ib = ia.long().contiguous(), ib.long().contiguous()
    if len(ia) == 0:
        return torch.zeros(0)
    try:
        import faiss
    except ImportError:
        step = 1 << 19
        return torch.cat([(x[ia[s:s + step]] - y[ib[s:s + step]]).pow(2).sum(1) for s in range(0, len(ia), step)]
                         or [torch.zeros(0)])
    out = torch.empty(len(ia), dtype=torch.float32)
    faiss.pairwise_indexed_L2sqr(x.shape[1], len(ia), faiss.swig_ptr(x.numpy()), faiss.swig_ptr(ia.numpy()),
                                 faiss.swig_ptr(y.numpy()), faiss.swig_ptr(ib.numpy()), faiss.swig_ptr(out.numpy()))
    return out


def _exact(images_uint8, i, j, admitted, tiles, max_shift, prep, chunk, progress) -> np.ndarray:
    """The near-duplicate distance of pairs (i, j), preprocessed from uint8 chunk by chunk: the tiled
    distance only at the (shift, variant) combinations their bound admitted (the others exceed the
    threshold, so the minimum within it is unchanged)."""
    out = [np.zeros(0)]
    for s in tqdm(range(0, len(i), chunk), desc="near duplicates (candidates)", disable=not progress):
        pa, pb = torch.from_numpy(i[s:s + chunk]), torch.from_numpy(j[s:s + chunk])
        x = prep(torch.cat([images_uint8[pa], images_uint8[pb]]))
        out.append(combo_distances(x[:len(pa)], x[len(pa):], admitted[s:s + chunk], tiles, max_shift,
                                   prep.resample).numpy())
    return np.concatenate(out).astype(np.float64)
