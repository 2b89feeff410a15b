"""The GEMM library under the C++ recurrence: oneDNN (ATen's mkldnn_matmul) or MKL/ATen.

float32 is the only dtype that reaches oneDNN, so every check here is in float32 against a float64
computation, once per library (``LAYERNORM_RNN_GEMM``). The fp64 tests of test_rnn_fast.py cover the
recurrence's maths; these cover the GEMM calls: shapes with B = 1 (MKL's GEMV path), 2 and primes,
the accumulating backward GEMM, transposed operands and the module's input projection.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from layernorm import LayerNormGRU, LayerNormLSTM
from layernorm.nn import rnn_fast as rf
from layernorm.nn import rnn_reference as ref

LIBS = ["onednn", "mkl"]
# float32 through T steps of a recurrence: each step's GEMM rounds differently per library (blocking
# and summation order), and the difference is carried and amplified by the LN's rstd; measured
# worst case here ~2e-5, so 1e-4 leaves margin while a wrong GEMM (errors O(1)) still fails.
RTOL, ATOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def ext():
    e = rf._load_ext()
    if e is None:
        if shutil.which("g++"):
            pytest.fail(f"g++ is installed but the C++ recurrence did not build: {rf._ext_error}")
        pytest.skip("no C++ compiler")
    return e


@pytest.fixture(params=LIBS)
def lib(request, ext, monkeypatch):
    if request.param == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setenv("LAYERNORM_RNN_GEMM", request.param)
    assert ext.gemm_library() == request.param
    return request.param


@pytest.fixture(params=["packed", "unpacked"])
def packing(request, monkeypatch):
    """W_hh packed once per call (oneDNN reorder or MKL pack), or the plain GEMM at every step."""
    monkeypatch.setenv("LAYERNORM_RNN_PACKED_GEMM", "1" if request.param == "packed" else "0")
    return request.param


def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)


def _lstm_args(T, B, H, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(xw=_rand(g, T, B, 4 * H), h0=_rand(g, B, H, scale=0.5), c0=_rand(g, B, H, scale=0.5),
                w_hh=_rand(g, 4 * H, H, scale=H ** -0.5), g_hh=1 + 0.3 * _rand(g, 4 * H),
                bias=_rand(g, 4 * H, scale=0.3), wc=1 + 0.3 * _rand(g, H), bc=_rand(g, H, scale=0.3),
                g_ih=1 + 0.3 * _rand(g, 4 * H))


def _gru_args(T, B, H, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(xw=_rand(g, T, B, 3 * H), h0=_rand(g, B, H, scale=0.5), w_hh=_rand(g, 3 * H, H, scale=H ** -0.5),
                g_hh=1 + 0.3 * _rand(g, 3 * H), bias_ih=_rand(g, 3 * H, scale=0.3),
                bias_hh=_rand(g, 3 * H, scale=0.3), g_ih=1 + 0.3 * _rand(g, 3 * H))


def _leaves(d, dtype):
    return {k: v.to(dtype).requires_grad_() for k, v in d.items()}


def _grads(outs, leaves, seed=5):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    return list(outs) + list(torch.autograd.grad(loss, list(leaves.values())))


def _through_extension(y) -> bool:
    """Whether y's autograd graph contains the extension's linear (rf._CppLinear)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "_CppLinearBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


def _ln(xw, g, blocks, eps=1e-5):
    parts, s = [], 0
    for n in blocks:
        parts.append(torch.nn.functional.layer_norm(xw[..., s:s + n], (n,), g[s:s + n], None, eps))
        s += n
    return torch.cat(parts, -1)


# B = 1 with W_hh above 2 MiB (4H*H*4 bytes: H = 384) takes oneDNN's packed GEMM, smaller B = 1 MKL's.
@pytest.mark.parametrize("T,B,H", [(5, 1, 24), (2, 1, 384), (4, 2, 17), (6, 7, 24), (3, 33, 8)])
def test_lstm_fp32_matches_fp64_reference(lib, packing, T, B, H):
    lengths = torch.tensor(([T, 1, T - 2] * B)[:B]) if B > 1 else None
    a = _lstm_args(T, B, H, seed=B)
    f32, f64 = _leaves(a, torch.float32), _leaves(a, torch.float64)

    def run(d, fn, **kw):
        xw = d["xw"] if kw else _ln(d["xw"], d["g_ih"], [4 * H])
        return fn(xw, lengths, d["h0"], d["c0"], d["w_hh"], d["g_hh"], d["bias"], d["wc"], d["bc"], 1e-5, True, **kw)

    got = _grads(run(f32, rf.lstm_recurrence, impl="cpp", ln_ih_weight=f32["g_ih"]), f32)
    want = _grads(run(f64, ref.lstm_recurrence), f64)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("T,B,H", [(5, 1, 24), (2, 1, 420), (4, 2, 17), (6, 7, 24)])  # 420: 3H*H*4 > 2 MiB
