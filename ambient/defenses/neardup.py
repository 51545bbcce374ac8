"""Near-duplicate distance for the dedup defense, and its blocked all-pairs search.

Distance (what `dedup=near` thresholds): Carlini et al.'s tiled l2 (4x4 grid, max over tiles,
pixels in [0, 1]) between two images after a Gaussian low-pass (`lowpass`, sigma 1 px, edges
repeated), minimised over shifts of up to `max_shift` pixels (compared on the overlap) and over the
blur search (`resample`, sigma 0.8): either image may be blurred once more, since a resampled copy
is a blurred original. The low-pass removes JPEG block noise and pixel noise; the shift search a
crop or move by whole pixels; the blur search the blur that resampling adds, while keeping the
detail (prints, patterns) that tells distinct items apart, which a stronger symmetric low-pass erases.
Fashion-MNIST 50k, 2,000 sampled, 99% quantiles (benchmarks/dedup.py): JPEG q75 0.017, noise sigma
5/255 0.013, 1-px shift 0, resize 32->24->32 0.006 (0.059 without the blur search, 0.077 with the
former 3x3 box blur); nearest distinct neighbour, 0.2% quantile: 0.026. `blur` (odd box size) is the
former filter: with blur=3, lowpass=0, resample=0 and threshold 0.06 (photos: JPEG q75 <= 0.046,
2x resized <= 0.019, 1-px shift <= 0.034, distinct crops >= 0.076) runs saved before keep their metric.

Search: for each shift, a single matmul over per-cell means gives a *lower bound* of the tiled
distance (Jensen: a cell's squared mean difference <= its mean squared difference, and the max
over tiles >= their mean), so pairs whose bound exceeds the threshold are skipped exactly and
the tiled distance is computed only for the few candidates. Tighter still (tile_bound_sq): each tile's
own cells bound that tile's mse, so tiles^2 x the largest per-tile sum bounds the max itself; the index
path and the calibration use it on the pairs the whole-feature bound admits (Fashion-MNIST 50k: of 31.7M
candidate (pair, shift, variant) combinations the whole-feature bound admits 286k, the tile-max 2,452). With the blur search, each image's slack
(how far blurring moves its cell means) is subtracted from the bound (triangle inequality), so it
stays a bound. Memory is O(block x N).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ambient.images import gaussian

TILES = {"tiled": 4, "l2": 1}  # Carlini et al. 2023: 4x4 grid; "l2" = one tile = plain normalized l2
LOWPASS = 1.0  # Gaussian sigma (px at 32 px) of dedup.lowpass: removes JPEG blocks and pixel noise (module doc)
RESAMPLE = 0.8  # sigma of dedup.resample, the blur search: what a 32->24->32 resize adds (module doc)
CELLS_PER_TILE = 2  # each tile split 2x2 for the lower bound: finer cells, tighter bound, more dims


def preprocess(images: Tensor, resolution: int = 32, blur: int = 1, lowpass: float = LOWPASS) -> Tensor:
    """Uint8 (N, C, H, W) -> float [0, 1], at most `resolution` px, box-blurred (`blur`, odd size) and/or
    Gaussian low-passed (`lowpass` = sigma in px), edges repeated (see module doc)."""
    x = images.float() / 255.0
    if x.shape[-1] > resolution:  # thresholds are calibrated at 32 px; bigger images are compared there
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if blur > 1:  # edges repeated, not averaged over fewer pixels: a 1-px shift of the content stays exact
        x = F.avg_pool2d(F.pad(x, (blur // 2,) * 4, mode="replicate"), blur, stride=1)
    if lowpass > 0:
        x = gaussian(x, lowpass)
    return x


@dataclass(frozen=True)
class Filter:
    """The metric's settings passed around as one value: preprocess() (called) and the blur search's sigma."""
    resolution: int = 32
    blur: int = 1
    lowpass: float = LOWPASS
    resample: float = RESAMPLE

    def __call__(self, images: Tensor) -> Tensor:
        return preprocess(images, self.resolution, self.blur, self.lowpass)


def shifts(max_shift: int) -> list[tuple[int, int]]:
    """Every shift (dy, dx) with |dy|, |dx| <= max_shift; the distance is their minimum."""
    r = range(-max_shift, max_shift + 1)
    return [(dy, dx) for dy in r for dx in r]


def overlap(a: Tensor, b: Tensor, dy: int, dx: int) -> tuple[Tensor, Tensor]:
    """The overlapping windows of a and of b when b is moved by (dy, dx) relative to a."""
    h, w = a.shape[-2:]
    a = a[..., max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)]
    b = b[..., max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)]
    return a, b


def overlap_windows(h: int, w: int, dy: int, dx: int) -> tuple[tuple, tuple]:
    """overlap()'s two windows as (r0, r1, c0, c1) of an h x w image (for window_features)."""
    return ((max(0, dy), h + min(0, dy), max(0, dx), w + min(0, dx)),
            (max(0, -dy), h + min(0, -dy), max(0, -dx), w + min(0, -dx)))


