"""Canaries: seeded synthetic patterns unlike the data, planted m times in a training set (dataset.duplicate
with kind=canary), and reference patterns of the same kind that are never planted.

Carlini et al. 2019 ("The Secret Sharer") measure a model's memorization of an inserted secret by its
*exposure*: the rank of its loss among same-kind candidates that were not inserted; Carlini et al. 2023
(Sec. 4-5) show that images duplicated in training are extracted far more. A canary here is a random
binary code of GRID x GRID blocks (each channel independently), drawn from (seed, canary id, CANARY):
high-contrast and blocky, unlike natural images or digits. Canaries 0 .. k·len(times) − 1 are planted
(`count` for each value m of `times`, each m times); the next `references` ids are the reference
canaries, drawn the same way and never planted. Everything is a function of the config, so the
evaluator rebuilds the exact canaries and references from a run's saved dataset settings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ambient.seeding import Stream, seeded_generator

GRID = 8  # blocks per side (fewer when the image is smaller)
DEFAULT_REFERENCES = 64


def planted_times(cfg) -> list[int]:
    times = cfg["times"]
    return [int(times)] if isinstance(times, int) else [int(m) for m in times]


def canary_plan(cfg) -> list[tuple[int, int]]:
    """(canary id, times planted) of every planted canary: ids 0, 1, ... — `count` per value of `times`."""
    count = int(cfg["count"])
    return [(j * count + c, m) for j, m in enumerate(planted_times(cfg)) for c in range(count)]


def reference_ids(cfg) -> list[int]:
    """The ids of the reference canaries: after the planted ones, never planted."""
    start = int(cfg["count"]) * len(planted_times(cfg))
    return list(range(start, start + int(cfg.get("references") or DEFAULT_REFERENCES)))


def canary_patterns(ids, seed: int, channels: int, resolution: int) -> torch.Tensor:
    """(N, C, H, W) uint8 in {0, 255}: canary i is a GRID x GRID random binary code per channel, drawn from
    (seed, i, CANARY) alone (so it does not depend on which other canaries are drawn), blocks upsampled."""
    grid = min(GRID, resolution)
    codes = torch.stack([(torch.rand(channels, grid, grid, generator=seeded_generator(seed, int(i), Stream.CANARY))
                          < 0.5).float() for i in ids])
    return (F.interpolate(codes, size=(resolution, resolution), mode="nearest") * 255).to(torch.uint8)


def canary_label(canary_id: int, num_classes: int) -> int:
    """The class a canary is planted (and attacked) with in a labelled dataset."""
    return int(canary_id) % num_classes


def canary_caption(canary_id: int) -> str:
    """The caption a canary is planted (and attacked) with in a captioned dataset: its own, like a secret."""
    return f"a canary pattern number {int(canary_id)}"
