"""Every random stream of the project, and the one way to seed it.

A random draw is a pure function of integer keys: (seed, image index or sample position, stream,
then e.g. step or draw). Each kind of randomness has its own `Stream`, so adding one never shifts
another; the numbers are part of every saved run (changing one changes which pixels a mask hides),
so they never change: add new streams with new numbers.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    MASK_A = 0          # corruption A, per image (fixed for the whole run)
    MASK_B = 1          # further corruption B, per image (and per step with resample_delta)
    NOISE = 2           # the fixed noise of corruption=noise, per image
    AUGMENT = 3         # flips and shifts, per (image, step)
    SAMPLE = 10         # a generated sample's noise and sampling mask, per (seed, position)
    ORDER = 20          # the per-epoch permutation of the training set
    POISSON = 21        # DP-SGD's Poisson-sampled batch, per step
    MIA = 30            # membership inference noise and mask, per (image, draw)
    MIA_PROBE = 31      # SecMI / PIA: the sampling mask of a deterministic probe, per (image, draw)
    CAPTION_TEXT = 40   # caption randomization, per (image, step)
    CAPTION_NOISE = 41  # Gaussian noise on caption embeddings, per (image, step)
    NULL = 50           # which held-out / reference images form the null reference
    INPAINT = 60        # the reconstruction attack: hidden region, and each completion's draws
    CANARY = 70         # a canary's pattern (dataset.duplicate kind=canary), per canary id
    DUPLICATE = 80      # which images dataset.duplicate copies (its own stream: see plant_duplicates)


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator determined by integer keys (seed, index, stream, ...), collision-safe."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def plain_generator(seed: int) -> torch.Generator:
    """torch.Generator().manual_seed(seed): the member/holdout split was drawn this way before streams
    existed; kept so saved runs rebuild the same sets."""
    return torch.Generator().manual_seed(int(seed))
