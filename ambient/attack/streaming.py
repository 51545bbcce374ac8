"""The extraction attack's all-pairs work, streamed over image sets in blocks (Carlini et al. 2023).

Memory is a few blocks of images and one block x block distance matrix, whatever the number of
generations and training images; what is kept across blocks is O(1) per image (a nearest distance
and index) or O(1) per clique-filter edge. Images come from a source that hands out one block at a
time: `TensorSource` (a tensor already in memory; uint8 stays uint8 until its block is read) or
`PngFiles` (PNG files decoded one block at a time, e.g. evaluate's samples/<prompt>/*.png), and
`ConcatSource` (several of them read as one: every prompt's generations). `per_block` runs any
per-image computation (features, nearest training images, class probabilities) a block at a time.

    edges = stream_tiled_edges(PngFiles(sorted(folder.glob("*.png"))), threshold=0.1)
    nn = stream_nearest(PngFiles(generation_files), TensorSource(train_uint8))
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ambient.attack.distances import (
    DEFAULT_BLOCK_SIZE,
    EdgeBlock,
    _l2_block_fn,
    tiled_edges,
)
from ambient.images import gaussian

# Block side for the filter: per block pair it holds two blocks, their window sums and a block x
# block bound matrix (~90 MB at 2048 for 3x32x32); fewer, larger pairs than 1024 run ~25% faster
# on CPU (benchmarks/tiled_distance.py --filter-block-size).
FILTER_BLOCK_SIZE = 2048


@runtime_checkable
class ImageSource(Protocol):
    """N images handed out by block as float (n, C, H, W) in [0, 1]."""

    def __len__(self) -> int: ...

    def block(self, start: int, stop: int) -> Tensor: ...


class TensorSource:
    """Images already in memory: uint8 in [0, 255] (converted per block) or float in [0, 1]."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def block(self, start: int, stop: int) -> Tensor:
        x = self.images[start:stop]
        return x.float() / 255 if x.dtype == torch.uint8 else x


