"""All-pairs image distances for the extraction attack (Carlini et al. 2023, arXiv 2301.13188).

Images are float tensors (N, C, H, W) in [0, 1]. Every function works in row blocks of the
first argument, so memory is O(block_size x Nb) whatever Na is, and every block is one matmul
(||a||^2 + ||b||^2 - 2 a.b), never a Python loop over pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

DEFAULT_BLOCK_SIZE = 1024
METRICS = ("l2", "tiled")

BlockFn = Callable[[Tensor], Tensor]


def _prepare(a: Tensor, b: Tensor, device) -> tuple[Tensor, Tensor]:
    """One place that decides device and dtype for every entry point."""
    device = torch.device(device) if device is not None else a.device
    # float32 keeps the matmul fast; float64 input stays float64 for exact checks.
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def _squared_distances(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """||a - b||^2 for all row pairs via one matmul (b_sq precomputed once per call)."""
    sq = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    # Rounding can make identical rows slightly negative; sqrt of that would be NaN.
    return sq.clamp_min_(0.0)


def _row_blocks(a: Tensor, block_size: int) -> Iterator[tuple[int, Tensor]]:
    """Yield (start, block of rows of a) so callers never hold Na x Nb at once."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for start in range(0, a.shape[0], block_size):
        yield start, a[start : start + block_size]


