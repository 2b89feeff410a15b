"""The recurrence contract (layernorm/rnn/contract.py), tested once against every implementation.

Every implementation (``torch``; ``cpp`` when the extension builds; ``triton`` when Triton imports,
through its interpreter on CPU) against the reference loop, in float64: outputs, final states and
every gradient, for every option (bias, cell LN, lengths in [0, T] in any order, LSTMP projection,
recurrent dropout mask, zoneout of h and c in training and evaluation form); the saved tensors
equal across implementations and each backward run on another's saved tensors; the inference path;
B = 0; determinism; argument errors; and the one switch, ``backend=`` / ``$LAYERNORM_RNN_BACKEND``.
"""
from __future__ import annotations

import os

import pytest
import torch

from layernorm import rnn
from layernorm.rnn import contract, dispatch, reference
from layernorm.rnn.contract import GRUArgs, LSTMArgs

from tolerances import assert_close

D64 = torch.float64


def _impls():
    names = ["torch"]
    if dispatch.native() is not None:
        names.append("cpp")
    if dispatch._triton()[0] is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        names.append("triton")
    return names


IMPLS = _impls()


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)


def _leaf(g, *shape, scale=1.0, offset=0.0):
    return (torch.randn(*shape, generator=g, dtype=D64) * scale + offset).requires_grad_(True)


def _bernoulli(g, p, *shape):
    return (torch.rand(*shape, generator=g, dtype=D64) < p).to(D64)


# An option set: (name, dict). Shapes: T steps, B rows, H hidden; P = projection size.
LSTM_OPTIONS = [
    ("plain", dict()),
    ("nobias-nocellnorm", dict(bias=False, cell_norm=False)),
    ("lengths", dict(lengths=True)),
    ("proj", dict(proj=3)),
    ("recurrent-dropout", dict(rec=True)),
    ("zoneout-train", dict(zh="mask", zc="mask")),
    ("zoneout-eval", dict(zh="p", zc="p")),
    ("everything", dict(lengths=True, proj=3, rec=True, zh="mask", zc="mask", bias=False)),
    ("everything-nocellnorm", dict(lengths=True, proj=2, rec=True, zh="p", zc="mask", cell_norm=False)),
]
GRU_OPTIONS = [
    ("plain", dict()),
    ("nobias-ih", dict(bias_ih=False)),
    ("nobias-hh", dict(bias_hh=False)),
    ("lengths", dict(lengths=True)),
    ("recurrent-dropout", dict(rec=True)),
    ("zoneout-train", dict(zh="mask")),
    ("zoneout-eval", dict(zh="p")),
    ("everything", dict(lengths=True, rec=True, zh="mask", bias_hh=False)),
]


def _lengths(T, B):
    """Unsorted lengths with a 0 (that row returns its initial state) and a full one."""
    pattern = [T, 0, max(T - 2, 1), 1, T - 1, T]
    return torch.tensor([pattern[b % len(pattern)] for b in range(B)], dtype=torch.int64)


def lstm_args(T, B, H, seed=0, lengths=False, proj=0, rec=False, zh=None, zc=None, bias=True, cell_norm=True):
    g = torch.Generator().manual_seed(seed)
    R = proj or H
    masks_g = torch.Generator().manual_seed(seed + 100)

    def zone(kind, width):
        if kind is None:
            return None
        return _bernoulli(masks_g, 0.3, T, B, width) if kind == "mask" else torch.full((T, B, width), 0.25, dtype=D64)

    return LSTMArgs(
        xw=_leaf(g, T, B, 4 * H),
        lengths=_lengths(T, B) if lengths else None,
        h0=_leaf(g, B, R, scale=0.5),
        c0=_leaf(g, B, H, scale=0.5),
        w_hh=_leaf(g, 4 * H, R, scale=R ** -0.5),
        ln_hh_weight=_leaf(g, 4 * H, scale=0.2, offset=1.0),
        bias=_leaf(g, 4 * H, scale=0.3) if bias else None,
        ln_ih_weight=_leaf(g, 4 * H, scale=0.2, offset=1.0),
        ln_cell_weight=_leaf(g, H, scale=0.2, offset=1.0) if cell_norm else None,
        ln_cell_bias=_leaf(g, H, scale=0.3) if cell_norm else None,
        w_hr=_leaf(g, R, H, scale=H ** -0.5) if proj else None,
        recurrent_mask=_bernoulli(masks_g, 0.7, B, R) / 0.7 if rec else None,
        zoneout_h=zone(zh, R),
        zoneout_c=zone(zc, H),
        eps=1e-5,
    )