def test_gru_fp32_matches_fp64_reference(lib, packing, T, B, H):
    lengths = torch.tensor(([T, 1, T - 2] * B)[:B]) if B > 1 else None
    a = _gru_args(T, B, H, seed=B)
    f32, f64 = _leaves(a, torch.float32), _leaves(a, torch.float64)

    def run(d, fn, **kw):
        xw = d["xw"] if kw else _ln(d["xw"], d["g_ih"], [2 * H, H])
        return fn(xw, lengths, d["h0"], d["w_hh"], d["g_hh"], d["bias_ih"], d["bias_hh"], 1e-5, **kw)

    got = _grads(run(f32, rf.gru_recurrence, impl="cpp", ln_ih_weight=f32["g_ih"]), f32)
    want = _grads(run(f64, ref.gru_recurrence), f64)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("T,B,I,N", [(1, 1, 1, 4), (3, 7, 13, 20), (5, 2, 64, 96)])
@pytest.mark.parametrize("needs", ["both", "x", "w"])
def test_input_projection_matches_matmul(lib, T, B, I, N, needs):
    g = torch.Generator().manual_seed(T * B)
    x64, w64 = _rand(g, T, B, I), _rand(g, N, I, scale=I ** -0.5)
    x, w = x64.float().requires_grad_(needs in ("both", "x")), w64.float().requires_grad_(needs in ("both", "w"))
    x64.requires_grad_(x.requires_grad)
    w64.requires_grad_(w.requires_grad)
    y = rf.input_projection(x, w)
    assert y.shape == (T, B, N) and y.grad_fn is not None
    assert _through_extension(y)
    y64 = torch.matmul(x64, w64.t())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    dy = _rand(g, T, B, N)
    leaves = [t for t in (x, w) if t.requires_grad]
    leaves64 = [t for t in (x64, w64) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(y, leaves, dy.float()), torch.autograd.grad(y64, leaves64, dy)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=5e-5)


def test_input_projection_other_dtypes_use_matmul(ext):
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, dtype=torch.float64)
    y = rf.input_projection(x, w)
    assert not _through_extension(y)
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=0)


@pytest.mark.parametrize("cls", [LayerNormLSTM, LayerNormGRU])
def test_module_same_result_with_either_library(cls, ext, monkeypatch):
    """The whole layer (2 layers, bidirectional, lengths): oneDNN and MKL agree to fp32 rounding."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    torch.manual_seed(0)
    m = cls(12, 20, num_layers=2, bidirectional=True)
    x = torch.randn(7, 5, 12)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 3, 5, 1, 7]), enforce_sorted=False)
    res = {}
    for lib in LIBS:
        monkeypatch.setenv("LAYERNORM_RNN_GEMM", lib)
        m.zero_grad()
        out, _ = m(packed)
        (out.data * torch.arange(out.data.numel()).view_as(out.data).sin()).sum().backward()
        res[lib] = [out.data.detach().clone()] + [p.grad.clone() for p in m.parameters()]
    for a, b in zip(res["onednn"], res["mkl"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_module_bitwise_deterministic(ext):
    torch.manual_seed(1)
    m = LayerNormLSTM(40, 48)
    x = torch.randn(6, 64, 40, requires_grad=True)
    runs = []
    for _ in range(2):
        m.zero_grad()
        x.grad = None
        out, (h, c) = m(x)
        (out.sum() + h.sum() + c.sum()).backward()
        runs.append([out, h, c, x.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bad_library_name_is_a_clear_error(ext, monkeypatch):
    monkeypatch.setenv("LAYERNORM_RNN_GEMM", "cublas")
    with pytest.raises(RuntimeError, match="LAYERNORM_RNN_GEMM"):
        ext.gemm_library()


@pytest.mark.filterwarnings("ignore:TF32 acceleration:UserWarning")
def test_mkldnn_disabled_falls_back_to_mkl(ext, monkeypatch):
    monkeypatch.delenv("LAYERNORM_RNN_GEMM", raising=False)
    with torch.backends.mkldnn.flags(enabled=False):
        assert ext.gemm_library() == "mkl"
    expected = "onednn" if torch.backends.mkldnn.is_available() else "mkl"
    assert ext.gemm_library() == expected
