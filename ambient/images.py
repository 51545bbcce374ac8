"""Image files: grids people look at, and [-1, 1] / [0, 1] / uint8 conversions."""
from __future__ import annotations

import math
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
