"""One training step of the tiny UNet: plain vs DP-SGD (Opacus per-sample gradients, clipping, noise).

    OMP_NUM_THREADS=1 python benchmarks/dp_step.py                 # CPU, batch 32, K = 1 and 4
    python benchmarks/dp_step.py --batch 64 --multiplicity 1 2 --device cuda

Both variants run in the same process on the same batch (the ambient mask90 loss, class-conditional
unet_tiny at 16 px, AdamW); timed repeats alternate plain and DP so a busy machine slows both alike.
A DP step with noise multiplicity K forwards K·B rows and clips B averaged per-sample gradients; the
plain step is the loop's (forward B rows, backward, global clip, AdamW). Ratios are DP / plain.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from omegaconf import OmegaConf

from ambient.defenses.privacy import DPSGD
from ambient.losses import AmbientEDMLoss
from ambient.models import build_model
from ambient.precond import EDMPrecond

MODEL = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "unet_tiny.yaml")
PRIVACY = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "privacy" / "dpsgd.yaml")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--multiplicity", type=int, nargs="+", default=[1, 4], help="DPDM noise multiplicities K")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="timed steps per variant; the median is reported")
    ap.add_argument("--device", default="cpu")
    return ap.parse_args()


def make(device, resolution):
    torch.manual_seed(0)
    unet = build_model(MODEL, 1, resolution, True, 10)
    net = EDMPrecond(unet, 0.5, True, "official").to(device)
    return net, torch.optim.AdamW(net.parameters(), lr=1e-4)


def batch(b, resolution, device):
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(b, 1, resolution, resolution, generator=g) > 0.9).float()
    obs = (torch.rand(b, 1, resolution, resolution, generator=g) * 2 - 1) * mask
    return [t.to(device) for t in (obs, mask, mask, torch.arange(b) % 10)]


def plain_step(net, opt, loss_fn, inputs):
    loss = loss_fn(net, *inputs).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def dp_step(dp, net, opt, loss_fn, inputs):
    rows = dp.expand(dict(zip(("obs", "mask", "mask_tilde", "cond"), inputs)))
    per_sample = loss_fn(net, rows["obs"], rows["mask"], rows["mask_tilde"], rows["cond"])
    dp.backward(per_sample, net.parameters())
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    args = parse_args()
    loss_fn = AmbientEDMLoss(fused="off")
    inputs = batch(args.batch, args.resolution, args.device)
    plain_net, plain_opt = make(args.device, args.resolution)
    variants = {"plain": lambda: plain_step(plain_net, plain_opt, loss_fn, inputs)}
    for k in args.multiplicity:
        cfg = OmegaConf.merge(PRIVACY, {"epsilon": None, "noise_multiplier": 1.0, "noise_multiplicity": k})
        dp = DPSGD(cfg, n=1000, batch_size=args.batch, steps=1, seed=0)
        net, opt = dp.make_private(*make(args.device, args.resolution))
        variants[f"DP-SGD K={k}"] = (lambda dp=dp, net=net, opt=opt: dp_step(dp, net, opt, loss_fn, inputs))
    times = {name: [] for name in variants}
    for r in range(args.warmup + args.repeats):
        for name, fn in variants.items():  # interleaved: load on a shared machine hits every variant
            sync(args.device)
            t = time.perf_counter()
            fn()
            sync(args.device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["plain"])
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.resolution}px unet_tiny ({sum(p.numel() for p in plain_net.parameters()) / 1e6:.2f}M params), "
          f"median of {args.repeats} steps")
    print(f"{'variant':<14} {'ms/step':>9} {'ratio vs plain':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<14} {med * 1e3:>9.1f} {med / base:>15.2f}")


if __name__ == "__main__":
    main()
