"""Masked MSE: the reference against its definition, the Triton kernels against the reference.

Kernel tests run on CPU under the Triton interpreter. `TRITON_INTERPRET` is set per test
(monkeypatch), which works because ambient.kernels jits its kernels lazily, keyed by mode;
setting it globally would also push other test modules' kernels into the slow interpreter.

    pytest tests/test_masked_loss_kernel.py
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from ambient.kernels import masked_mse, masked_mse_fused, masked_mse_reference

SHAPE = (3, 3, 17, 19)  # odd sizes: no dimension or product is a multiple of any block


# Kernel tests: Triton on CPU via the interpreter; skipped where triton is not installed.
@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# A batch whose sample 0 is fully masked and sample 1 fully observed, the rest random.
def make_batch(shape=SHAPE, shared=True, mask_dtype=torch.bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g)
    target = torch.randn(shape, generator=g)
    mshape = (shape[0], 1, *shape[2:]) if shared else shape
    mask = torch.rand(mshape, generator=g) > 0.4
    mask[0] = False
    if shape[0] > 1:
        mask[1] = True
    weight = torch.rand(shape[0], generator=g) + 0.5
    grad_out = torch.randn(shape[0], generator=g)  # upstream gradient != 1, different per sample
    return pred.to(dtype), target.to(dtype), mask.to(mask_dtype), weight, grad_out


# Loss and the gradients w.r.t. pred, target and weight under one upstream gradient.
def loss_and_grads(fn, pred, target, mask, weight, grad_out):
    pred, target, weight = (x.detach().clone().requires_grad_() for x in (pred, target, weight))
    loss = fn(pred, target, mask, weight)
    grads = torch.autograd.grad(loss, (pred, target, weight), grad_out)
    return (loss.detach(), *grads)


# Definition: a Python loop over every element, with the mask broadcast by hand.
def test_reference_equals_python_loop():
    pred, target, mask, weight, _ = make_batch(shape=(2, 2, 3, 3), mask_dtype=torch.uint8)
    mask[1, 0, 0, 0] = 0  # sample 1 partially observed so the division by n_obs matters
    B, C, H, W = pred.shape
    expected = []
    for b in range(B):
        sq, n = 0.0, 0
        for c in range(C):
            for h in range(H):
                for w in range(W):
                    if mask[b, 0, h, w]:
                        sq += (pred[b, c, h, w].item() - target[b, c, h, w].item()) ** 2
                        n += 1
        expected.append(weight[b].item() * sq / max(n, 1))
    got = masked_mse_reference(pred, target, mask, weight)
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-7)


# Autograd of the reference against finite differences, for both mask layouts.
@pytest.mark.parametrize("shared", [True, False])
def test_reference_gradcheck_float64(shared):
    pred, target, mask, weight, _ = make_batch(shape=(3, 2, 3, 4), shared=shared, dtype=torch.float64)
    args = [x.requires_grad_() for x in (pred, target, weight.double())]
    assert torch.autograd.gradcheck(lambda p, t, w: masked_mse_reference(p, t, mask, w), args)


# Masked pixels must not leak: exactly zero gradient there, even under inf/nan.
def test_reference_grad_exactly_zero_where_masked():
    pred, target, mask, weight, grad_out = make_batch()
    full = mask.expand(pred.shape)
    target[~full] = float("nan")  # corrupted pixels may hold anything
    _, g_pred, g_target, _ = loss_and_grads(masked_mse_reference, pred, target, mask, weight, grad_out)
    assert torch.all(g_pred[~full] == 0) and torch.all(g_target[~full] == 0)
    assert torch.isfinite(g_pred).all()


# Forward, all three gradients and an all-masked sample, across layouts, mask dtypes, block sizes.
@pytest.mark.parametrize("block", [4096, 128])  # 128: many chunks and a ragged tail per sample
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32])
@pytest.mark.parametrize("shared", [True, False])
def test_kernel_matches_reference_fp32(interpret, shared, mask_dtype, block):
    batch = make_batch(shared=shared, mask_dtype=mask_dtype)
    fused = lambda p, t, m, w: masked_mse_fused(p, t, m, w, block=block)
    got = loss_and_grads(fused, *batch)
    want = loss_and_grads(masked_mse_reference, *batch)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert got[0][0] == 0 and torch.all(got[1][0] == 0)  # all-masked sample: loss 0, gradient 0


# Low precision: kernel error vs an fp32 reference within ~2x that of PyTorch in the same dtype.
# The 2x matters here: the interpreter casts fp32->bf16 by truncation (GPUs use cvt.rn, like torch),
# so on CPU the kernel's bf16 gradients carry up to one ulp where torch carries half of one.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_kernel_low_precision_error_bound(interpret, dtype, shared):
    batch = make_batch(shared=shared)
    exact = loss_and_grads(masked_mse_reference, *batch)
    low = (batch[0].to(dtype), batch[1].to(dtype), *batch[2:])
    got = loss_and_grads(lambda *a: masked_mse_fused(*a, block=256), *low)
    torch_low = loss_and_grads(masked_mse_reference, *low)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    for name, g, t, e in zip(("loss", "grad_pred", "grad_target", "grad_weight"), got, torch_low, exact):
        err_kernel = (g.float() - e).abs().max().item()
        err_torch = (t.float() - e).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


# Batch of one, non-contiguous inputs, `loss.sum().backward()` (a stride-0 upstream gradient).
def test_kernel_batch_of_one_and_non_contiguous(interpret):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(1, 17, 19, 3, generator=g).permute(0, 3, 1, 2)  # channels-last view
    target = torch.randn(1, 3, 19, 17, generator=g).transpose(2, 3)
    mask = (torch.rand(1, 1, 17, 38, generator=g) > 0.5)[..., ::2]
    assert not (pred.is_contiguous() or target.is_contiguous() or mask.is_contiguous())
    results = []
    for fn in (lambda *a: masked_mse_fused(*a, block=64), masked_mse_reference):
        p = pred.clone().requires_grad_()
        loss = fn(p, target, mask)
        loss.sum().backward()
        results.append((loss.detach(), p.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


# Memory contract: the shared mask reaches the kernel unexpanded, and backward keeps only the
# inputs themselves plus (B,) vectors, nothing full-size.
def test_kernel_keeps_mask_compact_and_saves_only_inputs(interpret):
    from ambient.kernels.masked_loss import _flat_inputs

    pred, target, mask, weight, _ = make_batch()
    _, _, m2, shared = _flat_inputs(pred, target, mask)
    assert shared and m2.numel() == mask.numel() and m2.data_ptr() == mask.data_ptr()  # bool viewed, not copied
    saved = []
    pred.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        masked_mse_fused(pred, target, mask, weight)
    inputs = {x.data_ptr() for x in (pred, target, mask, weight)}
    assert saved and all(t.data_ptr() in inputs or t.numel() <= pred.shape[0] for t in saved)


# Shapes beyond (B,C,H,W): flat (B,N), volumes (B,C,D,H,W), and a per-column mask broadcast.
@pytest.mark.parametrize("shape,mshape", [
    ((4, 37), (4, 37)),
    ((4, 37), (4, 1)),
    ((2, 3, 5, 6, 7), (2, 1, 5, 6, 7)),
    ((2, 3, 5, 7), (2, 1, 1, 7)),
])
def test_kernel_other_shapes(interpret, shape, mshape):
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(mshape, generator=g) > 0.3
    weight, grad_out = torch.rand(shape[0], generator=g), torch.randn(shape[0], generator=g)
    got = loss_and_grads(lambda *a: masked_mse_fused(*a, block=32), pred, target, mask, weight, grad_out)
    want = loss_and_grads(masked_mse_reference, pred, target, mask, weight, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# Dispatch on CPU: "auto" and "off" are the reference bit for bit; "on" runs the kernel.
def test_dispatch_on_cpu(interpret):
    pred, target, mask, weight, _ = make_batch()
    pred.requires_grad_()
    ref = masked_mse_reference(pred, target, mask, weight)
    for fused in ("auto", "off"):
        out = masked_mse(pred, target, mask, weight, fused=fused)
        assert torch.equal(out, ref) and "MaskedMSE" not in type(out.grad_fn).__name__
    on = masked_mse(pred, target, mask, weight, fused="on")
    assert "MaskedMSE" in type(on.grad_fn).__name__
    torch.testing.assert_close(on, ref, rtol=1e-5, atol=1e-6)


# "auto" picks the kernel only on CUDA, with triton, a kernel dtype and >= AUTO_MIN_ELEMENTS (below it
# the H200 measured the kernel slower than eager); "on" forces it, "off" never uses it.
def test_auto_uses_the_kernel_only_from_the_size_where_it_pays():
    from ambient.kernels.masked_loss import AUTO_MIN_ELEMENTS, use_kernel

    big, small = AUTO_MIN_ELEMENTS, AUTO_MIN_ELEMENTS - 1
    assert use_kernel("auto", big, True, torch.float32, have_triton=True)
    assert use_kernel("auto", 10 * big, True, torch.bfloat16, have_triton=True)
    assert not use_kernel("auto", small, True, torch.float32, have_triton=True)  # launch-bound: eager
    assert not use_kernel("auto", big, False, torch.float32, have_triton=True)  # CPU
    assert not use_kernel("auto", big, True, torch.float64, have_triton=True)
    assert not use_kernel("auto", big, True, torch.float32, have_triton=False)
    assert use_kernel("on", 1, False, torch.float32, have_triton=False)  # forced; masked_mse_fused explains
    assert not use_kernel("off", 10 * big, True, torch.float32, have_triton=True)
    # 32x3x256x256 (6.3M elements, where the kernel first beat eager) uses it, 64x3x64x64 does not.
    assert 32 * 3 * 256 * 256 >= AUTO_MIN_ELEMENTS > 64 * 3 * 64 * 64


# masked_mse follows use_kernel: with the rule saying "kernel", auto calls the fused path.
def test_masked_mse_calls_what_the_rule_chooses(monkeypatch):
    from ambient.kernels import masked_loss

    pred, target, mask, weight, _ = make_batch()
    calls = []
    monkeypatch.setattr(masked_loss, "masked_mse_fused", lambda *a: calls.append("fused") or a[0].sum((1, 2, 3)))
    monkeypatch.setattr(masked_loss, "AUTO_MIN_ELEMENTS", pred.numel())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # no CUDA needed
    masked_loss.masked_mse(pred, target, mask, weight, fused="auto")
    if masked_loss.triton is not None:
        assert calls == ["fused"]
    monkeypatch.setattr(masked_loss, "AUTO_MIN_ELEMENTS", pred.numel() + 1)
    calls.clear()
    masked_loss.masked_mse(pred, target, mask, weight, fused="auto")
    assert calls == []


# A config typo fails loudly, naming the allowed values.
def test_bogus_fused_value_names_choices():
    pred, target, mask, weight, _ = make_batch()
    with pytest.raises(ValueError, match=r"auto\|on\|off"):
        masked_mse(pred, target, mask, weight, fused="bogus")


# Bad shapes fail before any work, naming the shapes.
def test_shape_errors():
    pred, target, mask, weight, _ = make_batch()
    with pytest.raises(ValueError, match="mask"):
        masked_mse(pred, target, mask[:, :, :5], weight)
    with pytest.raises(ValueError, match="weight"):
        masked_mse(pred, target, mask, weight[:2])


# Run a snippet in a fresh interpreter, where env and imports are still untouched.
def run_python(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes, PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


SNIPPET = """
import sys
{prelude}
import torch
from ambient.kernels import masked_mse
p, t, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 4, dtype=torch.bool)
assert masked_mse(p, t, m).shape == (2,)  # auto falls back to the reference on CPU
try:
    masked_mse(p, t, m, fused="on")
except RuntimeError as e:
    print("ERR", e)
"""


# Without the interpreter, forcing the kernel on CPU is a clear error, not a crash inside triton.
def test_fused_on_cpu_without_interpreter_raises():
    pytest.importorskip("triton")
    proc = run_python(SNIPPET.format(prelude=""))
    assert proc.returncode == 0, proc.stderr
    assert "ERR" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout and "CUDA" in proc.stdout


# Triton is optional: the module imports and "auto" works without it; "on" says what to install.
def test_module_works_without_triton():
    proc = run_python(SNIPPET.format(prelude="sys.modules['triton'] = None  # import triton now fails"))
    assert proc.returncode == 0, proc.stderr
    assert "ERR" in proc.stdout and "needs triton" in proc.stdout


# On a real GPU (never needed by CI): the compiled kernel against the fp32 reference.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_matches_reference_on_cuda():
    pytest.importorskip("triton")
    batch = [t.cuda() for t in make_batch(shape=(8, 3, 33, 31))]
    fused = loss_and_grads(masked_mse_fused, *batch)
    reference = loss_and_grads(masked_mse_reference, *batch)
    for a, b in zip(fused, reference):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