class PngFiles:
    """PNG files (RGB or grayscale, one size), decoded a block at a time; nothing is kept."""

    def __init__(self, files: Sequence[Path | str]):
        self.files = [Path(f) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def block(self, start: int, stop: int) -> Tensor:
        arrays = []
        for f in self.files[start:stop]:
            with Image.open(f) as img:
                a = np.array(img)
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
        # Same values as evaluate's loader: uint8 / 255.
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def as_source(images: Tensor | ImageSource) -> ImageSource:
    return images if isinstance(images, ImageSource) and not isinstance(images, Tensor) else TensorSource(images)


class ConcatSource:
    """Several sources read as one, in order (e.g. every prompt's generations)."""

    def __init__(self, parts: Sequence[Tensor | ImageSource]):
        self.parts = [as_source(p) for p in parts]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def block(self, start: int, stop: int) -> Tensor:
        pieces = [part.block(max(start, s0) - s0, min(stop, s0 + len(part)) - s0)
                  for part, s0 in zip(self.parts, self.starts) if max(start, s0) < min(stop, s0 + len(part))]
        if not pieces:
            raise IndexError(f"rows [{start}, {stop}) of a source of {len(self)} images")
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class LowPassed:
    """A source read through a Gaussian low-pass (sigma in px, edges repeated), block by block: the
    Definition 1 distance that does not count a generation's noise as distance (attack.lowpass)."""

    def __init__(self, source: Tensor | ImageSource, sigma: float):
        self.source, self.sigma = as_source(source), float(sigma)

    def __len__(self) -> int:
        return len(self.source)

    def block(self, start: int, stop: int) -> Tensor:
        return gaussian(self.source.block(start, stop), self.sigma)


def rows_of(source: Tensor | ImageSource, rows: Sequence[int]) -> Tensor:
    """A few rows of a source (pictures, a handful of images): one read per row."""
    source = as_source(source)
    return torch.cat([source.block(int(r), int(r) + 1) for r in rows]) if len(rows) else torch.empty(0)


def per_block(source: Tensor | ImageSource, fn, block_size: int = DEFAULT_BLOCK_SIZE):
    """fn on each block of the source, its outputs (a tensor or a tuple of them) concatenated on the
    CPU: per-image figures of a set that is never held in memory at once."""
    outs = [fn(x) for _, x in blocks(as_source(source), block_size)]
    if not outs:
        raise ValueError("per_block needs a non-empty source")
    if isinstance(outs[0], tuple):
        return tuple(torch.cat([o[k].cpu() for o in outs]) for k in range(len(outs[0])))
    return torch.cat([o.cpu() for o in outs])


def _read(source: ImageSource, start: int, block_size: int, device=None) -> Tensor:
    x = source.block(start, min(start + block_size, len(source)))
    return x if device is None else x.to(device)


def blocks(source: ImageSource, block_size: int, device=None) -> Iterator[tuple[int, Tensor]]:
    """(start, block) over the whole source, each block on `device`."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    for start in range(0, len(source), block_size):
        yield start, _read(source, start, block_size, device)


# Carlini et al. 2023, Sec. 4.2: the clique filter's graph, edges (i < j) between generations whose
# tiled l2 is below threshold, from block pairs (I <= J): two blocks in memory at a time.
def stream_tiled_edges(
    source: Tensor | ImageSource, threshold: float, tiles: int = 4, block_size: int = FILTER_BLOCK_SIZE,
    device=None,
) -> tuple[Tensor, Tensor, Tensor]:
    source = as_source(source)
    found = []
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    following = None  # the next row block, kept from the previous row's last column block
    for i0 in range(0, len(source), block_size):
        a = following if following is not None else EdgeBlock(_read(source, i0, block_size, device))
        i, j, d = (t.cpu() for t in tiled_edges(a, a, threshold, tiles, upper=True))
        found.append([i + i0, j + i0, d])
        following = None
        # Column blocks last to first, so the last one is the next row block: built once, used twice.
        for j0 in reversed(range(i0 + block_size, len(source), block_size)):
            b = EdgeBlock(_read(source, j0, block_size, device))
            i, j, d = (t.cpu() for t in tiled_edges(a, b, threshold, tiles))
            found.append([i + i0, j + j0, d])
            following = b
    if not found:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0)
    i, j, d = (torch.cat(parts) for parts in zip(*found))
    order = torch.argsort(i * len(source) + j)  # sorted by (i, j), as thresholding one matrix gives
    return i[order], j[order], d[order]


@dataclass
class Nearest:
    """Both directions of one generations x training pass (normalized l2)."""

    distance: Tensor  # [N_a] distance of each row of a to its nearest row of b
    index: Tensor  # [N_a] long
    reverse_distance: Tensor  # [N_b] distance of each row of b to its nearest row of a
    reverse_index: Tensor  # [N_b] long


def _update(best_d: Tensor, best_i: Tensor, d: Tensor, i: Tensor) -> None:
    """Keep the running minimum; on a tie the earlier block's (lower) index stays."""
    better = d < best_d
    best_d[better], best_i[better] = d[better], i[better]


# Carlini et al. 2023, Sec. 4.2 and Def. 1: nearest training image of each generation and nearest
# generation of each training image, in one pass over (generation block, training block) pairs.
def stream_nearest(
    a: Tensor | ImageSource, b: Tensor | ImageSource, block_size: int = DEFAULT_BLOCK_SIZE, device=None
) -> Nearest:
    a, b = as_source(a), as_source(b)
    if len(b) == 0 or len(a) == 0:
        raise ValueError(f"nearest needs two non-empty sets, got {len(a)} and {len(b)} images")
    out = None
    for i0, xa in blocks(a, block_size, device):
        for j0, xb in blocks(b, block_size, device):
            # Float32 unless an input is float64, as in distances.normalized_l2.
            dtype = torch.float64 if torch.float64 in (xa.dtype, xb.dtype) else torch.float32
            rows, block = _l2_block_fn(xa.to(dtype), xb.to(dtype))
            d = block(rows).cpu()
            if out is None:
                out = Nearest(torch.full((len(a),), float("inf"), dtype=dtype), torch.zeros(len(a), dtype=torch.long),
                              torch.full((len(b),), float("inf"), dtype=dtype), torch.zeros(len(b), dtype=torch.long))
            d_row, j = d.min(1)
            _update(out.distance[i0 : i0 + len(xa)], out.index[i0 : i0 + len(xa)], d_row, j + j0)
            d_col, i = d.min(0)
            _update(out.reverse_distance[j0 : j0 + len(xb)], out.reverse_index[j0 : j0 + len(xb)], d_col, i + i0)
    return out
