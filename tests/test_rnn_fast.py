"""The fast LN-LSTM / LN-GRU recurrences against the pure-PyTorch autograd reference.

Both implementations (the C++ time loop and the torch-ops one used as fallback and on CUDA) are run
on the same cases: outputs, final states and every gradient, with and without (unsorted, varied)
lengths, with and without the cell layer norm and biases; fp64 gradcheck; bitwise determinism;
the fallback when the extension is missing.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from layernorm.nn import rnn_fast as rf
from layernorm.nn import rnn_reference as ref


def _impls():
    return ["cpp", "torch"]


@pytest.fixture(scope="module")
def cpp_ok():
    ok = rf.cpp_extension_available()
    if not ok and shutil.which("g++"):
        pytest.fail(f"g++ is installed but the C++ recurrence did not build: {rf._ext_error}")
    return ok


def _need(impl, cpp_ok):
    if impl == "cpp" and not cpp_ok:
        pytest.skip("no C++ compiler: only the torch implementation is available")


def _lstm_inputs(T, B, H, dtype, bias=True, cell_norm=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()

    return dict(
        xw_ln=r(T, B, 4 * H),
        h0=r(B, H, scale=0.5),
        c0=r(B, H, scale=0.5),
        w_hh=r(4 * H, H, scale=H ** -0.5),
        ln_hh_weight=(1 + 0.3 * torch.randn(4 * H, generator=g, dtype=dtype)).requires_grad_(),
        bias=r(4 * H, scale=0.3) if bias else None,
        ln_cell_weight=(1 + 0.3 * torch.randn(H, generator=g, dtype=dtype)).requires_grad_() if cell_norm else None,
        ln_cell_bias=r(H, scale=0.3) if cell_norm else None,
    )


def _gru_inputs(T, B, H, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_()

    return dict(
        xw_ln=r(T, B, 3 * H),
        h0=r(B, H, scale=0.5),
        w_hh=r(3 * H, H, scale=H ** -0.5),
        ln_hh_weight=(1 + 0.3 * torch.randn(3 * H, generator=g, dtype=dtype)).requires_grad_(),
        bias_ih=r(3 * H, scale=0.3) if bias else None,
        bias_hh=r(3 * H, scale=0.3) if bias else None,
    )


def _run_lstm(fn, inp, lengths, cell_norm, seed=1, **kw):
    out, hn, cn = fn(inp["xw_ln"], lengths, inp["h0"], inp["c0"], inp["w_hh"], inp["ln_hh_weight"], inp["bias"],
                     inp["ln_cell_weight"], inp["ln_cell_bias"], 1e-5, cell_norm, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g).to(v.dtype)).sum() for v in (out, hn, cn))
    leaves = [v for v in inp.values() if v is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [out, hn, cn, *grads]


def _run_gru(fn, inp, lengths, seed=1, **kw):
    out, hn = fn(inp["xw_ln"], lengths, inp["h0"], inp["w_hh"], inp["ln_hh_weight"], inp["bias_ih"],
                 inp["bias_hh"], 1e-5, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=g).to(v.dtype)).sum() for v in (out, hn))
    leaves = [v for v in inp.values() if v is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [out, hn, *grads]


def _to64(inp):
    return {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inp.items()}


LENGTHS = {"none": None, "varied": torch.tensor([3, 7, 1, 7, 5, 0])}


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("H,lengths", [(16, "none"), (13, "varied")])  # 13: vector-loop tails
@pytest.mark.parametrize("cell_norm,bias", [(True, True), (False, True), (True, False)])
def test_lstm_matches_reference(impl, lengths, cell_norm, bias, H, cpp_ok):
    _need(impl, cpp_ok)
    T, B = 7, 6
    inp = _lstm_inputs(T, B, H, torch.float32, bias=bias, cell_norm=cell_norm)
    got = _run_lstm(rf.lstm_recurrence, inp, LENGTHS[lengths], cell_norm, impl=impl)
    want = _run_lstm(ref.lstm_recurrence, _to64(inp), LENGTHS[lengths], cell_norm)
    names = ["out", "h_n", "c_n"] + [k for k, v in inp.items() if v is not None]
    for name, a, b in zip(names, got, want):
        assert a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("H,lengths", [(16, "none"), (13, "varied"), (16, "varied")])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_matches_reference(impl, lengths, bias, H, cpp_ok):
    _need(impl, cpp_ok)
    T, B = 7, 6
    inp = _gru_inputs(T, B, H, torch.float32, bias=bias)
    got = _run_gru(rf.gru_recurrence, inp, LENGTHS[lengths], impl=impl)
    want = _run_gru(ref.gru_recurrence, _to64(inp), LENGTHS[lengths])
    names = ["out", "h_n"] + [k for k, v in inp.items() if v is not None]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("cell_norm", [True, False])
def test_lstm_gradcheck_fp64(impl, cell_norm, cpp_ok):
    _need(impl, cpp_ok)
    inp = _lstm_inputs(4, 3, 3, torch.float64, cell_norm=cell_norm)
    keys = [k for k, v in inp.items() if v is not None]
    lengths = torch.tensor([2, 4, 3])

    def f(*args):
        d = dict(inp, **dict(zip(keys, args)))
        return rf.lstm_recurrence(d["xw_ln"], lengths, d["h0"], d["c0"], d["w_hh"], d["ln_hh_weight"], d["bias"],
                                  d["ln_cell_weight"], d["ln_cell_bias"], 1e-5, cell_norm, impl=impl)

    assert torch.autograd.gradcheck(f, [inp[k] for k in keys], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", _impls())
def test_gru_gradcheck_fp64(impl, cpp_ok):
    _need(impl, cpp_ok)
    inp = _gru_inputs(4, 3, 3, torch.float64)
    keys = list(inp)
    lengths = torch.tensor([4, 1, 3])

    def f(*args):
        d = dict(zip(keys, args))
        return rf.gru_recurrence(d["xw_ln"], lengths, d["h0"], d["w_hh"], d["ln_hh_weight"], d["bias_ih"],
                                 d["bias_hh"], 1e-5, impl=impl)

    assert torch.autograd.gradcheck(f, [inp[k] for k in keys], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", _impls())
def test_bitwise_deterministic(impl, cpp_ok):
    _need(impl, cpp_ok)
    lengths = torch.randint(1, 9, (64,), generator=torch.Generator().manual_seed(3))
    inp = _lstm_inputs(8, 64, 32, torch.float32)
    a = _run_lstm(rf.lstm_recurrence, inp, lengths, True, impl=impl)
    b = _run_lstm(rf.lstm_recurrence, inp, lengths, True, impl=impl)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    ginp = _gru_inputs(8, 64, 32, torch.float32)
    a = _run_gru(rf.gru_recurrence, ginp, lengths, impl=impl)
    b = _run_gru(rf.gru_recurrence, ginp, lengths, impl=impl)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", _impls())
def test_inference_path_matches_training_path(impl, cpp_ok):
    _need(impl, cpp_ok)
    lengths = torch.tensor([5, 2, 4])
    inp = _lstm_inputs(5, 3, 8, torch.float32)
    args = lambda d: (d["xw_ln"], lengths, d["h0"], d["c0"], d["w_hh"], d["ln_hh_weight"], d["bias"],  # noqa: E731
                      d["ln_cell_weight"], d["ln_cell_bias"], 1e-5, True)
    train = rf.lstm_recurrence(*args(inp), impl=impl)
    with torch.no_grad():
        infer = rf.lstm_recurrence(*args(inp), impl=impl)
    for a, b in zip(train, infer):
        assert not b.requires_grad
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    ginp = _gru_inputs(5, 3, 8, torch.float32)
    gargs = (ginp["xw_ln"], lengths, ginp["h0"], ginp["w_hh"], ginp["ln_hh_weight"], ginp["bias_ih"],
             ginp["bias_hh"], 1e-5)
    train = rf.gru_recurrence(*gargs, impl=impl)
    with torch.no_grad():
        infer = rf.gru_recurrence(*gargs, impl=impl)
    for a, b in zip(train, infer):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def test_cpp_and_torch_agree_closely(cpp_ok):
    if not cpp_ok:
        pytest.skip("no C++ compiler")
    inp = _lstm_inputs(20, 4, 64, torch.float32)
    a = _run_lstm(rf.lstm_recurrence, inp, torch.tensor([20, 9, 14, 1]), True, impl="cpp")
    b = _run_lstm(rf.lstm_recurrence, inp, torch.tensor([20, 9, 14, 1]), True, impl="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_fallback_when_extension_missing(monkeypatch):
    """A failed build must leave the torch implementation in charge, not raise."""
    monkeypatch.setattr(rf, "_load_ext", lambda: None)  # as native.load() answers after a failed build
    inp = _lstm_inputs(4, 2, 8, torch.float32)
    assert rf._pick_impl(None, inp["xw_ln"]) is rf._TorchImpl
    got = _run_lstm(rf.lstm_recurrence, inp, None, True)
    want = _run_lstm(ref.lstm_recurrence, inp, None, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="not built"):
        rf.lstm_recurrence(inp["xw_ln"], None, inp["h0"], inp["c0"], inp["w_hh"], inp["ln_hh_weight"], None,
                           inp["ln_cell_weight"], inp["ln_cell_bias"], 1e-5, True, impl="cpp")


def test_env_var_selects_impl(monkeypatch):
    x = torch.zeros(1, 1, 4)
    monkeypatch.setenv("LAYERNORM_RNN_IMPL", "torch")
    assert rf._pick_impl(None, x) is rf._TorchImpl
    monkeypatch.setenv("LAYERNORM_RNN_IMPL", "bogus")
    with pytest.raises(ValueError, match="LAYERNORM_RNN_IMPL"):
        rf._pick_impl(None, x)


def test_argument_errors():
    inp = _lstm_inputs(3, 2, 4, torch.float32)
    base = dict(inp)
    call = lambda **o: rf.lstm_recurrence(  # noqa: E731
        o.get("xw_ln", base["xw_ln"]), o.get("lengths"), o.get("h0", base["h0"]), base["c0"], base["w_hh"],
        base["ln_hh_weight"], base["bias"], base["ln_cell_weight"], base["ln_cell_bias"], 1e-5, True)
    with pytest.raises(ValueError, match="xw_ln must have shape"):
        call(xw_ln=torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="T >= 1"):
        call(xw_ln=torch.zeros(0, 2, 16))
    with pytest.raises(ValueError, match="T >= 1"):
        rf.gru_recurrence(torch.zeros(0, 2, 12), None, torch.zeros(2, 4), torch.zeros(12, 4), torch.ones(12),
                          None, None, 1e-5)
    with pytest.raises(ValueError, match="h0 must have shape"):
        call(h0=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="lengths must lie in"):
        call(lengths=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="lengths must have shape"):
        call(lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="float64"):
        call(h0=torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_torch_impl_on_cuda(mode):
    """The torch-ops implementation is the CUDA path: same results as the CPU fp64 reference."""
    lengths = torch.tensor([3, 7, 1, 7, 5, 0])
    if mode == "lstm":
        inp = _lstm_inputs(7, 6, 32, torch.float32)
        cuda = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in inp.items()}
        got = _run_lstm(rf.lstm_recurrence, cuda, lengths, True)
        want = _run_lstm(ref.lstm_recurrence, _to64(inp), lengths, True)
    else:
        inp = _gru_inputs(7, 6, 32, torch.float32)
        cuda = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in inp.items()}
        got = _run_gru(rf.gru_recurrence, cuda, lengths)
        want = _run_gru(ref.gru_recurrence, _to64(inp), lengths)
    for a, b in zip(got, want):
        assert a.is_cuda
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# ln_ih_weight: the raw projection in, LN(xw) * ln_ih_weight taken inside (fused in the C++ loop)
# ------------------------------------------------------------------------------------------------


def _ln_blocks(xw, g, blocks, eps=1e-5):
    """The reference input LN: each block of the gate axis normalized on its own, gain g, no shift."""
    parts, start = [], 0
    for size in blocks:
        parts.append(torch.nn.functional.layer_norm(xw[..., start:start + size], (size,),
                                                    g[start:start + size], None, eps))
        start += size
    return torch.cat(parts, -1)


def _with_ln_ih(inp, G, seed=3):
    g = torch.Generator().manual_seed(seed)
    dtype = inp["xw_ln"].dtype
    out = dict(inp)
    # raw projections are not centred: a mean offset makes a missing centring visible
    out["xw_ln"] = (torch.randn(inp["xw_ln"].shape, generator=g, dtype=dtype) * 2 + 0.7).requires_grad_()
    out["ln_ih_weight"] = (1 + 0.3 * torch.randn(G, generator=g, dtype=dtype)).requires_grad_()
    return out


def _ref_lstm_ln(xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, eps, cell_norm, ln_ih_weight):
    return ref.lstm_recurrence(_ln_blocks(xw, ln_ih_weight, [xw.shape[-1]], eps), lengths, h0, c0, w_hh, g_hh,
                               bias, wc, bc, eps, cell_norm)


def _ref_gru_ln(xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, eps, ln_ih_weight):
    H = xw.shape[-1] // 3
    return ref.gru_recurrence(_ln_blocks(xw, ln_ih_weight, [2 * H, H], eps), lengths, h0, w_hh, g_hh, bias_ih,
                              bias_hh, eps)


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("H,lengths", [(16, "none"), (13, "varied")])
@pytest.mark.parametrize("cell_norm,bias", [(True, True), (False, False)])
def test_lstm_input_ln_matches_reference(impl, lengths, cell_norm, bias, H, cpp_ok):
    _need(impl, cpp_ok)
    T, B = 7, 6
    inp = _with_ln_ih(_lstm_inputs(T, B, H, torch.float64, bias=bias, cell_norm=cell_norm), 4 * H)
    fast = lambda *a, **k: rf.lstm_recurrence(*a[:11], impl=impl, ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    slow = lambda *a, **k: _ref_lstm_ln(*a[:11], ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    got = _run_lstm(fast, inp, LENGTHS[lengths], cell_norm)
    want = _run_lstm(slow, inp, LENGTHS[lengths], cell_norm)
    names = ["out", "h_n", "c_n"] + [k for k, v in inp.items() if v is not None]
    assert "ln_ih_weight" in names
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("H,lengths", [(16, "none"), (13, "varied")])
@pytest.mark.parametrize("bias", [True, False])
def test_gru_input_ln_matches_reference(impl, lengths, bias, H, cpp_ok):
    _need(impl, cpp_ok)
    T, B = 7, 6
    inp = _with_ln_ih(_gru_inputs(T, B, H, torch.float64, bias=bias), 3 * H)
    fast = lambda *a, **k: rf.gru_recurrence(*a[:8], impl=impl, ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    slow = lambda *a, **k: _ref_gru_ln(*a[:8], ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    got = _run_gru(fast, inp, LENGTHS[lengths])
    want = _run_gru(slow, inp, LENGTHS[lengths])
    names = ["out", "h_n"] + [k for k, v in inp.items() if v is not None]
    assert "ln_ih_weight" in names
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_input_ln_fp32_and_inference(cpp_ok):
    """float32 against the fp64 reference, and the no-grad path equal to the training path."""
    _need("cpp", cpp_ok)
    T, B, H = 9, 5, 24
    inp = _with_ln_ih(_lstm_inputs(T, B, H, torch.float32), 4 * H)
    lengths = torch.tensor([9, 2, 0, 9, 4])
    fast = lambda *a, **k: rf.lstm_recurrence(*a[:11], impl="cpp", ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    got = _run_lstm(fast, inp, lengths, True)
    inp64 = _to64(inp)
    slow = lambda *a, **k: _ref_lstm_ln(*a[:11], ln_ih_weight=inp64["ln_ih_weight"])  # noqa: E731
    want = _run_lstm(slow, inp64, lengths, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        args = [inp[k] for k in ("xw_ln",)] + [lengths] + [inp[k] for k in (
            "h0", "c0", "w_hh", "ln_hh_weight", "bias", "ln_cell_weight", "ln_cell_bias")]
        nograd = rf.lstm_recurrence(*args, 1e-5, True, impl="cpp", ln_ih_weight=inp["ln_ih_weight"])
    for a, b in zip(nograd, got[:3]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_input_ln_gradcheck_fp64(mode, cpp_ok):
    _need("cpp", cpp_ok)
    T, B, H = 3, 2, 3
    lengths = torch.tensor([3, 1])
    if mode == "lstm":
        inp = _with_ln_ih(_lstm_inputs(T, B, H, torch.float64), 4 * H)
        keys = [k for k, v in inp.items() if v is not None]

        def f(*vals):
            d = dict(zip(keys, vals))
            return rf.lstm_recurrence(d["xw_ln"], lengths, d["h0"], d["c0"], d["w_hh"], d["ln_hh_weight"], d["bias"],
                                      d["ln_cell_weight"], d["ln_cell_bias"], 1e-5, True, impl="cpp",
                                      ln_ih_weight=d["ln_ih_weight"])
    else:
        inp = _with_ln_ih(_gru_inputs(T, B, H, torch.float64), 3 * H)
        keys = [k for k, v in inp.items() if v is not None]

        def f(*vals):
            d = dict(zip(keys, vals))
            return rf.gru_recurrence(d["xw_ln"], lengths, d["h0"], d["w_hh"], d["ln_hh_weight"], d["bias_ih"],
                                     d["bias_hh"], 1e-5, impl="cpp", ln_ih_weight=d["ln_ih_weight"])
    assert torch.autograd.gradcheck(f, [inp[k] for k in keys], eps=1e-6, atol=1e-5)


def test_input_ln_bitwise_deterministic(cpp_ok):
    _need("cpp", cpp_ok)
    inp = _with_ln_ih(_lstm_inputs(6, 64, 32, torch.float32), 128)
    fast = lambda *a, **k: rf.lstm_recurrence(*a[:11], impl="cpp", ln_ih_weight=inp["ln_ih_weight"])  # noqa: E731
    a = _run_lstm(fast, inp, None, True)
    b = _run_lstm(fast, inp, None, True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_input_ln_weight_shape_error():
    inp = _lstm_inputs(3, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="ln_ih_weight must have shape \\[16\\]"):
        rf.lstm_recurrence(inp["xw_ln"], None, inp["h0"], inp["c0"], inp["w_hh"], inp["ln_hh_weight"], inp["bias"],
                           inp["ln_cell_weight"], inp["ln_cell_bias"], 1e-5, True, ln_ih_weight=torch.ones(12))