# Carlini et al. 2023 tiled l2 for row-aligned pairs (a[k] vs b[k]) -> Tensor[K]; tiles=1 is plain l2.
def paired_tiled(a: Tensor, b: Tensor, tiles: int) -> Tensor:
    k, c, h, w = a.shape
    # Per-tile mean squared error as one matmul (few large ops: small ones are slow on a busy CPU);
    # squared in place and no channel mean for grey images (2.4x faster on the index path's pairs).
    d = (a - b).square_()
    mse = (d if c == 1 else d.mean(1)).reshape(k, h * w) @ _cell_matrix(h, w, tiles, 1)[0].to(a.dtype)
    return mse.amax(1).sqrt()


def pair_distances(x: Tensor, i, j, tiles: int = 4, max_shift: int = 1, chunk: int = 4096,
                   resample: float = RESAMPLE) -> Tensor:
    """The near-dup distance of row pairs (i[k], j[k]) of preprocessed x, min over shifts and, when
    resample > 0, over which side (none, i's or j's image) is blurred by gaussian(resample) first."""
    i, j = torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long)
    out = torch.full((len(i),), math.inf)
    for s in range(0, len(i), chunk):
        a, b = x[i[s:s + chunk]], x[j[s:s + chunk]]
        for p, q in variants(a, b, resample):
            for dy, dx in shifts(max_shift):
                out[s:s + chunk] = torch.minimum(out[s:s + chunk], paired_tiled(*overlap(p, q, dy, dx), tiles))
    return out


def combo_distances(a: Tensor, b: Tensor, ok: Tensor, tiles: int, max_shift: int, resample: float) -> Tensor:
    """Min of the tiled distance of row pairs (a[k], b[k]) over the (shift, variant) combinations that
    ok (K, shifts x variants, variant fastest) admits; inf where none. Where the others are known to
    exceed a limit (their bound does), the result is the exact distance whenever that is within it."""
    out, nv = torch.full((a.shape[0],), math.inf), 3 if resample > 0 else 1
    for v in range(nv):  # variants() one at a time, blurring only the rows that need it
        rows = ok[:, v::nv].any(1).nonzero().flatten()
        if not len(rows):
            continue
        if 2 * len(rows) > len(a):  # most rows: gathering them costs more than blurring all
            rows = torch.arange(len(a))
        p, q, admit = (a, b, ok[:, v::nv]) if len(rows) == len(a) else (a[rows], b[rows], ok[rows, v::nv])
        p, q = (gaussian(p, resample) if v == 1 else p), (gaussian(q, resample) if v == 2 else q)
        for k, (dy, dx) in enumerate(shifts(max_shift)):
            sel = admit[:, k].nonzero().flatten()
            if len(sel) == len(rows):
                out[rows] = torch.minimum(out[rows], paired_tiled(*overlap(p, q, dy, dx), tiles))
            elif len(sel):
                at = rows[sel]
                out[at] = torch.minimum(out[at], paired_tiled(*overlap(p[sel], q[sel], dy, dx), tiles))
    return out


def variants(a: Tensor, b: Tensor, resample: float) -> list[tuple[Tensor, Tensor]]:
    """The image pairs the distance is minimised over: (a, b), and with the blur search (resample > 0)
    (blurred a, b) and (a, blurred b): a resampled copy is a blurred original (module doc)."""
    if resample <= 0:
        return [(a, b)]
    return [(a, b), (gaussian(a, resample), b), (a, gaussian(b, resample))]


def blur_slack(x: Tensor, tiles: int, windows: list, resample: float) -> list[Tensor]:
    """Per row and window: ||f(blurred x) - f(x)|| of the bound features (window_features). The bound of
    a pair minus both rows' slack stays a lower bound of its distance with the blur search (triangle
    inequality: blurring one side moves its features by at most its slack)."""
    if resample <= 0:
        return [torch.zeros(x.shape[0]) for _ in windows]
    sharp, blurred = window_features(x, tiles, windows), window_features(gaussian(x, resample), tiles, windows)
    return [(f - g).pow(2).sum(1).sqrt() for f, g in zip(sharp, blurred)]


def bound_features(x: Tensor, tiles: int) -> Tensor:
    """Per-cell channel means weighted so that ||f(a) - f(b)|| <= tiled l2(a, b) (module doc)."""
    n, c, h, w = x.shape
    means, share = _cell_matrix(h, w, tiles, CELLS_PER_TILE)
    # weight^2 = n_cell / (n_tile * tiles^2 * C): cells of a tile add up to its mse, tiles average below the max
    weights = (share / (tiles * tiles * c)).sqrt()
    return (x.reshape(n, c, h * w) @ (means * weights).to(x.dtype)).reshape(n, -1)


