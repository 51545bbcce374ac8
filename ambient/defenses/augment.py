"""Augmentations of the observation the model trains on, applied to (A·x, A, Ã) together.

The seeds of this defense: "rework the training images by adding noise or altering brightness".
Geometric ones (flip, shift, random crop resized back by nearest neighbour) move every tensor with
the same pixel map, so an observed pixel stays observed and a hidden one stays hidden (shifted-in
pixels are unobserved). Photometric ones (brightness, contrast, Gaussian pixel noise) change the
observed pixels only and multiply by A afterwards: no clean pixel outside A, and no value made up
there, ever reaches the model (tests/test_corruption.py checks each augmentation). All draws come
from the (seed, image index, step) generator, after the flip and shift draws, so runs without the
newer options are bit-identical to before.

    python train.py train.augment.brightness=0.2 train.augment.noise=0.1 train.augment.crop=0.25
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels with zero fill (zeros in a mask mean 'not observed')."""
    if dy == 0 and dx == 0:
        return t
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        t[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


@dataclass
class Augment:
    """Applied to [observation, A, Ã] (the observation first, then its masks, A second)."""

    hflip: float = 0.0       # probability of a horizontal flip
    max_shift: int = 0       # integer shifts in [-max_shift, max_shift] pixels
    brightness: float = 0.0  # add b ~ U(-brightness, brightness) to the observed pixels (data in [-1, 1])
    contrast: float = 0.0    # scale observed pixels about their mean by c ~ U(1 - contrast, 1 + contrast)
    noise: float = 0.0       # add N(0, noise²) per observed pixel, fresh every step
    crop: float = 0.0        # keep a random square of side in [(1 - crop)·H, H], resized back (nearest)

    def __call__(self, tensors: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        flip = bool(torch.rand((), generator=gen) < self.hflip)
        dy, dx = (torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=gen).tolist()
                  if self.max_shift else (0, 0))
        out = [shift(t.flip(-1) if flip else t, dy, dx) for t in tensors]
        if self.crop:
            out = self._crop(out, gen)
        if self.brightness or self.contrast or self.noise:
            out[0] = self._photometric(out[0], out[1], gen)
        return out

    def _crop(self, tensors, gen):
        h, w = tensors[0].shape[-2:]
        side = int(torch.randint(math.ceil((1 - self.crop) * min(h, w)), min(h, w) + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        rows = top + torch.arange(h) * side // h  # nearest neighbour: each output pixel copies one input pixel
        cols = left + torch.arange(w) * side // w
        return [t[..., rows, :][..., cols] for t in tensors]

    def _photometric(self, obs, mask, gen):
        seen = mask.expand_as(obs)
        if self.contrast:
            c = _uniform(gen, 1 - self.contrast, 1 + self.contrast)
            mean = (obs * seen).sum() / seen.sum().clamp_min(1)  # over observed pixels only
            obs = (obs - mean) * c + mean
        if self.brightness:
            obs = obs + _uniform(gen, -self.brightness, self.brightness)
        if self.noise:
            obs = obs + self.noise * torch.randn(obs.shape, generator=gen)
        return obs * seen  # nothing outside A: not the clean pixel, not a made-up value


def build_augment(cfg) -> Augment:
    """From a `train.augment` node (options it lacks are off)."""
    if cfg is None:
        return Augment()
    return Augment(**{k: type(getattr(Augment, k))(cfg[k]) for k in Augment.__dataclass_fields__ if cfg.get(k) is not None})


def augment_label(cfg) -> str:
    """How the comparison table names a `train.augment` node ("" when nothing is on)."""
    if not isinstance(cfg, dict):
        return ""
    names = {"hflip": "flip {:g}", "max_shift": "shift {:g}px", "brightness": "brightness {:g}",
             "contrast": "contrast {:g}", "noise": "pixel noise {:g}", "crop": "crop {:g}"}
    parts = [fmt.format(cfg[k]) for k, fmt in names.items() if cfg.get(k)]
    return f"augment ({', '.join(parts)})" if parts else ""
