"""Membership attacks' cost: images/s of each attack in mia.attacks, against the loss attack, same run.

    python benchmarks/mia_attacks.py                          # unet_tiny, 16x16 digits-sized, CPU
    python benchmarks/mia_attacks.py --n 256 --corruption mask --device cuda

The model is the digits study's architecture (conf/model/unet_tiny.yaml, class-conditional, EDM),
untrained: cost does not depend on the weights. Each attack runs with evaluate.py's defaults
(conf/evaluate.yaml, mia.*) on the same n images; the printed ratio is the attack's time over the
loss attack's (mia.draws noise draws at one t), so "x4.9" means a report pays 4.9 loss attacks for it.
A report scores members and held-out images: its cost is (members + non-members) / (images/s).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from omegaconf import OmegaConf

from ambient.attack.inversion import pia_scores, secmi_scores
from ambient.attack.membership import loss_scores, loss_scores_over_t
from ambient.models import build_model
from ambient.pipeline import AmbientPipeline

REPO = Path(__file__).resolve().parents[1]


# Purpose: the study's model, untrained, as load_run would build it.
def make_model(corruption: str, device: str) -> AmbientPipeline:
    masked = corruption == "mask"
    cfg = OmegaConf.load(REPO / "conf/model/unet_tiny.yaml")
    cfg.conditional = True
    unet = build_model(cfg, 1, 16, masked, 10)
    settings = {"objective": "edm", "mask_channel": masked, "channels": 1, "resolution": 16, "num_classes": 10,
                "corruption": {"kind": "mask", "p": 0.9, "delta": 0.05} if masked else {"kind": "none"},
                "delta": 0.05 if masked else 0.0, "sigma_data": 0.5}
    return AmbientPipeline(unet, ambient=settings).to(device)


# Purpose: time every attack on the same images, print images/s and the ratio to the loss attack.
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images scored by each attack")
    parser.add_argument("--corruption", choices=("none", "mask"), default="none")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    mia = OmegaConf.load(REPO / "conf/evaluate.yaml").mia
    model = make_model(args.corruption, args.device)
    torch.manual_seed(0)
    x, ids, labels = torch.rand(args.n, 1, 16, 16) * 2 - 1, list(range(args.n)), torch.arange(args.n) % 10
    attacks = {
        f"loss (t={mia.timestep}, {mia.draws} draws)": lambda: loss_scores(model, x, ids, mia.timestep, mia.draws,
                                                                           cond=labels),
        f"loss_multi_t ({len(mia.multi_t.timesteps)} t x {mia.draws} draws)": lambda: loss_scores_over_t(
            model, x, ids, list(mia.multi_t.timesteps), mia.draws, cond=labels),
        f"secmi (t_sec={mia.secmi.t_sec}, k={mia.secmi.interval})": lambda: secmi_scores(
            model, x, ids, mia.secmi.t_sec, mia.secmi.interval, cond=labels, mask_draws=mia.mask_draws),
        f"pia (t={mia.pia.timestep})": lambda: pia_scores(model, x, ids, mia.pia.timestep, mia.pia.p, cond=labels,
                                                         mask_draws=mia.mask_draws),
    }
    loss_scores(model, x[:8], ids[:8], 100, 1, cond=labels[:8])  # warm-up
    print(f"{args.n} images, unet_tiny 16x16, corruption={args.corruption}, device={args.device}, "
          f"torch threads={torch.get_num_threads()}")
    baseline = None
    for name, run in attacks.items():
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        baseline = baseline or seconds
        print(f"{name:34s} {args.n / seconds:8.1f} images/s   x{seconds / baseline:.2f} the loss attack's time")


if __name__ == "__main__":
    main()
