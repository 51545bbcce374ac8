"""Masked MSE forward+backward: eager reference vs torch.compile vs the fused Triton kernel.

    python benchmarks/masked_loss.py                      # CUDA: full table
    python benchmarks/masked_loss.py --peak-gbps 3350     # override the device's peak bandwidth
    python benchmarks/masked_loss.py --cpu-interpret      # no GPU: tiny correctness smoke run
    python benchmarks/masked_loss.py --shapes 128x3x512x512   # other shapes (BxCxHxW, comma-separated)

All three variants run in the same process on the same inputs; ratios are against eager.
GB/s counts the minimum traffic of a fused fwd+bwd: pred, target and the compact mask read
twice (forward and backward) and grad_pred written once; every variant is charged the same bytes.
Peak memory is the max_memory_allocated delta over one fwd+bwd, the returned gradient included.
"""

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

SHAPES = [(64, 3, 64, 64), (32, 3, 256, 256), (8, 4, 128, 128)]
DTYPES = [torch.float32, torch.bfloat16]
# Vendor datasheet HBM/GDDR bandwidth in GB/s; first substring match of the device name wins.
PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
             ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864),
             ("L4", 300), ("A10G", 600), ("A10", 600), ("T4", 320), ("V100", 900), ("4090", 1008), ("3090", 936)]


def parse_shapes(text):
    try:
        shapes = [tuple(int(d) for d in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: expected BxCxHxW[,BxCxHxW...]") from None
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes {text!r}: each shape needs four positive sizes, BxCxHxW")
    return shapes


# Command line; --peak-gbps wins over the lookup.
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak-gbps", type=float, default=None, help="device peak memory bandwidth in GB/s")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats; the median is reported")
    ap.add_argument("--inner", type=int, default=10, help="fwd+bwd steps per timed repeat")
    ap.add_argument("--shapes", type=parse_shapes, default=SHAPES,
                    help="comma-separated BxCxHxW shapes (default: %(default)s)")
    ap.add_argument("--blocks", type=lambda t: [int(b) for b in t.split(",") if b], default=[],
                    help="also time the Triton kernel at these block sizes (comma-separated powers of two)")
    ap.add_argument("--cpu-interpret", action="store_true", help="no CUDA: tiny smoke run under TRITON_INTERPRET=1")
    return ap.parse_args()


# Datasheet value by name, else DDR bandwidth from the reported memory clock (kHz) and bus width (bits).
def peak_bandwidth(override):
    if override:
        return override, "--peak-gbps"
    props = torch.cuda.get_device_properties(0)
    for key, gbps in PEAK_GBPS:
        if key in props.name:
            return gbps, f"datasheet for {key}"
    clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8 / 1e9, "memory clock x bus width"
    return None, "unknown (pass --peak-gbps)"


# Same inputs for every variant: channel-shared uint8 mask, random upstream gradient.
def make_inputs(shape, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    pred = torch.randn(shape, generator=g, device=device).to(dtype).requires_grad_()
    target = torch.randn(shape, generator=g, device=device).to(dtype)
    mask = (torch.rand((shape[0], 1, *shape[2:]), generator=g, device=device) > 0.5).to(torch.uint8)
    grad_out = torch.randn(shape[0], generator=g, device=device)
    return pred, target, mask, grad_out


# One training-style step; autograd.grad returns the gradient instead of accumulating into .grad.
def step(fn, pred, target, mask, grad_out):
    loss = fn(pred, target, mask)
    (grad,) = torch.autograd.grad(loss, pred, grad_out)
    return loss, grad


# Median ms per step from CUDA events; synchronize so queued warmup work is not timed.
def time_cuda(fn, inputs, warmup, repeats, inner):
    for _ in range(warmup):
        step(fn, *inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            step(fn, *inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


# Peak allocation of one step above what the inputs already hold.
def peak_memory_mib(fn, inputs):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step(fn, *inputs)
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# Bytes a fused fwd+bwd must move: (pred, target, mask) twice, grad_pred once.
def traffic_bytes(pred, target, mask):
    nbytes = lambda t: t.numel() * t.element_size()
    return 2 * (nbytes(pred) + nbytes(target) + nbytes(mask)) + nbytes(pred)


# The full comparison table on the current CUDA device.
def run_cuda(args):
    from ambient.kernels import masked_mse_fused, masked_mse_reference

    peak, source = peak_bandwidth(args.peak_gbps)
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; peak bandwidth: {peak and f'{peak:.0f} GB/s'} ({source}); torch {torch.__version__}")
    print(f"{'shape':>16} {'dtype':>8} {'variant':>11} {'ms':>8} {'vs eager':>9} {'GB/s':>8} {'%peak':>6} {'peak MiB':>9} {'max|err|':>9}")
    for shape in args.shapes:
        for dtype in DTYPES:
            inputs = make_inputs(shape, dtype, "cuda")
            # a fresh compile per config, so each is specialized to its static shape and dtype
            variants = {"eager": masked_mse_reference,
                        "compile": torch.compile(masked_mse_reference, dynamic=False),
                        "triton": masked_mse_fused,
                        **{f"triton{blk}": functools.partial(masked_mse_fused, block=blk) for blk in args.blocks}}
            ref_loss, ref_grad = step(masked_mse_reference, *inputs)
            gbytes = traffic_bytes(*inputs[:3]) / 1e9
            eager_ms = None
            for label, fn in variants.items():
                loss, grad = step(fn, *inputs)  # also triggers compilation outside the timed region
                err = max((loss - ref_loss).abs().max().item(), (grad - ref_grad).float().abs().max().item())
                ms = time_cuda(fn, inputs, args.warmup, args.repeats, args.inner)
                eager_ms = eager_ms or ms
                gbps = gbytes / (ms / 1e3)
                pct = f"{100 * gbps / peak:5.1f}%" if peak else "   n/a"
                print(f"{'x'.join(map(str, shape)):>16} {str(dtype)[6:]:>8} {label:>11} {ms:8.3f} "
                      f"{eager_ms / ms:8.2f}x {gbps:8.1f} {pct:>6} {peak_memory_mib(fn, inputs):9.1f} {err:9.2e}")


# No GPU: check the kernels run and agree under the interpreter; timings are not meaningful.
def run_cpu_interpret():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported by ambient.kernels
    from ambient.kernels import masked_mse_fused, masked_mse_reference

    shape = (2, 3, 17, 19)
    for dtype in DTYPES:
        inputs = make_inputs(shape, dtype, "cpu")
        t0 = time.perf_counter()
        loss, grad = step(masked_mse_fused, *inputs)
        t1 = time.perf_counter()
        ref_loss, ref_grad = step(masked_mse_reference, *inputs)
        err = max((loss - ref_loss).abs().max().item(), (grad - ref_grad).float().abs().max().item())
        print(f"cpu-interpret {'x'.join(map(str, shape))} {str(dtype)[6:]}: max|err| vs reference {err:.2e} "
              f"(interpreter {1e3 * (t1 - t0):.0f} ms; not a benchmark)")


# Entry point: CUDA table, interpreter smoke run, or a clear no-op message.
def main():
    args = parse_args()
    if torch.cuda.is_available():
        run_cuda(args)
    elif args.cpu_interpret:
        run_cpu_interpret()
    else:
        print("benchmarks/masked_loss.py: no CUDA device, nothing to time "
              "(use --cpu-interpret for a tiny interpreter smoke run).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