def gru_args(T, B, H, seed=0, lengths=False, rec=False, zh=None, bias_ih=True, bias_hh=True):
    g = torch.Generator().manual_seed(seed)
    masks_g = torch.Generator().manual_seed(seed + 100)
    zoneout = None
    if zh is not None:
        zoneout = _bernoulli(masks_g, 0.3, T, B, H) if zh == "mask" else torch.full((T, B, H), 0.25, dtype=D64)
    return GRUArgs(
        xw=_leaf(g, T, B, 3 * H),
        lengths=_lengths(T, B) if lengths else None,
        h0=_leaf(g, B, H, scale=0.5),
        w_hh=_leaf(g, 3 * H, H, scale=H ** -0.5),
        ln_hh_weight=_leaf(g, 3 * H, scale=0.2, offset=1.0),
        bias_ih=_leaf(g, 3 * H, scale=0.3) if bias_ih else None,
        bias_hh=_leaf(g, 3 * H, scale=0.3) if bias_hh else None,
        ln_ih_weight=_leaf(g, 3 * H, scale=0.2, offset=1.0),
        recurrent_mask=_bernoulli(masks_g, 0.7, B, H) / 0.7 if rec else None,
        zoneout_h=zoneout,
        eps=1e-5,
    )


def _call(mode, a, backend):
    if mode == "lstm":
        return rnn.lstm_recurrence(*a[:10], w_hr=a.w_hr, recurrent_mask=a.recurrent_mask, zoneout_h=a.zoneout_h,
                                   zoneout_c=a.zoneout_c, eps=a.eps, backend=backend)
    return rnn.gru_recurrence(*a[:8], recurrent_mask=a.recurrent_mask, zoneout_h=a.zoneout_h, eps=a.eps,
                              backend=backend)


def _leaves(a):
    return [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]


def _outputs_and_grads(mode, a, backend, seed=7):
    """out, final states, and the gradient of a random linear loss of all of them w.r.t. every input."""
    res = _call(mode, a, backend)
    g = torch.Generator().manual_seed(seed)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum() for r in res)
    leaves = _leaves(a)
    return list(res) + list(torch.autograd.grad(loss, leaves, allow_unused=False))


def _names(mode, a):
    outs = ["out", "h_n", "c_n"] if mode == "lstm" else ["out", "h_n"]
    return outs + ["d " + f for f, t in zip(a._fields, a) if isinstance(t, torch.Tensor) and t.requires_grad]


def _check(got, want, names, kind_split):
    for k, (x, y, n) in enumerate(zip(got, want, names)):
        assert_close(x, y, kind="fwd" if k < kind_split else "bwd", msg=n)


