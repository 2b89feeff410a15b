"""Inputs that break naive LayerNorm implementations (see docs/math.md and /work/shared/anchors.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import layernorm
from layernorm.backends import reference

from tolerances import assert_close


def fp64_layer_norm(x, w=None, b=None, eps=1e-5):
    y, _, _, _ = reference.forward(x.double(), None, None if w is None else w.double(),
                                   None if b is None else b.double(), eps, False)
    return y


def grads(fn, x, w, b):
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(torch.randn_like(y))
    return y.detach(), x.grad, w.grad, b.grad


def test_large_mean_rows_fp32(backend):
    # E[x^2] - E[x]^2 loses every digit at mean 1e4 in fp32 (1e8 +- 1e4 needs 27 bits); a two-pass
    # or Welford variance keeps full accuracy.
    # The bound: x - mean is exact to half an ulp of 1e4 (4.9e-4) in fp32, whatever the algorithm, so
    # y can be off by ~1e-3; the naive formula is off by O(1) or NaN (variance error ~ ulp(1e8) = 8).
    x = 1e4 + torch.randn(16, 256)
    y = layernorm.layer_norm(x, (256,), backend=backend)
    torch.testing.assert_close(y, fp64_layer_norm(x).float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(y.double().var(-1, unbiased=False), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-3)
    y = layernorm.rms_norm(x, (256,), eps=1e-5, backend=backend)
    exp = reference.forward(x.double(), None, None, None, 1e-5, True)[0].float()
    assert_close(y, exp, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_constant_rows_give_bias_and_finite_grads(backend, dtype):
    x = torch.full((4, 33), 3.25).to(dtype)
    x[1] = -7.0
    x[2] = 0.0
    w, b = torch.randn(33).to(dtype), torch.randn(33).to(dtype)
    y, dx, dw, db = grads(lambda x, w, b: layernorm.layer_norm(x, (33,), w, b, backend=backend), x, w, b)
    if backend == "torch":
        # aten computes y = x * a + (b - mean * a): exact maths, but rounded it is b +- 1 ulp
        assert_close(y, b.expand_as(y))
    else:
        assert torch.equal(y, b.expand_as(y)), "constant rows must normalize to exactly 0 (then + bias)"
    for g in (dx, dw, db):
        assert torch.isfinite(g).all()


def test_fp16_zero_rows_tiny_eps_finite(backend, request):
    if backend == "torch":
        request.applymarker(pytest.mark.xfail(reason="aten's fp16 CPU backward gives NaN (pytorch #41527)"))
    # eps 1e-12 underflows to 0 in fp16; statistics in fp32 keep rsqrt(0 + 1e-12) finite (pytorch #41527)
    x = torch.zeros(3, 64, dtype=torch.float16, requires_grad=True)
    y = layernorm.layer_norm(x, (64,), eps=1e-12, backend=backend)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(x.grad).all()
    y = layernorm.rms_norm(x.detach(), (64,), eps=1e-12, backend=backend)
    assert torch.equal(y, torch.zeros_like(y))


def test_huge_rows_fp32_are_prescaled(backend):
    # squaring 1e20 overflows fp32: the plain formula gives rstd = 1/sqrt(inf) = 0 and y = 0
    x = torch.randn(4, 128) * 1e20
    exp = fp64_layer_norm(x).float()
    if backend == "torch":
        pytest.skip("the torch backend is aten's kernel, which has exactly this overflow")
    y = layernorm.layer_norm(x, (128,), backend=backend)
    assert_close(y, exp, dtype=torch.float32)
    # torch's own result is 0 (or NaN) on these rows: assert that we are right, not that we match torch
    assert not torch.allclose(TF.layer_norm(x, (128,)), exp, atol=1e-3), "torch no longer overflows: update docs/math.md"
    y = layernorm.rms_norm(x, (128,), eps=1e-5, backend=backend)
    assert_close(y, reference.forward(x.double(), None, None, None, 1e-5, True)[0].float(), dtype=torch.float32)
    # and the gradient stays finite
    xr = x.clone().requires_grad_(True)
    layernorm.layer_norm(xr, (128,), backend=backend).backward(torch.randn(4, 128))
    assert torch.isfinite(xr.grad).all()


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_stays_in_its_row(backend, value):
    x = torch.randn(5, 40)
    x[2, 7] = value
    w, b = torch.randn(40), torch.randn(40)
    for fn in (lambda x: layernorm.layer_norm(x, (40,), w, b, backend=backend),
               lambda x: layernorm.rms_norm(x, (40,), w, backend=backend)):
        y = fn(x)
        clean = fn(x[[0, 1, 3, 4]])
        assert not torch.isfinite(y[2]).all()
        assert torch.isfinite(y[[0, 1, 3, 4]]).all()
        assert torch.equal(y[[0, 1, 3, 4]], clean)


def test_cancellation_40000(backend):
    # onnxruntime #28463: E[x^2] - E[x]^2 = 0 - tiny < 0 -> sqrt of negative -> NaN
    x = torch.tensor([[40000.0, 40001.0, 40002.0, 40003.0]], requires_grad=True)
    y = layernorm.layer_norm(x, (4,), backend=backend)
    y.backward(torch.tensor([[1.0, -2.0, 0.5, 0.25]]))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    exp = fp64_layer_norm(x.detach()).float()
    assert_close(y.detach(), exp, dtype=torch.float32)
