"""torch.compile(fullgraph=True) of LayerNormLSTM / LayerNormGRU through the recurrence custom ops.

Under torch.compile, ``layernorm.rnn.lstm_recurrence`` / ``gru_recurrence`` call
``layernorm::{lstm,gru}_recurrence`` (and ``..._recurrence_backward`` in the backward graph) instead of
the autograd.Function around the pybind C++ calls, which dynamo cannot trace. Checked here: no graph
break, one op per layer and direction in the forward and the backward graph, outputs, final states
and every gradient equal to eager (aot_eager and inductor on CPU), the inference path, and
``torch.library.opcheck`` of the four ops (schema, fake kernels, autograd registration).

Shapes are tiny: inductor compiles a C++ kernel per graph, slow on a loaded 2-core machine.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from layernorm import LayerNormGRU, LayerNormLSTM
from layernorm import rnn
from layernorm.rnn import dispatch

from tolerances import assert_close

IN, H, B, T = 3, 4, 2, 5

IMPLS = (["cpp"] if dispatch.native() is not None else []) + ["torch"]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)


def _model(mode: str, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    if mode == "LSTM":
        m = LayerNormLSTM(IN, H, num_layers=2, bidirectional=True, batch_first=True, cell_norm=True, **kw)
    else:
        m = LayerNormGRU(IN, H, num_layers=2, bidirectional=True, batch_first=True, **kw)
    return m.to(dtype).eval() if kw else m.to(dtype)


def _inputs(mode: str, dtype=torch.float32, R=H):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, IN, generator=g, dtype=dtype)
    h0 = torch.randn(4, B, R, generator=g, dtype=dtype)
    hx = (h0, torch.randn(4, B, H, generator=g, dtype=dtype)) if mode == "LSTM" else h0
    return x, hx


def _run(model, x, hx):
    """Forward and backward of a loss touching out and every final state; -> (outs, grads)."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, fin = model(x, hx)
    fins = list(fin) if isinstance(fin, tuple) else [fin]
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + sum((f * f).sum() for f in fins)
    loss.backward()
    grads = {n: p.grad for n, p in getattr(model, "_orig_mod", model).named_parameters()}
    grads["input"] = x.grad
    return [out.detach(), *(f.detach() for f in fins)], grads


def _compare(mode, compiled, model, x, hx):
    outs_e, grads_e = _run(model, x, hx)
    outs_c, grads_c = _run(compiled, x, hx)
    for a, b in zip(outs_c, outs_e):
        assert_close(a, b)
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        assert grads_c[k] is not None, k
        assert_close(grads_c[k], grads_e[k], kind="bwd", msg=k)