# ---------------------------------------------------------------- every implementation = the reference


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,opts", LSTM_OPTIONS, ids=[n for n, _ in LSTM_OPTIONS])
@pytest.mark.parametrize("T,B,H", [(4, 5, 13), (3, 1, 8)])  # B=1: the C++ column split; 13: vector tails
def test_lstm_matches_reference(impl, name, opts, T, B, H):
    a = lstm_args(T, B, H, **opts)
    got = _outputs_and_grads("lstm", a, impl)
    want = _outputs_and_grads("lstm", a, "reference")
    _check(got, want, _names("lstm", a), 3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name,opts", GRU_OPTIONS, ids=[n for n, _ in GRU_OPTIONS])
@pytest.mark.parametrize("T,B,H", [(4, 5, 13), (3, 1, 8)])
def test_gru_matches_reference(impl, name, opts, T, B, H):
    a = gru_args(T, B, H, **opts)
    got = _outputs_and_grads("gru", a, impl)
    want = _outputs_and_grads("gru", a, "reference")
    _check(got, want, _names("gru", a), 2)


def test_reference_matches_the_cell_written_out():
    """The reference loop against the equations typed in its docstring, one step by hand (no lengths)."""
    a = lstm_args(1, 3, 5, proj=2, rec=True, zh="mask", zc="mask")
    out, h, c = reference.lstm_recurrence(*a)
    H = 5
    ln = lambda v, w, b=None: torch.nn.functional.layer_norm(v, (v.shape[-1],), w, b, 1e-5)  # noqa: E731
    pre = ln(a.xw[0], a.ln_ih_weight) + ln((a.h0 * a.recurrent_mask) @ a.w_hh.T, a.ln_hh_weight) + a.bias
    i, f, g, o = pre[:, :H].sigmoid(), pre[:, H:2 * H].sigmoid(), pre[:, 2 * H:3 * H].tanh(), pre[:, 3 * H:].sigmoid()
    c_t = f * a.c0 + i * g
    h_t = (o * ln(c_t, a.ln_cell_weight, a.ln_cell_bias).tanh()) @ a.w_hr.T
    c_t = c_t + a.zoneout_c[0] * (a.c0 - c_t)
    h_t = h_t + a.zoneout_h[0] * (a.h0 - h_t)
    assert_close(out[0], h_t)
    assert_close(h, h_t)
    assert_close(c, c_t)


# ---------------------------------------------------------------- saved tensors: one contract


def _forward_saved(mode, a, impl):
    imp = dispatch.implementation(impl)
    with torch.no_grad():
        return (imp.lstm_forward if mode == "lstm" else imp.gru_forward)(a, True)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_saved_tensors_are_the_same_in_every_implementation(mode):
    """Shapes, dtypes and values of the saved tensors (contract.LSTM_SAVED / GRU_SAVED), with lengths
    and every option, and each backward run on every other implementation's saved tensors."""
    if len(IMPLS) < 2:
        pytest.skip("one implementation only")
    opts = dict(lengths=True, rec=True, zh="mask") if mode == "gru" else dict(lengths=True, proj=3, rec=True,
                                                                              zh="mask", zc="mask")
    T, B, H = 4, 5, 6
    a = (gru_args if mode == "gru" else lstm_args)(T, B, H, **opts)
    n_out = 3 if mode == "lstm" else 2
    shapes = (contract.lstm_saved_shapes if mode == "lstm" else contract.gru_saved_shapes)(T, B, H)
    saved = {}
    for impl in IMPLS:
        res = _forward_saved(mode, a, impl)
        saved[impl] = res
        for s, shape in zip(res[n_out:], shapes):
            assert tuple(s.shape) == shape, impl
        assert res[-1].dtype == contract.stats_dtype(D64)
        for x, y in zip(res, saved["torch"]):
            assert_close(x, y, msg=impl)
    g = torch.Generator().manual_seed(3)
    douts = [torch.randn(r.shape, generator=g, dtype=D64) for r in saved["torch"][:n_out]]
    grads = {}
    for impl in IMPLS:
        imp = dispatch.implementation(impl)
        backward = imp.lstm_backward if mode == "lstm" else imp.gru_backward
        for other in IMPLS:
            res = saved[other]
            with torch.no_grad():  # as autograd runs a backward
                grads[impl, other] = backward(a, res[0], *res[n_out:], *douts)
    base = grads["torch", "torch"]
    names = contract.LSTM_GRADS if mode == "lstm" else contract.GRU_GRADS
    for key, gs in grads.items():
        for x, y, n in zip(gs, base, names):
            assert (x is None) == (y is None), (key, n)
            if x is not None:
                assert_close(x, y, kind="bwd", msg=f"{key} d{n}")


@pytest.mark.parametrize("impl", IMPLS)
def test_saved_tensors_past_the_end_are_zero_and_c_frozen(impl):
    T, B, H = 4, 5, 3
    a = lstm_args(T, B, H, lengths=True)
    out, h_n, c_n, hw_hat, gates, cs, stats = _forward_saved("lstm", a, impl)
    for b, n in enumerate(a.lengths.tolist()):
        assert torch.all(out[n:, b] == 0) and torch.all(hw_hat[n:, b] == 0) and torch.all(gates[n:, b] == 0)
        assert torch.all(stats[n:, b] == 0)
        frozen = a.c0[b] if n == 0 else cs[n - 1, b]
        for t in range(n, T):
            assert torch.equal(cs[t, b], frozen)
        assert torch.equal(c_n[b], frozen)
        assert torch.equal(h_n[b], a.h0[b] if n == 0 else out[n - 1, b])


# ---------------------------------------------------------------- paths, shapes, determinism


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_inference_path_equals_training_path(impl, mode):
    a = (lstm_args(5, 4, 7, lengths=True, proj=3, zh="p") if mode == "lstm"
         else gru_args(5, 4, 7, lengths=True, zh="p"))
    train = _call(mode, a, impl)
    with torch.no_grad():
        infer = _call(mode, a, impl)
    for x, y in zip(infer, train):
        assert torch.equal(x, y.detach())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_empty_batch(impl, mode):
    a = lstm_args(3, 0, 4) if mode == "lstm" else gru_args(3, 0, 4)
    res = _outputs_and_grads(mode, a, impl)
    assert res[0].shape == (3, 0, 4)
    for t, leaf in zip(res[len(res) - len(_leaves(a)):], _leaves(a)):
        assert t.shape == leaf.shape and torch.isfinite(t).all()


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton"])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_bitwise_deterministic(impl, mode):
    opts = dict(lengths=True, rec=True) if mode == "gru" else dict(lengths=True, proj=5, rec=True)
    a = (lstm_args if mode == "lstm" else gru_args)(6, 64, 24, **opts)
    first, second = _outputs_and_grads(mode, a, impl), _outputs_and_grads(mode, a, impl)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "triton"])
