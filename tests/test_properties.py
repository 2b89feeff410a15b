"""Hypothesis properties that hold for any input, for every backend."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import layernorm

from conftest import CPU_BACKENDS

DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


@st.composite
def matrices(draw, min_cols=2, max_rows=6, max_cols=80):
    """(M, N) tensors of O(1)..O(1e3) values with a random per-row offset and scale."""
    M = draw(st.integers(1, max_rows))
    N = draw(st.integers(min_cols, max_cols))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(M, 1, dtype=torch.float64).uniform_(-3, 3, generator=g))
    offset = torch.empty(M, 1, dtype=torch.float64).uniform_(-10, 10, generator=g)
    x = (torch.randn(M, N, generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    # rows must not be (nearly) constant, or the normalized values are dominated by eps
    assume(bool((x.double().std(-1) > 1e-2 * scale[:, 0]).all()))
    return x


def _tol(x):
    return (1e-4, 1e-4) if x.dtype == torch.float32 else (1e-9, 1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(deadline=None, max_examples=25)
@given(x=matrices())
def test_layer_norm_rows_have_mean0_var1(backend, x):
    y = layernorm.layer_norm(x, (x.shape[-1],), eps=0.0, backend=backend).double()
    rtol, atol = _tol(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(x.shape[0], dtype=torch.float64), rtol=0, atol=atol)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(x.shape[0], dtype=torch.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(deadline=None, max_examples=25)
@given(x=matrices())
def test_rms_norm_rows_have_rms1(backend, x):
    y = layernorm.rms_norm(x, (x.shape[-1],), eps=0.0, backend=backend).double()
    rtol, atol = _tol(x)
    torch.testing.assert_close(y.square().mean(-1).sqrt(), torch.ones(x.shape[0], dtype=torch.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(deadline=None, max_examples=25)
@given(x=matrices(), shift=st.floats(-100, 100), scale=st.floats(1e-2, 1e2))
def test_shift_and_scale_invariance(backend, x, shift, scale):
    N = x.shape[-1]
    rtol, atol = _tol(x)
    y = layernorm.layer_norm(x, (N,), eps=0.0, backend=backend)
    # shifting by c changes the fp32 rounding of x itself: compare against the shifted input's exact values
    shifted = x + shift
    if x.dtype == torch.float32:
        atol = 1e-3 * (1 + abs(shift) / x.double().std(-1).min().item())
    torch.testing.assert_close(layernorm.layer_norm(shifted, (N,), eps=0.0, backend=backend), y, rtol=rtol, atol=atol)
    rtol, atol = _tol(x)
    torch.testing.assert_close(layernorm.layer_norm(x * scale, (N,), eps=0.0, backend=backend), y, rtol=rtol, atol=atol)
    yr = layernorm.rms_norm(x, (N,), eps=0.0, backend=backend)
    torch.testing.assert_close(layernorm.rms_norm(x * scale, (N,), eps=0.0, backend=backend), yr, rtol=rtol, atol=atol)


def _ops(backend, N, w, b):
    return {
        "layer_norm": lambda t: layernorm.layer_norm(t, (N,), w, b, backend=backend),
        "rms_norm": lambda t: layernorm.rms_norm(t, (N,), w, backend=backend),
        "add_layer_norm": lambda t: layernorm.add_layer_norm(t, t.flip(-1), (N,), w, b, backend=backend)[0],
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(deadline=None, max_examples=20)
@given(x=matrices(max_rows=8), data=st.data())
def test_rows_are_independent(backend, x, data):
    """Changing one row leaves every other row's output bitwise equal."""
    M, N = x.shape
    assume(M >= 2)
    row = data.draw(st.integers(0, M - 1))
    w, b = torch.randn(N, dtype=x.dtype), torch.randn(N, dtype=x.dtype)
    x2 = x.clone()
    x2[row] = torch.randn(N, dtype=x.dtype) * 1e3
    others = [i for i in range(M) if i != row]
    for name, fn in _ops(backend, N, w, b).items():
        assert torch.equal(fn(x)[others], fn(x2)[others]), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(deadline=None, max_examples=20)
@given(x=matrices(max_rows=8), data=st.data())
def test_nan_stays_in_its_row(backend, x, data):
    M, N = x.shape
    row = data.draw(st.integers(0, M - 1))
    col = data.draw(st.integers(0, N - 1))
    w, b = torch.randn(N, dtype=x.dtype), torch.randn(N, dtype=x.dtype)
    x2 = x.clone()
    x2[row, col] = float("nan")
    others = [i for i in range(M) if i != row]
    for name, fn in _ops(backend, N, w, b).items():
        y, y2 = fn(x), fn(x2)
        assert torch.isnan(y2[row]).all(), name
        assert torch.isfinite(y2[others]).all(), name
        assert torch.equal(y2[others], y[others]), name
