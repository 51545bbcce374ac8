"""Image files: grids people look at, and [-1, 1] / [0, 1] / uint8 conversions."""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, min_tile: int = 64) -> Path:
    """Save [0, 1] images as a grid; small images are upscaled (nearest) so the grid is legible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, math.ceil(min_tile / images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    save_image(make_grid(images, nrow=nrow, padding=2, pad_value=1.0), path)
    return path


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), radius ceil(3 sigma), edges repeated: two small matmuls
    (a grouped conv2d with a 1 x 13 kernel is ~30x slower on CPU)."""
    h, w = x.shape[-2:]
    return _blur_matrix(h, sigma).to(x.dtype) @ x @ _blur_matrix(w, sigma).to(x.dtype).T


@lru_cache(maxsize=32)
def _blur_matrix(length: int, sigma: float) -> torch.Tensor:
    """(length, length) matrix of a 1-d Gaussian blur with repeated edges: row i weighs pixel
    clamp(i + t) by exp(-t^2 / 2 sigma^2), normalized."""
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    rows = torch.arange(length).repeat_interleave(len(t))
    cols = (torch.arange(length)[:, None] + t.long()[None]).clamp(0, length - 1).reshape(-1)
    m = torch.zeros(length, length, dtype=torch.float64)
    m.index_put_((rows, cols), k.repeat(length), accumulate=True)
    return m.float()