def test_gradcheck(impl):
    for mode, a in (("lstm", lstm_args(3, 2, 3, lengths=True, proj=2, rec=True, zh="mask", zc="mask")),
                    ("gru", gru_args(3, 2, 3, lengths=True, rec=True, zh="mask"))):
        leaves = _leaves(a)
        idx = [k for k, t in enumerate(a) if isinstance(t, torch.Tensor) and t.requires_grad]

        def f(*ts, a=a, mode=mode):
            b = list(a)
            for k, t in zip(idx, ts):
                b[k] = t
            return _call(mode, type(a)(*b), impl)

        assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


# ---------------------------------------------------------------- arguments


def test_lengths_rules():
    a = lstm_args(3, 2, 4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        _call("lstm", a._replace(lengths=torch.tensor([4, 1])), "torch")
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        _call("lstm", a._replace(lengths=torch.tensor([-1, 1])), "torch")
    with pytest.raises(RuntimeError, match=r"Expected lengths of size \[2\]"):
        _call("lstm", a._replace(lengths=torch.tensor([1, 1, 1])), "torch")
    with pytest.raises(TypeError, match="lengths must be an integer tensor"):
        _call("lstm", a._replace(lengths=torch.tensor([1.0, 1.0])), "torch")
    assert contract.check_lengths(torch.tensor([3, 3]), 3, 2) is None  # all full: nothing to mask
    assert contract.check_lengths([3, 1], 3, 2).dtype == torch.int64


def test_argument_errors_name_the_argument():
    a = lstm_args(3, 2, 4)
    cases = [
        (dict(h0=torch.zeros(2, 5, dtype=D64)), RuntimeError, r"Expected h0 of size \[2, 4\], but got \[2, 5\]"),
        (dict(c0=torch.zeros(2, 4)), RuntimeError, "Expected c0 to have dtype torch.float64"),
        (dict(w_hh=torch.zeros(16, 3, dtype=D64)), RuntimeError, r"Expected w_hh of size \[16, 4\]"),
        (dict(bias=torch.zeros(15, dtype=D64)), RuntimeError, r"Expected bias of size \[16\]"),
        (dict(ln_cell_bias=None), ValueError, "ln_cell_weight and ln_cell_bias must be given together"),
        (dict(w_hr=torch.zeros(2, 5, dtype=D64)), RuntimeError, r"Expected w_hr of size \[proj_size, 4\]"),
        (dict(recurrent_mask=torch.ones(2, 3, dtype=D64)), RuntimeError, r"Expected recurrent_mask of size \[2, 4\]"),
        (dict(zoneout_c=torch.ones(3, 2, 5, dtype=D64)), RuntimeError, r"Expected zoneout_c of size \[3, 2, 4\]"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number"),
        (dict(xw=torch.zeros(0, 2, 16, dtype=D64)), RuntimeError, "Expected xw of size"),
        (dict(xw=torch.zeros(3, 2, 15, dtype=D64)), RuntimeError, "Expected xw of size"),
    ]
    for change, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            _call("lstm", a._replace(**change), "torch")
    g = gru_args(3, 2, 4)
    with pytest.raises(RuntimeError, match=r"Expected bias_hh of size \[12\]"):
        _call("gru", g._replace(bias_hh=torch.zeros(4, dtype=D64)), "torch")


# ---------------------------------------------------------------- backend=


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.resolve("torch", cpu, torch.float32) == "torch"
    assert dispatch.resolve("reference", cpu, torch.float16) == "reference"
    auto = dispatch.resolve(None, cpu, torch.float32)
    assert auto == ("cpp" if "cpp" in IMPLS else "torch")
    assert dispatch.resolve(None, cpu, torch.bfloat16) == "torch"  # the C++ loop is float32/float64 only
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert dispatch.resolve(None, cpu, torch.float32) == "reference"
    assert dispatch.resolve("torch", cpu, torch.float32) == "torch"  # the argument wins over the variable
    monkeypatch.setenv(dispatch.ENV, "bogus")
    with pytest.raises(ValueError, match="LAYERNORM_RNN_BACKEND"):
        dispatch.resolve(None, cpu, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        rnn.LayerNormLSTM(3, 4, backend="fast")
    with pytest.raises(ValueError, match="backend='cpp' needs CPU float32/float64"):
        dispatch.resolve("cpp", cpu, torch.float16)
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend='triton' needs CUDA"):
            dispatch.resolve("triton", cpu, torch.float32)


def test_backend_without_the_extension(monkeypatch):
    """No compiler: auto falls back to the torch ops, backend='cpp' says why it cannot run."""
    monkeypatch.setattr(dispatch, "native", lambda: None)
    assert dispatch.resolve(None, "cpu", torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="C\\+\\+ extension is not built"):
        dispatch.resolve("cpp", "cpu", torch.float32)
    m = rnn.LayerNormGRU(3, 4)
    out, h = m(torch.randn(5, 2, 3))
    assert out.shape == (5, 2, 4)


def test_resolved_backend_is_public():
    assert rnn.resolved_backend("torch", "cpu", torch.float32) == "torch"
    assert set(rnn.BACKENDS) == {"auto", "reference", "torch", "cpp", "triton"}