class _Recorder:
    """An aot_eager-like backend that keeps the forward and backward graphs it is given."""

    def __init__(self):
        self.graphs = []

    def _compile(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def backend(self):
        return aot_autograd(fw_compiler=self._compile, bw_compiler=self._compile)

    def count(self, name: str) -> list:
        """Calls of layernorm::<name> per recorded graph (forward first, then backward)."""
        target = getattr(torch.ops.layernorm, name).default
        return [sum(1 for n in g.graph.nodes if n.op == "call_function" and n.target is target)
                for g in self.graphs]


# ------------------------------------------------------------------------------------------------
# the modules, compiled


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_fullgraph_ops_in_graphs(mode):
    """fullgraph=True (raises on any graph break); 4 forward ops (2 layers x 2 directions) in the
    forward graph, 4 backward ops in the backward graph, and results equal to eager."""
    torch._dynamo.reset()
    model = _model(mode)
    x, hx = _inputs(mode)
    rec = _Recorder()
    compiled = torch.compile(model, fullgraph=True, backend=rec.backend())
    _compare(mode, compiled, model, x, hx)
    op = mode.lower() + "_recurrence"
    assert rec.count(op) == [4, 0]
    assert rec.count(op + "_backward") == [0, 4]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_fullgraph_with_the_regularizers_and_projection(mode):
    """proj_size and zoneout (evaluation form: deterministic) through the ops, against eager."""
    torch._dynamo.reset()
    kw = dict(zoneout=0.2, zoneout_cell=0.3, proj_size=2) if mode == "LSTM" else dict(zoneout=0.2)
    model = _model(mode, **kw)
    x, hx = _inputs(mode, R=2 if mode == "LSTM" else H)
    _compare(mode, torch.compile(model, fullgraph=True, backend="aot_eager"), model, x, hx)


def test_explain_no_graph_break():
    torch._dynamo.reset()
    model = _model("GRU")
    x, hx = _inputs("GRU")
    explanation = torch._dynamo.explain(model)(x, hx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_aot_eager_matches_eager(mode, impl, monkeypatch):
    monkeypatch.setenv(dispatch.ENV, impl)
    torch._dynamo.reset()
    model = _model(mode)
    x, hx = _inputs(mode)
    _compare(mode, torch.compile(model, fullgraph=True, backend="aot_eager"), model, x, hx)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_inductor_matches_eager(mode):
    torch._dynamo.reset()
    model = _model(mode)
    x, hx = _inputs(mode)
    _compare(mode, torch.compile(model, fullgraph=True, backend="inductor"), model, x, hx)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_inference_no_grad(mode):
    """Under no_grad the forward op runs with save=False (nothing saved) and no backward op exists."""
    torch._dynamo.reset()
    model = _model(mode)
    x, hx = _inputs(mode)
    rec = _Recorder()
    compiled = torch.compile(model, fullgraph=True, backend=rec.backend())
    with torch.no_grad():
        out_e, fin_e = model(x, hx)
        out_c, fin_c = compiled(x, hx)
    assert_close(out_c, out_e)
    for a, b in zip(fin_c if mode == "LSTM" else [fin_c], fin_e if mode == "LSTM" else [fin_e]):
        assert_close(a, b)
    op = mode.lower() + "_recurrence"
    assert rec.count(op) == [4]
    saves = [n.args[-2] for n in rec.graphs[0].graph.nodes
             if n.op == "call_function" and n.target is getattr(torch.ops.layernorm, op).default]
    assert saves == [False] * 4


_FRESH_SCRIPT = r"""
import torch
from layernorm import LayerNormLSTM
torch.manual_seed(0)
m = LayerNormLSTM(3, 4, num_layers=2, batch_first=True)
x = torch.randn(2, 5, 3)
out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)[0]   # before any eager call
torch.testing.assert_close(out, m(x)[0])
print("fresh-ok")
"""


def test_compile_before_any_eager_call():
    """A fresh process compiles before running eagerly: the backend is resolved (and the extension
    loaded) while tracing, without a graph break (fullgraph=True would raise)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _FRESH_SCRIPT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "fresh-ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


_TRITON_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
os.environ["LAYERNORM_RNN_BACKEND"] = "triton"
import torch
from layernorm import LayerNormGRU, LayerNormLSTM
for M in (LayerNormLSTM, LayerNormGRU):
    torch.manual_seed(0)
    m = M(3, 4, bidirectional=True, batch_first=True)
    x = torch.randn(2, 3, 3, requires_grad=True)
    ps = [x, *m.parameters()]
    ge = torch.autograd.grad(m(x)[0].sum(), ps)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)[0]
    torch.testing.assert_close(out, m(x)[0])
    for a, b in zip(torch.autograd.grad(out.sum(), ps), ge):
        torch.testing.assert_close(a, b)
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
torch.library.opcheck(torch.ops.layernorm.lstm_recurrence.default, (
    r(3, 2, 16), torch.tensor([3, 1]), r(2, 2), r(2, 4), r(16, 2), r(16), r(16), r(16), r(4), r(4), r(2, 4),
    None, None, None, 1e-5, True, "triton"))
torch.library.opcheck(torch.ops.layernorm.gru_recurrence.default, (
    r(3, 2, 12), None, r(2, 4), r(12, 4), r(12), r(12), r(12), r(12), None, None, 1e-5, True, "triton"))
print("triton-ok")
"""


def test_triton_impl_under_compile_interpreted():
    """backend="triton" through the ops, on CPU tensors under Triton's interpreter (a subprocess: the
    interpreter must be chosen before triton is first imported)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", LAYERNORM_RNN_BACKEND="triton")
    res = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "triton-ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


def test_padded_lengths_under_compile():
    """The recurrence with lengths, compiled on its own: the range check runs inside the op."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    xw = torch.randn(T, B, 4 * H, generator=g, requires_grad=True)
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
    w = (torch.randn(4 * H, H, generator=g) / 2).requires_grad_(True)
    gh, gi = torch.ones(4 * H, requires_grad=True), torch.ones(4 * H, requires_grad=True)
    wc, bc = torch.ones(H), torch.zeros(H)
    lengths = torch.tensor([T, 2])

    def f(xw, w, gh, gi, lengths):
        return rnn.lstm_recurrence(xw, lengths, h0, c0, w, gh, None, gi, wc, bc)

    res_c = torch.compile(f, fullgraph=True, backend="aot_eager")(xw, w, gh, gi, lengths)
    res_e = f(xw, w, gh, gi, lengths)
    for a, b in zip(res_c, res_e):
        assert_close(a, b)
    gc = torch.autograd.grad(sum(r.sum() for r in res_c), (xw, w, gh, gi))
    ge = torch.autograd.grad(sum(r.sum() for r in res_e), (xw, w, gh, gi))
    for a, b in zip(gc, ge):
        assert_close(a, b, kind="bwd")
    with pytest.raises(ValueError, match="lengths must lie"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(xw, w, gh, gi, torch.tensor([T + 1, 1]))


# ------------------------------------------------------------------------------------------------
# opcheck of the ops themselves


def _lstm_args(impl, dtype, with_lengths, options, grad=True, save=None):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    t, b, h = 3, 3, 4
    p = 2 if options else h
    xw, h0, c0 = r(t, b, 4 * h), r(b, p), r(b, h)
    w, gh, bias, gi = r(4 * h, p) / 2, 1 + r(4 * h) / 4, r(4 * h) / 4, 1 + r(4 * h) / 4
    wc, bc = 1 + r(h) / 4, r(h) / 4
    w_hr = r(p, h) / 2 if options else None
    for v in (xw, h0, c0, w, gh, bias, gi, wc, bc, w_hr):
        if v is not None:
            v.requires_grad_(grad)
    rec = (torch.rand(b, p, generator=g) < 0.7).to(dtype) / 0.7 if options else None
    zh = (torch.rand(t, b, p, generator=g) < 0.3).to(dtype) if options else None
    zc = (torch.rand(t, b, h, generator=g) < 0.3).to(dtype) if options else None
    lengths = torch.tensor([3, 0, 2]) if with_lengths else None
    return (xw, lengths, h0, c0, w, gh, bias, gi, wc, bc, w_hr, rec, zh, zc, 1e-5, grad if save is None else save, impl)


def _gru_args(impl, dtype, with_lengths, options, grad=True, save=None):
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    t, b, h = 3, 3, 4
    xw, h0 = r(t, b, 3 * h), r(b, h)
    w, gh, bih, bhh, gi = r(3 * h, h) / 2, 1 + r(3 * h) / 4, r(3 * h) / 4, r(3 * h) / 4, 1 + r(3 * h) / 4
    for v in (xw, h0, w, gh, bih, bhh, gi):
        v.requires_grad_(grad)
    rec = (torch.rand(b, h, generator=g) < 0.7).to(dtype) / 0.7 if options else None
    zh = (torch.rand(t, b, h, generator=g) < 0.3).to(dtype) if options else None
    lengths = torch.tensor([3, 0, 2]) if with_lengths else None
    return (xw, lengths, h0, w, gh, bih, bhh, gi, rec, zh, 1e-5, grad if save is None else save, impl)


_CASES = [
    (impl, dtype, lens, options)
    for impl in IMPLS
    for dtype in (torch.float64, torch.float32)
    for lens in (False, True)
    for options in (False, True)
]


def _case_id(c):
    impl, dtype, lens, options = c
    return f"{impl}-{str(dtype)[6:]}-{'len' if lens else 'nolen'}-{'options' if options else 'plain'}"


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_opcheck_forward(mode, case):
    args = (_lstm_args if mode == "lstm" else _gru_args)(*case)
    torch.library.opcheck(getattr(torch.ops.layernorm, f"{mode}_recurrence").default, args)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("case", [c for c in _CASES if c[1] == torch.float64], ids=_case_id)
def test_opcheck_inference_and_backward(mode, case):
    """The forward op with save=False, and the backward op on the saved tensors of a forward."""
    fwd = getattr(torch.ops.layernorm, f"{mode}_recurrence").default
    bwd = getattr(torch.ops.layernorm, f"{mode}_recurrence_backward").default
    make = _lstm_args if mode == "lstm" else _gru_args
    torch.library.opcheck(fwd, make(*case, grad=False))
    args = make(*case, grad=False, save=True)
    res = fwd(*args)
    g = torch.Generator().manual_seed(5)
    n_in = 15 if mode == "lstm" else 11  # the contract's arguments, eps included
    n_out = 3 if mode == "lstm" else 2
    grads = [torch.randn(v.shape, generator=g, dtype=v.dtype) for v in res[:n_out]]
    bargs = (*args[:n_in], res[0], *res[n_out:], *grads, args[-1])
    torch.library.opcheck(bwd, bargs, test_utils=("test_schema", "test_faketensor"))
