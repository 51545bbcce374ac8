"""Copies under noise: Definition 1 distances after a low-pass, for runs whose generations carry noise.

    python benchmarks/denoised_copies.py naive02=outputs/RUN_A ambient02=outputs/RUN_B --lowpass 1.0

A model trained on noisy observations can reproduce a training image *with noise on top*; the
attack's pixel l2 then counts the noise as distance and calls nothing extracted. For each run
(a run dir evaluated with a held-out null, `eval/samples/*/*.png`), per training image: the
normalized l2 to its nearest generation and to its nearest held-out real image (the null), both
sides Gaussian-low-passed (sigma in px, edges repeated; 0 = the attack's own distance). Printed:
medians, how many training images a generation reaches closer than the null reaches *any* training
image (the calibrated-delta rule with no null extraction allowed), and how many are closer to a
generation than to their nearest unseen image. The low-pass also blurs the null, so the comparison
stays like for like.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from ambient.attack.distances import nearest
from ambient.attack.run import calibrated_delta, lowpass_extraction
from ambient.attack.streaming import PngFiles
from ambient.data import load_dataset


def nearest_distances(members, generations, null, sigma: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per training image: distance to its nearest generation and to its nearest null image, both sides
    low-passed by sigma px (the report's attack.lowpass, run.lowpass_extraction), and the calibrated delta."""
    if sigma > 0:
        found = lowpass_extraction(generations, null, members, sigma)
        return torch.tensor(found["train_to_generation"]), torch.tensor(found["train_to_reference"]), found["delta"]
    to_gen, to_null = nearest(members, generations, k=1)[0].flatten(), nearest(members, null, k=1)[0].flatten()
    return to_gen, to_null, calibrated_delta(to_null)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR")
    ap.add_argument("--lowpass", type=float, nargs="+", default=[0.0, 1.0], help="sigmas in px (0: none)")
    args = ap.parse_args()
    for arg in args.runs:
        name, run = arg.split("=", 1)
        run = Path(run)
        cfg = OmegaConf.load(run / "config.yaml")
        data, split = load_dataset(cfg.dataset), json.loads((run / "split.json").read_text())
        members = data.images[torch.tensor(split["members"])].float() / 255
        null = data.images[torch.tensor(split["holdout"])].float() / 255
        files = sorted((run / "eval" / "samples").glob("*/*.png"))
        generations = PngFiles(files).block(0, len(files)).float()
        figures = []
        for sigma in args.lowpass:
            to_gen, to_null, delta = nearest_distances(members, generations, null, sigma)
            figures.append(f"lowpass {sigma:g}: median {to_gen.median():.3f} (null {to_null.median():.3f}), "
                           f"below the null's closest {int((to_gen <= delta).sum())}/{len(to_gen)}, "
                           f"closer than own null neighbour {int((to_gen < to_null).sum())}/{len(to_gen)}")
        print(f"{name}: " + " | ".join(figures), flush=True)


if __name__ == "__main__":
    main()
