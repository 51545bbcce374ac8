"""Corruption operators A and the corrupted training set the model is allowed to see.

The defense rests on one invariant: a training image's clean pixels outside A never reach the
model. So A is drawn once per image from a generator seeded by (seed, image index) and is the
same in every epoch, on every rank and after a resume; `CorruptedImages` keeps the clean pixels
private and only hands out A·x, A, the further-corrupted Ã = B·A, index and label.
Augmentations (augment.py) are applied to the observation and its masks together (never to the clean
image before masking, which in the official code lets different clean pixels fall under A).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import torch

from ambient.config import CORRUPTION_KINDS, MASK_KEYS
from ambient.data import ImageSet
from ambient.defenses.augment import Augment, shift  # noqa: F401  (re-exported: the augmentations' old home)
from ambient.seeding import Stream, seeded_generator


def _fmt(x) -> str:
    return f"{x:g}"


class Corruption:
    """Base operator: observe everything (A = 1). A new corruption is a subclass here (its `name`,
    the `corruption.kind` that selects it, and `from_config`), that name in config.CORRUPTION_KINDS
    (start-of-run validation stays torch-free; tests/test_architecture.py fails if the two differ)
    and a conf/corruption/*.yaml."""

    name = "none"
    masks_pixels = False  # whether A erases pixels (then the model gets a mask channel)

    @classmethod
    def from_config(cls, cfg) -> "Corruption":
        return cls()

    @property
    def label(self) -> str:
        """How the comparison table names this defense."""
        return "clean"

    def mask(self, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        return torch.ones(1, *shape)

    def observe(self, x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x * mask

    def further(self, shape: tuple[int, int], delta: float, gen: torch.Generator) -> torch.Tensor:
        """B, the further corruption (Ã = B·A): pixel dropout unless the operator says otherwise."""
        return further_mask(shape, delta, gen)


# Daras et al. 2023, random inpainting: each pixel erased with probability p, shared by channels.
@dataclass
class RandomMask(Corruption):
    p: float
    name = "mask"
    masks_pixels = True

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.p))

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

    @classmethod
    def from_config(cls, cfg):
        return cls(int(cfg.size))

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


# The official code's "box" (giannisdaras/ambient-diffusion, torch_utils/ambient_diffusion.py,
# get_box_mask): a square of side ceil(p·H) erased, its top-left corner uniform over the whole image,
# so it may hang off the edge (then less than p·H² is erased); B is a second such box of side ceil(δ·H).
@dataclass
class OfficialBox(Corruption):
    p: float
    name = "box_official"
    masks_pixels = True

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.p))

    @property
    def label(self):
        return f"box p={_fmt(self.p)} (official)"

    @staticmethod
    def _box(shape, fraction: float, gen) -> torch.Tensor:
        h, w = shape
        side_h, side_w = math.ceil(fraction * h), math.ceil(fraction * w)
        top = int(torch.randint(0, h, (1,), generator=gen))
        left = int(torch.randint(0, w, (1,), generator=gen))
        m = torch.ones(1, h, w)
        m[:, top:top + side_h, left:left + side_w] = 0
        return m

    def mask(self, shape, gen):
        return self._box(shape, self.p, gen)

    def further(self, shape, delta, gen):
        return torch.ones(1, *shape) if delta == 0 else self._box(shape, delta, gen)


# Additive Gaussian noise y = x + sigma*z, fixed per image (training on noisy observations).
@dataclass
class GaussianNoise(Corruption):
    sigma: float
    name = "noise"

    @classmethod
    def from_config(cls, cfg):
        return cls(float(cfg.sigma))

    @property
    def label(self):
        return f"noise sigma={_fmt(self.sigma)}"

    def observe(self, x, mask, gen):
        return x + self.sigma * torch.randn(x.shape, generator=gen)


def corruption_classes() -> dict[str, type[Corruption]]:
    """Every operator by its `corruption.kind`: Corruption and all its subclasses."""
    found, todo = {}, [Corruption]
    while todo:
        cls = todo.pop()
        if cls.name in found and found[cls.name] is not cls:
            raise TypeError(f"two corruptions share the kind {cls.name!r}: {found[cls.name].__name__}, {cls.__name__}")
        found[cls.name] = cls
        todo += cls.__subclasses__()
    return found


def build_corruption(cfg) -> Corruption:
    """Operator from a `corruption` config node, chosen by its kind (see corruption_classes)."""
    classes = corruption_classes()
    if cfg.kind not in classes or cfg.kind not in CORRUPTION_KINDS:
        raise ValueError(f"corruption.kind={cfg.kind!r}; allowed: {' | '.join(CORRUPTION_KINDS)}")
    return classes[cfg.kind].from_config(cfg)


def further_mask(shape, delta: float, gen: torch.Generator) -> torch.Tensor:
    """B: keep each pixel with probability 1 - delta (Ã = B·A hides some observed pixels)."""
    if delta == 0:
        return torch.ones(1, *shape)
    return (torch.rand(1, *shape, generator=gen) >= delta).float()


def sampling_mask(corruption: Corruption, delta: float, shape, gen: torch.Generator) -> torch.Tensor:
    """The mask the sampler keeps fixed along a trajectory: Ã drawn like in training."""
    return corruption.mask(shape, gen) * corruption.further(shape, delta, gen)


CONTENT = 1  # a key-tuple tag: content keys never coincide with (seed, index) keys


def content_key(image: torch.Tensor) -> int:
    """A 128-bit integer from an image's exact pixels (uint8 as stored)."""
    data = image.contiguous().numpy().tobytes() + str(tuple(image.shape)).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "big")


class CorruptedImages:
    """The training set as the model may see it: (A·x, A, Ã) per image, never the clean x."""

    def __init__(self, data: ImageSet, corruption: Corruption, seed: int, delta: float = 0.0,
                 resample_delta: bool = False, augment: Augment | None = None, with_labels: bool = False,
                 mask_key: str = "index"):
        if mask_key not in MASK_KEYS:
            raise ValueError(f"corruption.mask_key={mask_key!r}; allowed: {' | '.join(MASK_KEYS)}")
        self._clean = data.as_float()
        self.indices, self.labels = data.indices, data.labels if with_labels else None
        self.corruption, self.seed, self.delta = corruption, seed, delta
        self.resample_delta, self.augment = resample_delta, augment or Augment()
        # content: exact duplicates (the same pixels after the dataset's crop/resize) share A, B and
        # the noise of their observation, so ten copies reveal no more than one.
        self._keys = [content_key(img) for img in data.images] if mask_key == "content" else None

    def _key(self, row: int, index: int) -> tuple[int, ...]:
        """What the image's fixed draws are keyed by: (seed, index) or (seed, pixel hash, CONTENT)."""
        return (self.seed, index) if self._keys is None else (self.seed, self._keys[row], CONTENT)

    def __len__(self) -> int:
        return self._clean.shape[0]

    def item(self, row: int, step: int = 0) -> dict[str, torch.Tensor]:
        index = int(self.indices[row])
        shape = tuple(self._clean.shape[-2:])
        key = self._key(row, index)
        mask_a = self.corruption.mask(shape, seeded_generator(*key, Stream.MASK_A))
        obs = self.corruption.observe(self._clean[row], mask_a, seeded_generator(*key, Stream.NOISE))
        # B is fixed per image like A (the official code) unless resampled every step.
        b_keys = (*key, Stream.MASK_B) + ((step,) if self.resample_delta else ())
        mask_at = mask_a * self.corruption.further(shape, self.delta, seeded_generator(*b_keys))
        obs, mask_a, mask_at = self.augment([obs, mask_a, mask_at],
                                            seeded_generator(self.seed, index, Stream.AUGMENT, step))
        return {"obs": obs, "mask": mask_a, "mask_tilde": mask_at, "index": torch.tensor(index)}

    @property
    def _fixed_per_image(self) -> bool:
        """Without augmentation or a resampled B an image's item is the same at every step."""
        return not self.resample_delta and not any(getattr(self.augment, f.name) for f in fields(self.augment))

    def batch(self, rows, step: int = 0) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if self._fixed_per_image:
            out = self._cached_batch(index)
        else:
            items = [self.item(r, step) for r in index.tolist()]
            out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        if self.labels is not None:  # what the model is conditioned on (captions: ambient.text)
            out["cond"] = self.labels[index]
        return out

    def _cached_batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """item(row) for fixed images, computed once per image and then indexed: drawing A, B and the
        observation per image and step cost ~1 ms per image, more than a GPU step of a small UNet
        (benchmarks/step_overhead.py). Masks are stored as bool. After the first epoch a batch is three
        gathers: no per-row Python (that alone was most of the ambient step's overhead on a GPU)."""
        if not hasattr(self, "_cache"):
            n, (c, h, w) = len(self), tuple(self._clean.shape[1:])
            self._cache = {"obs": torch.zeros(n, c, h, w), "mask": torch.zeros(n, 1, h, w, dtype=torch.bool),
                           "mask_tilde": torch.zeros(n, 1, h, w, dtype=torch.bool), "filled": torch.zeros(n, dtype=torch.bool)}
        cache = self._cache
        for row in dict.fromkeys(index[~cache["filled"][index]].tolist()):
            item = self.item(row)
            if not all(((m == 0) | (m == 1)).all() for m in (item["mask"], item["mask_tilde"])):
                raise ValueError("masks must be 0/1 to be cached as bool")
            cache["obs"][row], cache["mask"][row], cache["mask_tilde"][row] = item["obs"], item["mask"], item["mask_tilde"]
            cache["filled"][row] = True
        return {"obs": cache["obs"][index], "mask": cache["mask"][index].float(),
                "mask_tilde": cache["mask_tilde"][index].float(), "index": self.indices[index].clone()}