# Carlini et al. 2023, Sec. 4.2: normalized l2 = sqrt(sum (a_i - b_i)^2 / d), d = C*H*W.
def _l2_block_fn(a: Tensor, b: Tensor) -> tuple[Tensor, BlockFn]:
    a_flat, b_flat = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if a_flat.shape[1] != b_flat.shape[1]:
        raise ValueError(f"image sizes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    # Subtracting b's mean changes no distance but shrinks ||.||^2, hence the rounding error.
    shift = b_flat.mean(0, keepdim=True)
    a_flat, b_flat = a_flat - shift, b_flat - shift
    b_sq = (b_flat * b_flat).sum(1)
    d = a_flat.shape[1]

    def block(rows: Tensor) -> Tensor:
        return (_squared_distances(rows, b_flat, b_sq) / d).sqrt_()

    return a_flat, block


def split_tiles(x: Tensor, tiles: int) -> list[Tensor]:
    """Split (N, C, H, W) into a tiles x tiles grid; tensor_split spreads the remainder over the first tiles
    when H or W is not divisible, so every pixel lands in exactly one tile.
    """
    if x.dim() != 4:
        raise ValueError(f"tiled distance needs (N, C, H, W) images, got shape {tuple(x.shape)}")
    if not 1 <= tiles <= min(x.shape[2], x.shape[3]):
        raise ValueError(f"tiles must be in [1, min(H, W)], got {tiles} for {tuple(x.shape)}")
    return [
        tile.reshape(x.shape[0], -1)
        for rows in torch.tensor_split(x, tiles, dim=2)
        for tile in torch.tensor_split(rows, tiles, dim=3)
    ]


# Carlini et al. 2023, Sec. 4.2: tiled l2 = max over a 4x4 grid of per-tile normalized l2,
# so a copy that differs only in one region is not hidden by the agreeing rest of the image.
def _tiled_block_fn(a: Tensor, b: Tensor, tiles: int) -> tuple[Tensor, BlockFn]:
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"image sizes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    shift = b.mean(0, keepdim=True)
    a_tiles, b_tiles = split_tiles(a - shift, tiles), split_tiles(b - shift, tiles)
    b_sq = [t.pow(2).sum(1) for t in b_tiles]
    # Row-block the tiles together: a is re-packed as (N, sum of tile sizes).
    sizes = [t.shape[1] for t in a_tiles]
    a_packed = torch.cat(a_tiles, dim=1)

    def block(rows: Tensor) -> Tensor:
        out = None
        # A loop over the 16 tiles (not over pairs) keeps memory at one block x Nb matrix.
        for rows_t, b_t, b_sq_t in zip(rows.split(sizes, dim=1), b_tiles, b_sq):
            dist = (_squared_distances(rows_t, b_t, b_sq_t) / b_t.shape[1]).sqrt_()
            out = dist if out is None else torch.maximum(out, dist, out=out)
        return out

    return a_packed, block


BOUND_HALVINGS = 3  # the filter's lower bounds: 8x8, 4x4 and 2x2 window sums (coarse, cheaper first)
_PRUNE_SLACK = 1e-4  # prune only when the float32 bound clears threshold^2 by this much
_COARSE_KEEPS = 1 / 4  # a bound keeping more than this share of its pairs hands over to the finest
_SPARSE = 1 / 64  # candidates below this share of their live rows x columns: per pair, else matmul


def _halve(x: Tensor) -> Tensor:
    """Sums over 2x2 windows, (N, C, H, W) -> (N, C, H/2, W/2); strided adds (faster than avg_pool2d)."""
    n, c, h, w = x.shape
    y = x.reshape(n * c, h // 2, 2, w)
    y = (y[:, :, 0] + y[:, :, 1]).reshape(n * c, h // 2, w // 2, 2)  # row pairs first: contiguous runs
    return (y[..., 0] + y[..., 1]).reshape(n, c, h // 2, w // 2)


class EdgeBlock:
    """A block of images (N, C, H, W) in [0, 1] and its window sums, computed once per block."""

    def __init__(self, x: Tensor):
        self.x = x
        self.bounds = []  # (pixels per window, centred window sums (N, m), their squared norms)
        y, k = x, 1
        for _ in range(BOUND_HALVINGS):
            if y.shape[2] % 2 or y.shape[3] % 2:
                break
            y, k = _halve(y), 4 * k
            sums = y.reshape(len(x), -1) - 0.5 * k
            self.bounds.insert(0, (k, sums, (sums * sums).sum(1)))

    def __len__(self) -> int:
        return len(self.x)

    def rows(self, start: int, stop: int) -> EdgeBlock:
        """Rows start:stop as an EdgeBlock of views (nothing recomputed)."""
        part = object.__new__(EdgeBlock)
        part.x = self.x[start:stop]
        part.bounds = [(k, sums[start:stop], sq[start:stop]) for k, sums, sq in self.bounds]
        return part


_UPPER_SPLIT = 1024  # a self-pair block larger than this is split in halves: its lower half is skipped


def _tiled_pairs(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, tiles: int) -> Tensor:
    """Tiled l2 of the pairs (a[rows[k]], b[cols[k]]) only, from their differences."""
    out = []
    c, h, w = a.shape[1:]
    chunk = max(1, 2**22 // (c * h * w))  # pairs per step: ~16 MB of float32 differences
    for s in range(0, len(rows), chunk):
        diff = a[rows[s : s + chunk]] - b[cols[s : s + chunk]]
        if h % tiles == 0 and w % tiles == 0:  # one reduction instead of tiles^2 copies
            per_tile = diff.reshape(-1, c, tiles, h // tiles, tiles, w // tiles).pow_(2).mean((1, 3, 5)).flatten(1)
        else:
            per_tile = torch.stack([t.pow(2).mean(1) for t in split_tiles(diff, tiles)], dim=1)
        out.append(per_tile.amax(1).sqrt_())
    return torch.cat(out) if out else a.new_zeros(0)


def _tiled_dense(a: Tensor, b: Tensor, tiles: int, chunk: int = 256) -> Tensor:
    """tiled_l2 of two small sets: equal tiles as one batched matmul over tiles (few, large ops)."""
    n, c, h, w = a.shape
    if h % tiles or w % tiles:
        rows, block = _tiled_block_fn(a, b, tiles)
        return block(rows)

    def tile_major(x: Tensor) -> Tensor:  # (N, C, H, W) -> (tiles^2, N, C*H*W/tiles^2)
        m = len(x)
        x = x.reshape(m, c, tiles, h // tiles, tiles, w // tiles).permute(2, 4, 0, 1, 3, 5)
        return x.reshape(tiles * tiles, m, -1)

    shift = b.mean(0, keepdim=True)  # changes no distance, shrinks the rounding error
    ta, tb = tile_major(a - shift), tile_major(b - shift)
    b_sq = (tb * tb).sum(2)[:, None, :]
    out = []
    for s in range(0, n, chunk):  # memory: tiles^2 x chunk x len(b)
        t = ta[:, s : s + chunk]
        sq = torch.baddbmm(b_sq, t, tb.transpose(1, 2), alpha=-2.0).add_((t * t).sum(2)[:, :, None])
        out.append(sq.amax(0).clamp_min_(0.0).div_(ta.shape[2]).sqrt_())
    return torch.cat(out)


# Carlini et al. 2023, Sec. 4.2: the clique filter's edges, pairs with tiled l2 < threshold, of two
# image blocks (N, C, H, W) in [0, 1] (or EdgeBlocks) -> (i, j, distance), sorted by (i, j).
# upper=True: a is b, pairs i < j only. Same edges as thresholding tiled_l2, faster: lower bounds
# rule out most pairs first. Normalized l2 of window means <= normalized l2 of the images (Jensen,
# equal windows) <= tiled l2 (a max over tiles >= their size-weighted root mean square); each bound
# is one small matmul, and only the pairs no bound rules out get the tiled distance.
def tiled_edges(a: Tensor | EdgeBlock, b: Tensor | EdgeBlock, threshold: float, tiles: int = 4,
                upper: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        xa, xb = _prepare(a, b, None)
        a = EdgeBlock(xa)
        b = a if xb is xa else EdgeBlock(xb)
    if a.x.shape[1:] != b.x.shape[1:]:
        raise ValueError(f"image sizes differ: {tuple(a.x.shape[1:])} vs {tuple(b.x.shape[1:])}")
    split_tiles(a.x[:1], tiles)  # validate tiles before any work
    if upper and len(a) > _UPPER_SPLIT:  # (top, top), (top, bottom), (bottom, bottom): no i > j pairs
        h = len(a) // 2
        top, bottom = a.rows(0, h), a.rows(h, len(a))
        parts = [tiled_edges(top, top, threshold, tiles, upper=True), tiled_edges(top, bottom, threshold, tiles),
                 tiled_edges(bottom, bottom, threshold, tiles, upper=True)]
        i = torch.cat([parts[0][0], parts[1][0], parts[2][0] + h])
        j = torch.cat([parts[0][1], parts[1][1] + h, parts[2][1] + h])
        order = torch.argsort(i * len(a) + j)
        return i[order], j[order], torch.cat([p[2] for p in parts])[order]
    d = a.x[0].numel()
    n_stages = min(len(a.bounds), len(b.bounds))
    rows = cols = cand = None  # live rows / columns of a and b, candidate pairs among them (bool)
    kept = 0
    stage = 0
    while stage < n_stages:
        if cand is not None and kept <= _SPARSE * cand.numel():
            break  # few candidates left: cheaper to compute them exactly, pair by pair
        (k, sa, sqa), (_, sb, sqb) = a.bounds[stage], b.bounds[stage]
        if rows is not None:
            sa, sqa, sb, sqb = sa[rows], sqa[rows], sb[cols], sqb[cols]
        # ||sa - sb||^2 / (d k) < threshold^2 + slack, as ||sb||^2 - 2 sa.sb < (...) - ||sa||^2
        lhs = torch.addmm(sqb[None, :], sa, sb.T, alpha=-2.0)
        below = lhs < ((threshold * threshold + _PRUNE_SLACK) * d * k - sqa)[:, None]
        if cand is None:
            cand = below.triu_(1) if upper else below
        else:
            cand &= below
        area, kept = cand.numel(), int(torch.count_nonzero(cand))
        if kept < area / 16:  # sparse: rebuild the live sub-matrix from the candidates' positions
            r, c = torch.nonzero(cand, as_tuple=True)
            live_r, live_c = torch.unique_consecutive(r), torch.unique(c)
            cand = torch.zeros(len(live_r), len(live_c), dtype=torch.bool, device=cand.device)
            cand[torch.searchsorted(live_r, r), torch.searchsorted(live_c, c)] = True
        else:
            live_r, live_c = torch.nonzero(cand.any(1)).flatten(), torch.nonzero(cand.any(0)).flatten()
            if len(live_r) < cand.shape[0]:
                cand = cand[live_r]
            if len(live_c) < cand.shape[1]:
                cand = cand[:, live_c]
        rows = live_r if rows is None else rows[live_r]
        cols = live_c if cols is None else cols[live_c]
        # A bound that kept most pairs (e.g. noise-like images) is too coarse: go to the finest one.
        stage = n_stages - 1 if kept > _COARSE_KEEPS * area and stage < n_stages - 2 else stage + 1
    if cand is None:  # no bound applies (odd sizes): every pair is a candidate
        rows, cols = torch.arange(len(a), device=a.x.device), torch.arange(len(b), device=a.x.device)
        cand = torch.ones(len(a), len(b), dtype=torch.bool, device=a.x.device)
        cand = cand.triu_(1) if upper else cand
    r, c = torch.nonzero(cand, as_tuple=True)
    if len(r) == 0 or len(r) < _SPARSE * len(rows) * len(cols):
        dist = _tiled_pairs(a.x, b.x, rows[r], cols[c], tiles)
    else:  # dense candidates (e.g. a memorized prompt's copies): matmuls over the live rows x columns
        dist = _tiled_dense(a.x[rows], b.x[cols], tiles)[r, c]
    hit = dist < threshold
    return rows[r][hit], cols[c][hit], dist[hit]


def _block_fn(a: Tensor, b: Tensor, metric: str, tiles: int) -> tuple[Tensor, BlockFn]:
    """Pick the metric's block function by name; a bad name fails before any work."""
    if metric == "l2":
        return _l2_block_fn(a, b)
    if metric == "tiled":
        return _tiled_block_fn(a, b, tiles)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


# Carlini et al. 2023, Sec. 4.2: all-pairs normalized l2, Tensor[Na, Nb].
def normalized_l2(a: Tensor, b: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, device=None) -> Tensor:
    a, b = _prepare(a, b, device)
    rows, block = _l2_block_fn(a, b)
    return torch.cat([block(r) for _, r in _row_blocks(rows, block_size)], dim=0)


# Carlini et al. 2023, Sec. 4.2: all-pairs tiled l2 (max over tiles x tiles grid), Tensor[Na, Nb].
def tiled_l2(
    a: Tensor, b: Tensor, tiles: int = 4, block_size: int = DEFAULT_BLOCK_SIZE, device=None
) -> Tensor:
    a, b = _prepare(a, b, device)
    rows, block = _tiled_block_fn(a, b, tiles)
    return torch.cat([block(r) for _, r in _row_blocks(rows, block_size)], dim=0)


def _blocked_topk(
    rows: Tensor, block: BlockFn, k: int, nb: int, exclude_self: bool, block_size: int, largest: bool
) -> tuple[Tensor, Tensor]:
    """K smallest (largest) entries per row of a blocked score, never holding Na x Nb."""
    if not 1 <= k <= nb - int(exclude_self):
        raise ValueError(f"k must be in [1, {nb - int(exclude_self)}], got {k}")
    fill = float("-inf") if largest else float("inf")
    values, indices = [], []
    for start, r in _row_blocks(rows, block_size):
        scores = block(r)
        if exclude_self:
            # a and b are the same set: row i must not find itself as its own neighbour.
            i = torch.arange(r.shape[0], device=r.device)
            scores[i, start + i] = fill
        v, idx = scores.topk(k, dim=1, largest=largest, sorted=True)
        values.append(v)
        indices.append(idx)
    return torch.cat(values), torch.cat(indices)


# Carlini et al. 2023, Sec. 4.2: k nearest rows of b for each row of a -> (dist[Na,k], idx[Na,k]),
# ascending. exclude_self=True is for a is b: row i never returns index i.
def nearest(
    a: Tensor,
    b: Tensor,
    k: int = 1,
    metric: str = "l2",
    exclude_self: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    tiles: int = 4,
    device=None,
) -> tuple[Tensor, Tensor]:
    a, b = _prepare(a, b, device)
    if exclude_self and a.shape[0] != b.shape[0]:
        raise ValueError("exclude_self=True needs a and b to be the same set (same length)")
    rows, block = _block_fn(a, b, metric, tiles)
    return _blocked_topk(rows, block, k, b.shape[0], exclude_self, block_size, largest=False)


def _unit_rows(f: Tensor) -> Tensor:
    """Rows scaled to unit norm; a zero feature vector stays zero instead of NaN."""
    f = f.reshape(f.shape[0], -1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


# Somepalli et al. 2023 (DCR): cosine similarity of feature vectors, Tensor[Na, Nb].
def cosine_similarity(
    fa: Tensor, fb: Tensor, block_size: int = DEFAULT_BLOCK_SIZE, device=None
) -> Tensor:
    fa, fb = _prepare(fa, fb, device)
    ua, ub = _unit_rows(fa), _unit_rows(fb)
    return torch.cat([r @ ub.T for _, r in _row_blocks(ua, block_size)], dim=0)


# Somepalli et al. 2023 (DCR): top-k most similar rows of fb -> (sim[Na,k], idx[Na,k]), descending.
def nearest_cosine(
    fa: Tensor,
    fb: Tensor,
    k: int = 1,
    exclude_self: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device=None,
) -> tuple[Tensor, Tensor]:
    fa, fb = _prepare(fa, fb, device)
    if exclude_self and fa.shape[0] != fb.shape[0]:
        raise ValueError("exclude_self=True needs fa and fb to be the same set (same length)")
    ua, ub = _unit_rows(fa), _unit_rows(fb)
    return _blocked_topk(ua, lambda r: r @ ub.T, k, fb.shape[0], exclude_self, block_size, largest=True)
