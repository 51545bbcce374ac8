"""Masked MSE for ambient training: a PyTorch reference and a fused Triton kernel.

    loss[b] = weight[b] * sum(m * (pred - target)**2) / max(n_obs[b], 1)

`m` is the mask broadcast to pred's shape and `n_obs[b]` counts its observed
elements. `masked_mse` dispatches: CUDA + triton and >= AUTO_MIN_ELEMENTS -> kernel,
else -> reference (below that size the loss is launch-bound and eager is faster).
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import (
    annotations,  # kernel annotations stay strings, so no triton is needed at import
)

import os

import torch

try:  # triton is an optional extra (`pip install ambient[kernels]`)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised in a subprocess test
    triton = tl = None

FUSED_CHOICES = ("auto", "on", "off")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per program. Measured on one H100 (benchmarks/RESULTS.md, 2026-11-26) at the bandwidth-bound shapes
# 128x3x512x512 and 16x4x1024x1024: 8192 was fastest or tied in all four (fp32/bf16) cases, 0.36-0.76 ms,
# 58-82% of HBM bandwidth; 4096 lost 23-28% at 1024x1024 (0.68 vs 0.52 ms fp32, 0.51 vs 0.36 ms bf16).
DEFAULT_BLOCK = 8192


# Definition of correctness: the formula in the module docstring, in plain PyTorch.
def masked_mse_reference(pred, target, mask, weight=None):
    """Per-sample masked MSE, shape (B,); float32 (float64 for float64 inputs).

    Masked-out elements contribute exactly 0 to the loss and the gradient, even
    when pred/target hold inf/nan there (the difference is zeroed, not multiplied).
    """
    _check_shapes(pred, target, mask, weight)
    acc = torch.promote_types(pred.dtype, torch.float32)  # upcast bf16/fp16; keep fp64 for gradcheck
    m = torch.broadcast_to(mask, pred.shape)
    diff = torch.where(m != 0, pred.to(acc) - target.to(acc), 0.0)
    m = m.to(acc)
    dims = tuple(range(1, pred.ndim))
    n_obs = m.sum(dims) if dims else m
    sq = (m * diff * diff).sum(dims) if dims else m * diff * diff
    loss = sq / n_obs.clamp_min(1)
    return loss if weight is None else loss * weight.to(acc)


# Fail before any work, naming the offending shapes (STYLE habit 4).
def _check_shapes(pred, target, mask, weight):
    if pred.ndim < 1 or pred.shape != target.shape:
        raise ValueError(f"pred and target must share a shape (B, ...); got {tuple(pred.shape)} and {tuple(target.shape)}")
    if mask.ndim != pred.ndim or mask.shape[0] != pred.shape[0] or not _broadcastable(mask.shape, pred.shape):
        raise ValueError(f"mask {tuple(mask.shape)} must broadcast to pred {tuple(pred.shape)} with the same batch size")
    if weight is not None and tuple(weight.shape) != (pred.shape[0],):
        raise ValueError(f"weight must have shape ({pred.shape[0]},); got {tuple(weight.shape)}")


# Broadcasting rule without allocating: every mask dim is 1 or equal to pred's.
def _broadcastable(mask_shape, shape):
    return all(m in (1, s) for m, s in zip(mask_shape, shape))


# Triton's own switch: the env var, or `triton.knobs.runtime.interpret` set in code.
def _interpret_mode():
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Combine function for tl.reduce. Not tl.sum: that is jitted when triton is imported, so it
# breaks the interpreter whenever TRITON_INTERPRET is set after the import; the interpreter
# calls a combine function's plain Python body, so this one works in either mode.
def _add(a, b):
    return a + b


if triton is not None:
    _add = triton.jit(_add)


# The work is a (rows, L) matrix: one row per sample, or per (sample, channel) when the mask is one
# plane shared by every channel; mask row = row // REP (REP = channels if shared else 1). A per-program
# scalar division instead of a per-element modulo keeps the integer work off the bandwidth-bound path.
# Forward: one program per (row, chunk) writes a partial sum of m*d^2 and of m,
# so small batches of large images still fill the GPU and the reduction stays deterministic.
def _fwd_partials(pred_ptr, target_ptr, mask_ptr, sq_ptr, cnt_ptr, L, REP, N_CHUNKS, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)  # int64: rows * L may exceed 2**31
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    inb = offs < L
    p = tl.load(pred_ptr + r * L + offs, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + r * L + offs, mask=inb, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + (r // REP) * L + offs, mask=inb, other=0).to(tl.float32)
    d = tl.where(m != 0, p - t, 0.0)
    tl.store(sq_ptr + r * N_CHUNKS + chunk, tl.reduce(m * d * d, 0, _add))
    tl.store(cnt_ptr + r * N_CHUNKS + chunk, tl.reduce(m, 0, _add))


# Backward: grad = scale[sample] * m * (pred - target) in one pass; scale folds grad_out, weight, 2/n_obs.
def _bwd_grad(pred_ptr, target_ptr, mask_ptr, scale_ptr, grad_ptr, L, REP, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < L
    p = tl.load(pred_ptr + r * L + offs, mask=inb, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + r * L + offs, mask=inb, other=0.0).to(tl.float32)
    sample = r // REP
    m = tl.load(mask_ptr + sample * L + offs, mask=inb, other=0).to(tl.float32)
    d = tl.where(m != 0, p - t, 0.0)
    g = tl.load(scale_ptr + sample) * m * d
    tl.store(grad_ptr + r * L + offs, g.to(grad_ptr.dtype.element_ty), mask=inb)


_JITTED = {}


# jit lazily, keyed by interpreter mode: triton reads TRITON_INTERPRET when a kernel is
# decorated, so decorating at import would freeze whatever the env said back then.
def _kernels():
    mode = _interpret_mode()
    if mode not in _JITTED:
        _JITTED[mode] = (triton.jit(_fwd_partials), triton.jit(_bwd_grad))
    return _JITTED[mode]


# Flatten to (rows, L) / (B, L) without expanding a channel-shared mask in memory: rows = B·C with
# L = one plane when the mask is shared across channels, else rows = B with L = a whole sample.
def _flat_inputs(pred, target, mask):
    B = pred.shape[0]
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # same bytes; pointers to uint8 are the simplest to load
    shared = mask.shape != pred.shape and mask.ndim >= 2 and mask.shape[1] == 1 and mask.shape[2:] == pred.shape[2:]
    if mask.shape != pred.shape and not shared:
        mask = mask.expand(pred.shape)  # rare broadcasts (e.g. per-row): materialize, still 1 byte/element for bool
    L = (mask[0].numel() if B else 0)  # explicit: view(0, -1) is ambiguous
    rows = B * (pred.shape[1] if shared else 1)
    return (pred.contiguous().view(rows, L), target.contiguous().view(rows, L),
            mask.contiguous().view(B, L), shared)


# REP of the kernels: flattened rows per sample (channels when the mask is shared, else 1).
def _rows_per_sample(p2, m2):
    return p2.shape[0] // m2.shape[0] if m2.shape[0] else 1


# Launch geometry shared by both kernels.
def _grid(p2, block):
    L = p2.shape[1]
    if L >= 2**31:
        raise ValueError(f"masked_mse kernel: {L} elements per row exceeds int32 offsets")
    return (p2.shape[0], triton.cdiv(L, block))


# 8 warps for big blocks (Liger-Kernel's rule of thumb): 16-32 elements per thread keeps loads vectorized.
def _num_warps(block):
    return 8 if block >= 2048 else 4


# Thin autograd wrapper (Liger-Kernel style): kernels do the full-size work, (B,) math stays in torch.
class MaskedMSEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, mask, weight, block=DEFAULT_BLOCK):
        fwd, _ = _kernels()
        p2, t2, m2, shared = _flat_inputs(pred, target, mask)
        grid = _grid(p2, block)
        B, rep = pred.shape[0], _rows_per_sample(p2, m2)
        sq = torch.empty(grid, dtype=torch.float32, device=pred.device)  # every program writes its cell
        cnt = torch.empty(grid, dtype=torch.float32, device=pred.device)
        if grid[0] * grid[1]:
            fwd[grid](p2, t2, m2, sq, cnt, p2.shape[1], rep, grid[1], BLOCK=block, num_warps=_num_warps(block))
        # chunk counts are exact; fp64 keeps the total exact
        n_obs = cnt.view(B, rep * grid[1]).sum(1, dtype=torch.float64).float().clamp_min(1)
        per_sample = sq.view(B, rep * grid[1]).sum(1) / n_obs
        ctx.block = block
        # only the inputs plus two (B,) vectors: no full-size tensor is kept for backward
        ctx.save_for_backward(pred, target, mask, weight, n_obs, per_sample)
        return per_sample if weight is None else per_sample * weight.float()

    @staticmethod
    def backward(ctx, grad_out):
        pred, target, mask, weight, n_obs, per_sample = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_pred = grad_target = grad_weight = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            _, bwd = _kernels()
            p2, t2, m2, shared = _flat_inputs(pred, target, mask)
            w = 1.0 if weight is None else weight.float()
            scale = (grad_out * w * 2.0 / n_obs).contiguous()
            grad2 = torch.empty_like(p2)
            grid = _grid(p2, ctx.block)
            if grid[0] * grid[1]:
                bwd[grid](p2, t2, m2, scale, grad2, p2.shape[1], _rows_per_sample(p2, m2), BLOCK=ctx.block,
                          num_warps=_num_warps(ctx.block))
            grad_pred = grad2.view(pred.shape)
            if ctx.needs_input_grad[1]:
                grad_target = (-grad_pred).to(target.dtype)
        if weight is not None and ctx.needs_input_grad[3]:
            grad_weight = (grad_out * per_sample).to(weight.dtype)
        return grad_pred, grad_target, None, grad_weight, None


# Fused path with its preconditions checked up front; `block` is exposed so tests can force many chunks.
def masked_mse_fused(pred, target, mask, weight=None, block=DEFAULT_BLOCK):
    _check_shapes(pred, target, mask, weight)
    if triton is None:
        raise RuntimeError("masked_mse fused='on' needs triton (pip install 'ambient[kernels]')")
    if not pred.is_cuda and not _interpret_mode():
        raise RuntimeError("masked_mse fused='on' needs CUDA tensors; on CPU the Triton kernels run only "
                           "under the interpreter: set TRITON_INTERPRET=1 (or use fused='auto'/'off')")
    if pred.dtype not in KERNEL_DTYPES:
        raise TypeError(f"masked_mse kernel supports float32/float16/bfloat16, got {pred.dtype}; use fused='off'")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    return MaskedMSEFunction.apply(pred, target, mask, weight, block)


# "auto" uses the kernel from this many elements of pred up. Measured on one H200 (benchmarks/RESULTS.md,
# 2026-11-26): below it the loss is launch-bound and the kernel is slower than eager (fwd+bwd 0.46-0.72
# ms vs 0.38-0.69 ms at 64x3x64x64 and 8x4x128x128); it wins once the loss is bandwidth-bound (1.16x
# at 32x3x256x256 fp32 = 6.3M elements, 4.6x at 128x3x512x512 fp32).
AUTO_MIN_ELEMENTS = 2**22


def use_kernel(fused: str, numel: int, on_cuda: bool, dtype: torch.dtype, have_triton: bool | None = None) -> bool:
    """The dispatch rule: "on" always, "off" never, "auto" on CUDA with triton, a kernel dtype and
    at least AUTO_MIN_ELEMENTS elements."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"fused must be one of auto|on|off, got {fused!r}")
    have_triton = triton is not None if have_triton is None else have_triton
    if fused != "auto":
        return fused == "on"
    return have_triton and on_cuda and dtype in KERNEL_DTYPES and numel >= AUTO_MIN_ELEMENTS


# Entry point for training code: choose kernel or reference (STYLE: CUDA -> Triton, else reference).
def masked_mse(pred, target, mask, weight=None, fused="auto"):
    if use_kernel(fused, pred.numel(), pred.is_cuda, pred.dtype):
        return masked_mse_fused(pred, target, mask, weight)
    return masked_mse_reference(pred, target, mask, weight)
