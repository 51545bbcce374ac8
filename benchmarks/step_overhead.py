"""What the ambient training step costs over a plain diffusers-style EDM step, in one run.

    python benchmarks/step_overhead.py                          # CPU: 32x32, batch 128, unet_tiny
    python benchmarks/step_overhead.py --device cuda            # GPU (and --compile / --channels-last)
    python benchmarks/step_overhead.py --batch 32 --resolution 16 --repeats 5

Both steps use the same UNet widths, batch, resolution, optimizer and σ distribution; they are timed
alternately (plain, ambient, plain, ...) so a busy machine slows both alike. Plain: clean uint8
images from memory, EDM loss, no mask. Ambient (corruption=mask90): the project's data path
(CorruptedImages: A, Ã and the observation of each image) and AmbientEDMLoss (the UNet has one more
input channel, the mask). Printed: median step time, samples/s, `overhead: N%` (ambient over plain)
and the share of each step spent preparing the batch.

Steady state by default: each image's fixed draws (A, Ã, the observation) are computed once, in the
first epoch, and cached (CorruptedImages); the benchmark fills that cache before timing and prints
its one-time cost. `--cold-cache` times the first epoch instead (what the first
images/batch steps of a run pay).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from omegaconf import OmegaConf

from ambient.data import ImageSet
from ambient.defenses.corruption import CorruptedImages, build_corruption
from ambient.losses import AmbientEDMLoss
from ambient.models import build_unet
from ambient.precond import EDMPrecond
from ambient.training import micro_batch_rows

UNET = OmegaConf.create({"kind": "unet", "block_out_channels": [32, 64], "attention_levels": [False, True],
                         "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8, "dropout": 0.0})
MASK90 = OmegaConf.create({"kind": "mask", "p": 0.9, "delta": 0.1, "resample_delta": False, "mask_key": "index"})


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--images", type=int, default=2048, help="training-set size (uint8 in memory)")
    ap.add_argument("--repeats", type=int, default=8, help="timed steps of each kind; medians are reported")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    ap.add_argument("--channels-last", action="store_true", help="channels_last memory format for both")
    ap.add_argument("--fused", default="auto", help="masked loss: auto (Triton on CUDA from 2**22 elements) | on | off")
    ap.add_argument("--cold-cache", action="store_true",
                    help="do not pre-fill the per-image draw cache: time first-epoch steps")
    ap.add_argument("--fused-too", action="store_true",
                    help="also time the ambient step with the Triton masked loss forced on (fused='on') vs --fused")
    return ap.parse_args()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Plain:
    """A diffusers-example-style EDM step on clean images (Karras et al. 2022 loss, mean over pixels)."""

    def __init__(self, images: torch.Tensor, args, device):
        torch.manual_seed(0)
        self.images, self.args, self.device = images, args, device
        self.unet = build_unet(UNET, args.channels, args.resolution, mask_channel=False).to(device)
        self.net = EDMPrecond(self.unet, 0.5, mask_channel=False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)

    def batch(self, step):
        rows = micro_batch_rows(step, self.args.batch, len(self.images), 0)
        return {"x": (self.images[rows].float() / 127.5 - 1).to(self.device, non_blocking=True)}

    def loss(self, batch):
        x = batch["x"]
        sigma = (torch.randn(x.shape[0], device=x.device) * 1.2 - 1.2).exp()
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        D = self.net(x + torch.randn_like(x) * sigma.reshape(-1, 1, 1, 1), sigma)
        return (weight.reshape(-1, 1, 1, 1) * (D - x) ** 2).mean()


class Ambient:
    """The project's step for corruption=mask90: CorruptedImages batches, AmbientEDMLoss."""

    def __init__(self, images: torch.Tensor, args, device, fused: str | None = None):
        torch.manual_seed(0)
        data = ImageSet(images=images, indices=torch.arange(len(images)))
        self.args, self.device = args, device
        self.dataset = CorruptedImages(data, build_corruption(MASK90), seed=0, delta=0.1)
        self.unet = build_unet(UNET, args.channels, args.resolution, mask_channel=True).to(device)
        self.net = EDMPrecond(self.unet, 0.5, mask_channel=True, hidden_precond="sigma_data")  # conf/loss/edm.yaml
        self.loss_fn = AmbientEDMLoss(fused=fused or args.fused)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4)

    def fill_cache(self) -> float:
        """Draw and cache every image's fixed A, Ã and observation (a run's first epoch); seconds."""
        start = time.perf_counter()
        self.dataset.batch(range(len(self.dataset)))
        return time.perf_counter() - start

    def batch(self, step):
        rows = micro_batch_rows(step, self.args.batch, len(self.dataset), 0)
        return {k: v.to(self.device, non_blocking=True) for k, v in self.dataset.batch(rows, step).items()}

    def loss(self, batch):
        return self.loss_fn(self.net, batch["obs"], batch["mask"], batch["mask_tilde"]).mean()


def timed_step(model, step, device) -> tuple[float, float]:
    """(seconds for the whole step, seconds preparing the batch)."""
    _sync(device)
    start = time.perf_counter()
    batch = model.batch(step)
    _sync(device)
    prepared = time.perf_counter()
    loss = model.loss(batch)
    loss.backward()
    model.opt.step()
    model.opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start, prepared - start


def main():
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.images, args.channels, args.resolution, args.resolution), dtype=torch.uint8)
    models = {"plain": Plain(images, args, device), "ambient": Ambient(images, args, device)}
    if args.fused_too:
        models["ambient_fused"] = Ambient(images, args, device, fused="on")
    for model in models.values():
        if args.channels_last:
            model.unet.to(memory_format=torch.channels_last)
        if args.compile:
            model.net.unet = model.unet = torch.compile(model.unet)
    fill = None if args.cold_cache else models["ambient"].fill_cache()
    if "ambient_fused" in models and fill is not None:
        models["ambient_fused"].fill_cache()
    times = {name: [] for name in models}
    prep_share = {name: [] for name in models}
    for step in range(args.warmup + args.repeats):
        for name, model in models.items():
            total, prep = timed_step(model, step, device)
            if step >= args.warmup:
                times[name].append(total)
                prep_share[name].append(prep / total)
    p, a = statistics.median(times["plain"]), statistics.median(times["ambient"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}, {args.channels}x{args.resolution}x"
          f"{args.resolution}, {args.images} images; compile={args.compile}, channels_last={args.channels_last}; "
          f"draw cache {'cold (first epoch)' if fill is None else 'filled before timing'}")
    if fill is not None:
        print(f"one-time draw of A, Ã and observations: {fill:.2f} s for {args.images} images "
              f"({1e3 * fill / args.images:.2f} ms/image, first epoch only)")
    print(f"plain   step: {p * 1e3:8.1f} ms  {args.batch / p:8.1f} samples/s")
    print(f"ambient step: {a * 1e3:8.1f} ms  {args.batch / a:8.1f} samples/s")
    print(f"overhead: {100 * (a / p - 1):.1f}%")
    if args.fused_too:
        f = statistics.median(times["ambient_fused"])
        print(f"ambient step, Triton masked loss: {f * 1e3:8.1f} ms  {args.batch / f:8.1f} samples/s")
        print(f"fused loss speed-up of the whole step (fused={args.fused} -> on): {a / f:.3f}x")
    for name in ("plain", "ambient"):
        print(f"{name} batch preparation: {100 * statistics.median(prep_share[name]):.1f}% of the step")


if __name__ == "__main__":
    main()