def window_features(x: Tensor, tiles: int, windows: list[tuple[int, int, int, int]]) -> list[Tensor]:
    """bound_features of x[..., r0:r1, c0:c1] for each window (r0, r1, c0, c1), from one summed-area
    table: O(N x cells) per window instead of a (N, H*W) x (H*W, cells) matmul (the same numbers, up to
    float rounding; the index path needs nine shifts' windows of every image)."""
    n, c = x.shape[:2]
    block = max(1, WINDOW_BLOCK // c)
    parts = [_window_features(x[s:s + block], tiles, windows) for s in range(0, n, block)]
    return [torch.cat(per_window) for per_window in zip(*(parts or [_window_features(x, tiles, windows)]))]


WINDOW_BLOCK = 512  # image channels per summed-area table: the float64 table (~4.5 MB at 32 px) stays in cache


def _window_features(x: Tensor, tiles: int, windows: list[tuple[int, int, int, int]]) -> list[Tensor]:
    n, c, h, w = x.shape
    # Pixel-major layout ((H+1)(W+1), N*C): a cell corner is one contiguous row, so the corner gather
    # copies rows (gathering columns of the image-major table, and whole-set tables, were ~4x slower).
    table = x.permute(2, 3, 0, 1).to(torch.float64, memory_format=torch.contiguous_format).reshape(h, w, n * c)
    sat = F.pad(table.cumsum(0).cumsum(1), (0, 0, 1, 0, 1, 0)).reshape((h + 1) * (w + 1), n * c)
    out = []
    for r0, r1, c0, c1 in windows:
        ys, xs, weights = _cell_bounds(r1 - r0, c1 - c0, tiles, CELLS_PER_TILE)
        y0, y1 = ys[:, 0] + r0, ys[:, 1] + r0
        x0, x1 = xs[:, 0] + c0, xs[:, 1] + c0
        corners = torch.cat([y1 * (w + 1) + x1, y0 * (w + 1) + x1, y1 * (w + 1) + x0, y0 * (w + 1) + x0])
        k = len(y0)
        v = sat.index_select(0, corners)  # (4 cells, N*C): one gather of the four corners of every cell
        sums = v[:k] - v[k:2 * k] - v[2 * k:3 * k] + v[3 * k:]
        scale = (weights / c).sqrt() / ((y1 - y0) * (x1 - x0))
        out.append((sums * scale[:, None]).float().T.reshape(n, c * k))
    return out


def tile_bound_sq(sq: Tensor, h: int, w: int, tiles: int) -> Tensor:
    """Squared feature differences (..., C x cells) of an h x w window (window_features' layout) -> the
    squared *tile-max* lower bound: tiles^2 x the largest per-tile sum. Each tile's cells bound that
    tile's mse (Jensen), so the max over tiles bounds the tiled distance itself; the plain sum bounds
    only the tiles' mean, which is looser by up to tiles^2 (module doc)."""
    ids = _cell_tiles(h, w, tiles, CELLS_PER_TILE)
    per_cell = sq.reshape(*sq.shape[:-1], -1, len(ids)).sum(-2)  # channels summed: (..., cells)
    per_tile = per_cell.new_zeros(*per_cell.shape[:-1], tiles * tiles).index_add_(-1, ids, per_cell)
    return per_tile.amax(-1) * (tiles * tiles)


@lru_cache(maxsize=256)
def _cell_tiles(h: int, w: int, tiles: int, cells: int) -> Tensor:
    """The tile (row-major) of every cell, in _cell_bounds' order."""
    side = lambda length, k: [len(p) for p in torch.tensor_split(torch.arange(length), k)]
    ids = [t * tiles + u for t, rows in enumerate(side(h, tiles)) for u, cols in enumerate(side(w, tiles))
           for _ in range(min(cells, rows) * min(cells, cols))]
    return torch.tensor(ids)


@lru_cache(maxsize=256)
def _cell_bounds(h: int, w: int, tiles: int, cells: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column [start, end) of every cell, in _cell_matrix's order, and its weight^2 * C."""
    rows_of = lambda length, k: [(int(p[0]), int(p[-1]) + 1) for p in torch.tensor_split(torch.arange(length), k)]
    ys, xs, weights = [], [], []
    for tr in rows_of(h, tiles):
        for tc in rows_of(w, tiles):
            n_tile = (tr[1] - tr[0]) * (tc[1] - tc[0])
            for cr in rows_of(tr[1] - tr[0], min(cells, tr[1] - tr[0])):
                for cc in rows_of(tc[1] - tc[0], min(cells, tc[1] - tc[0])):
                    ys.append((tr[0] + cr[0], tr[0] + cr[1]))
                    xs.append((tc[0] + cc[0], tc[0] + cc[1]))
                    weights.append((cr[1] - cr[0]) * (cc[1] - cc[0]) / n_tile / (tiles * tiles))
    return torch.tensor(ys), torch.tensor(xs), torch.tensor(weights, dtype=torch.float64)


@lru_cache(maxsize=64)
def _cell_matrix(h: int, w: int, tiles: int, cells: int) -> tuple[Tensor, Tensor]:
    """(h*w, cells) averaging matrix of `cells` x `cells` cells nested in each of `tiles` x `tiles` tiles
    (split as ambient.distances.split_tiles does), and each cell's share n_cell / n_tile.
    """
    basis, columns, shares = torch.eye(h * w).reshape(h * w, h, w), [], []
    for rows in torch.tensor_split(basis, tiles, dim=1):
        for tile in torch.tensor_split(rows, tiles, dim=2):
            n_tile = tile.shape[1] * tile.shape[2]
            for cell_rows in torch.tensor_split(tile, min(cells, tile.shape[1]), dim=1):
                for cell in torch.tensor_split(cell_rows, min(cells, tile.shape[2]), dim=2):
                    n_cell = cell.shape[1] * cell.shape[2]
                    columns.append(cell.sum((1, 2)) / n_cell)
                    shares.append(n_cell / n_tile)
    return torch.stack(columns, dim=1), torch.tensor(shares)


def near_pairs(x: Tensor, threshold: float, tiles: int = 4, max_shift: int = 1, block_size: int = 1024,
               progress: bool = False, resample: float = RESAMPLE,
               shard: tuple[int, int] = (0, 1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with distance <= threshold as (i, j, distance) arrays; blocked, no pair loop.
    shard=(k, K): only the pairs whose smaller row lies in a row block b with b % K == k (each pair is
    found in the block of its smaller row only, so the K shards partition the pairs exactly)."""
    n, hits, limit = x.shape[0], [], threshold * (1 + 1e-4) + 1e-6  # float slack: it is a bound
    h, w = x.shape[-2:]
    k, count = shard
    starts = [start for b, start in enumerate(range(0, n, block_size)) if b % count == k]
    steps = [(s, start) for s in shifts(max_shift) for start in starts]
    for (dy, dx), start in tqdm(steps, desc="near duplicates", disable=not progress):
        if start == starts[0]:  # features of this shift's two windows, once per shift
            fa, fb = (bound_features(w, tiles) for w in overlap(x, x, dy, dx))
            centre = fb.mean(0, keepdim=True)  # moves no distance, shrinks the matmul's rounding error
            fa, fb = fa - centre, fb - centre
            fa_sq, fb_sq = fa.pow(2).sum(1, keepdim=True), fb.pow(2).sum(1)
            sa, sb = blur_slack(x, tiles, list(overlap_windows(h, w, dy, dx)), resample)
        # Pair (i, j) at shift s is pair (j, i) at -s, so columns j >= start cover every pair once.
        # ||a - b||^2 = |a|^2 + |b|^2 - 2 a.b in one addmm: this block is the whole cost, keep it lean.
        sq = torch.addmm(fb_sq[start:], fa[start:start + block_size], fb[start:].T, alpha=-2)
        sq += fa_sq[start:start + block_size]
        reach = (limit + sa[start:start + block_size, None] + sb[None, start:]) ** 2
        bi, bj = (sq <= reach).nonzero(as_tuple=True)
        i, j = bi + start, bj + start
        i, j = i[j > i], j[j > i]
        if len(i):
            d = _at_shift(x, i, j, tiles, dy, dx, resample)
            keep = d <= threshold
            hits.append((i[keep], j[keep], d[keep]))
    return _min_per_pair(hits, n)


def _min_per_pair(hits: list, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (i, j, distance) per pair, the minimum over the shifts that linked it."""
    if not hits:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    i, j, d = (torch.cat(parts).numpy() for parts in zip(*hits))
    if i.size == 0:  # candidates were checked, none under the threshold
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    key = i.astype(np.int64) * n + j
    order = np.lexsort((d, key))  # by pair, smallest distance first
    key, d = key[order], d[order]
    first = np.r_[True, key[1:] != key[:-1]]
    return key[first] // n, key[first] % n, d[first].astype(np.float64)


def _at_shift(x: Tensor, i: Tensor, j: Tensor, tiles: int, dy: int, dx: int, resample: float,
              chunk: int = 4096) -> Tensor:
    """Tiled distance of pairs at one shift only (the candidates that shift's bound admitted), min over
    the blur search's variants."""
    out = []
    for s in range(0, len(i), chunk):
        pairs = variants(x[i[s:s + chunk]], x[j[s:s + chunk]], resample)
        out.append(torch.stack([paired_tiled(*overlap(p, q, dy, dx), tiles) for p, q in pairs]).amin(0))
    return torch.cat(out)


