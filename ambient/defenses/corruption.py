"""Corruption operators A and the corrupted training set the model is allowed to see.

The defense rests on one invariant: a training image's clean pixels outside A never reach the
model. So A is drawn once per image from a generator seeded by (seed, image index) and is the
same in every epoch, on every rank and after a resume; `CorruptedImages` keeps the clean pixels
private and only hands out A·x, A, the further-corrupted Ã = B·A, index and label.
Augmentations are applied to the observation and its masks together (never to the clean image
before masking, which in the official code lets different clean pixels fall under A).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ambient.config import CORRUPTION_KINDS
from ambient.data import ImageSet
from ambient.seeding import Stream, seeded_generator


def _fmt(x) -> str:
    return f"{x:g}"


class Corruption:
    """Base operator: observe everything (A = 1). A new corruption is a subclass here, a branch in
    `build_corruption` (its kind in config.CORRUPTION_KINDS) and a conf/corruption/*.yaml."""

    name = "none"
    masks_pixels = False  # whether A erases pixels (then the model gets a mask channel)

    @property
    def label(self) -> str:
        """How the comparison table names this defense."""
        return "clean"

    def mask(self, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        return torch.ones(1, *shape)

    def observe(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x * mask


# Daras et al. 2023, random inpainting: each pixel erased with probability p, shared by channels.
@dataclass
class RandomMask(Corruption):
    p: float
    name = "mask"
    masks_pixels = True

    @property
    def label(self):
        return f"mask p={_fmt(self.p)}"

    def mask(self, shape, gen):
        return (torch.rand(1, *shape, generator=gen) >= self.p).float()


# A random size×size square erased (block inpainting).
@dataclass
class BoxMask(Corruption):
    size: int
    name = "box"
    masks_pixels = True

    @property
    def label(self):
        return f"box {self.size}px"

    def mask(self, shape, gen):
        h, w = shape
        top = int(torch.randint(0, h - self.size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - self.size + 1, (1,), generator=gen))
        m = torch.ones(1, h, w)
        m[:, top:top + self.size, left:left + self.size] = 0
        return m


# Additive Gaussian noise y = x + sigma*z, fixed per image (training on noisy observations).
@dataclass
class GaussianNoise(Corruption):
    sigma: float
    name = "noise"

    @property
    def label(self):
        return f"noise sigma={_fmt(self.sigma)}"

    def observe(self, x, mask, gen):
        return x + self.sigma * torch.randn(x.shape, generator=gen)


def build_corruption(cfg) -> Corruption:
    """Operator from a `corruption` config node (kind: none | mask | box | noise)."""
    kinds = {
        "none": lambda: Corruption(),
        "mask": lambda: RandomMask(float(cfg.p)),
        "box": lambda: BoxMask(int(cfg.size)),
        "noise": lambda: GaussianNoise(float(cfg.sigma)),
    }
    assert set(kinds) == set(CORRUPTION_KINDS)
    if cfg.kind not in kinds:
        raise ValueError(f"corruption.kind={cfg.kind!r}; allowed: {' | '.join(CORRUPTION_KINDS)}")
    return kinds[cfg.kind]()


def further_mask(shape, delta: float, gen: torch.Generator) -> torch.Tensor:
    """B: keep each pixel with probability 1 - delta (Ã = B·A hides some observed pixels)."""
    if delta == 0:
        return torch.ones(1, *shape)
    return (torch.rand(1, *shape, generator=gen) >= delta).float()


def sampling_mask(corruption: Corruption, delta: float, shape, gen: torch.Generator) -> torch.Tensor:
    """The mask the sampler keeps fixed along a trajectory: Ã drawn like in training."""
    return corruption.mask(shape, gen) * further_mask(shape, delta, gen)


@dataclass
class Augment:
    """Flips and integer shifts applied jointly to (observation, A, Ã); shifted-in pixels are unobserved."""

    hflip: float = 0.0
    max_shift: int = 0

    def __call__(self, tensors: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
        flip = bool(torch.rand((), generator=gen) < self.hflip)
        dy, dx = (torch.randint(-self.max_shift, self.max_shift + 1, (2,), generator=gen).tolist()
                  if self.max_shift else (0, 0))
        return [shift(t.flip(-1) if flip else t, dy, dx) for t in tensors]


def shift(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate by (dy, dx) pixels with zero fill (zeros in a mask mean 'not observed')."""
    if dy == 0 and dx == 0:
        return t
    out = torch.zeros_like(t)
    h, w = t.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        t[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class CorruptedImages:
    """The training set as the model may see it: (A·x, A, Ã) per image, never the clean x."""

    def __init__(self, data: ImageSet, corruption: Corruption, seed: int, delta: float = 0.0,
                 resample_delta: bool = False, augment: Augment | None = None, with_labels: bool = False):
        self._clean = data.as_float()
        self.indices, self.labels = data.indices, data.labels if with_labels else None
        self.corruption, self.seed, self.delta = corruption, seed, delta
        self.resample_delta, self.augment = resample_delta, augment or Augment()

    def __len__(self) -> int:
        return self._clean.shape[0]

    def item(self, row: int, step: int = 0) -> dict[str, torch.Tensor]:
        index = int(self.indices[row])
        shape = tuple(self._clean.shape[-2:])
        mask_a = self.corruption.mask(shape, seeded_generator(self.seed, index, Stream.MASK_A))
        obs = self.corruption.observe(self._clean[row], mask_a, seeded_generator(self.seed, index, Stream.NOISE))
        # B is fixed per image like A (the official code) unless resampled every step.
        b_keys = (self.seed, index, Stream.MASK_B) + ((step,) if self.resample_delta else ())
        mask_at = mask_a * further_mask(shape, self.delta, seeded_generator(*b_keys))
        obs, mask_a, mask_at = self.augment([obs, mask_a, mask_at],
                                            seeded_generator(self.seed, index, Stream.AUGMENT, step))
        return {"obs": obs, "mask": mask_a, "mask_tilde": mask_at, "index": torch.tensor(index)}

    def batch(self, rows, step: int = 0) -> dict[str, torch.Tensor]:
        items = [self.item(int(r), step) for r in rows]
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if self.labels is not None:  # what the model is conditioned on (captions: ambient.text)
            out["cond"] = self.labels[torch.as_tensor(rows, dtype=torch.long)]
        return out
