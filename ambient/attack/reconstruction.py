"""Reconstruction attack: show the model part of an image and ask for the rest (Carlini et al. 2023,
Sec. 6, inpainting attack). An ambient model is an inpainter by construction, so this is the
natural adaptive attack on it: if it memorized a training image, it completes that image's hidden
region far better than an unseen image's.

For each image: hide a region, draw `samples` completions with the model (`inpaint`, a public
method of the trained model), score the best one by normalized ℓ2 on the hidden pixels only
(pixels in [0, 1]). Members vs held-out non-members give AUC / TPR at low FPR (lower = member);
"reconstructed" = best completion within δ on the hidden region.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ambient.config import INPAINT_REGIONS as REGIONS
from ambient.seeding import Stream, seeded_generator


def hidden_region(region: str, shape: tuple[int, int], fraction: float = 0.5,
                  gen: torch.Generator | None = None) -> Tensor:
    """(1, H, W) mask, 1 where the attacker *shows* the pixel: a half (left/right/top/bottom, `fraction`
    of the width or height hidden), a centred box of `fraction` of the area, or random pixels."""
    h, w = shape
    keep = torch.ones(1, h, w)
    if region in ("left", "right"):
        cols = max(1, round(fraction * w))
        if region == "left":
            keep[..., :, :cols] = 0
        else:
            keep[..., :, w - cols:] = 0
    elif region in ("top", "bottom"):
        rows = max(1, round(fraction * h))
        if region == "top":
            keep[..., :rows, :] = 0
        else:
            keep[..., h - rows:, :] = 0
    elif region == "center":
        side_h, side_w = max(1, round(h * fraction ** 0.5)), max(1, round(w * fraction ** 0.5))
        top, left = (h - side_h) // 2, (w - side_w) // 2
        keep[..., top:top + side_h, left:left + side_w] = 0
    elif region == "random":
        keep = (torch.rand(1, h, w, generator=gen) >= fraction).float()
    else:
        raise ValueError(f"attack.inpaint.region={region!r}; allowed: {' | '.join(REGIONS)}")
    return keep


def hidden_l2(completions: Tensor, truth: Tensor, keep: Tensor) -> Tensor:
    """Normalized ℓ2 over the hidden pixels (all channels), images in [-1, 1] compared in [0, 1]:
    completions (B, S, C, H, W), truth (B, C, H, W), keep (B, 1, H, W) -> (B, S)."""
    hidden = (1 - keep)[:, None].expand_as(completions)
    diff = ((completions - truth[:, None]) / 2) ** 2 * hidden
    count = hidden.flatten(2).sum(-1).clamp_min(1)
    return (diff.flatten(2).sum(-1) / count).sqrt()


@torch.no_grad()
def reconstruction_scores(model, images: Tensor, indices, region: str, fraction: float, samples: int,
                          seed: int = 0, cond=None, num_steps: int | None = None, batch_size: int = 64,
                          cfg_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Best-of-`samples` hidden-region distance per image (lower = better reconstructed), the keep
    masks, and the best completions. Every draw is keyed by (seed, image index, completion), so a
    score does not depend on the batch. cond: class labels (B,) or one caption per image."""
    images = images.float()
    shape = tuple(images.shape[-2:])
    indices = [int(i) for i in indices]
    keep = torch.stack([hidden_region(region, shape, fraction, seeded_generator(seed, i, Stream.INPAINT))
                        for i in indices])
    rows = [(r, s) for r in range(len(images)) for s in range(samples)]
    completions = torch.empty(len(images), samples, *images.shape[1:])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        r = torch.tensor([row for row, _ in chunk])
        gens = [seeded_generator(seed, indices[row], Stream.INPAINT, 1 + s) for row, s in chunk]
        labels = None if cond is None or isinstance(cond, (list, tuple)) else torch.as_tensor(cond)[r]
        captions = [cond[row] for row, _ in chunk] if isinstance(cond, (list, tuple)) else None
        out = model.inpaint(images[r], keep[r], gens, labels=labels, captions=captions, num_steps=num_steps,
                            cfg_scale=cfg_scale)
        for (row, s), image in zip(chunk, out):
            completions[row, s] = image
    distance = hidden_l2(completions, images, keep)
    best = distance.argmin(1)
    return distance.min(1).values, keep, completions[torch.arange(len(images)), best]
