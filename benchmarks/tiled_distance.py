"""All-pairs tiled l2 (ambient.attack.distances.tiled_l2) against a per-pair Python loop, same run.

    python benchmarks/tiled_distance.py                      # 200 x 200 images, 3x32x32
    python benchmarks/tiled_distance.py --n 500 --loop-rows 5 --device cuda

The loop computes, for each pair, the 4x4 tiles' normalized l2 and their max (the definition,
Carlini et al. 2023, Sec. 4.2), vectorized over the 16 tiles of one pair but looping over pairs.
It runs on the first `--loop-rows` rows of `a` only (all `n` columns) and its time is
extrapolated linearly to n x n pairs; the printed ratio is extrapolated loop time over blocked
time. Both are checked to agree on the rows the loop computed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from ambient.attack.distances import tiled_l2


# Purpose: the baseline, one pair at a time, as a reader would write it from the paper.
def tiled_l2_loop(a: torch.Tensor, b: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[0], device=a.device)
    c, h, w = a.shape[1:]
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            diff = (a[i] - b[j]).reshape(c, tiles, h // tiles, tiles, w // tiles)
            out[i, j] = diff.pow(2).mean(dim=(0, 2, 4)).sqrt().max()
    return out


# Purpose: wall time of fn(), synchronizing CUDA so queued kernels are counted.
def timed(fn, device: torch.device, repeats: int = 1) -> tuple[float, torch.Tensor]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


# Purpose: time both on the same inputs, check they agree, print the ratio.
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images in each set")
    parser.add_argument("--size", type=int, default=32, help="image side (divisible by 4)")
    parser.add_argument("--loop-rows", type=int, default=10, help="rows of a the loop computes")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(args.n, 3, args.size, args.size, generator=g).to(device)
    b = torch.rand(args.n, 3, args.size, args.size, generator=g).to(device)
    rows = min(args.loop_rows, args.n)

    tiled_l2(a[:8], b[:8])  # warm-up: first-call allocation and kernel selection
    # Best of several: on a shared CPU a single run can be inflated many times by contention.
    t_blocked, full = timed(lambda: tiled_l2(a, b, block_size=args.block_size), device, repeats=7)
    t_loop_part, part = timed(lambda: tiled_l2_loop(a[:rows], b), device, repeats=3)
    max_err = (full[:rows] - part).abs().max().item()
    t_loop = t_loop_part * args.n / rows

    print(f"device: {device} ({torch.get_num_threads()} CPU threads)  torch {torch.__version__}  inputs: 2 x {args.n} images 3x{args.size}x{args.size}")
    print(f"blocked tiled_l2, all {args.n}x{args.n} pairs:       {t_blocked * 1e3:10.2f} ms (best of 7)")
    print(f"per-pair loop, {rows}x{args.n} pairs measured:          {t_loop_part * 1e3:10.2f} ms (best of 3)")
    print(f"per-pair loop, extrapolated to {args.n}x{args.n} pairs: {t_loop * 1e3:10.2f} ms")
    print(f"speed-up (extrapolated loop / blocked): {t_loop / t_blocked:.0f}x   max |diff| = {max_err:.2e}")


if __name__ == "__main__":
    main()
