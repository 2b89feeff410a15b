"""What is particular to the ``"triton"`` recurrence (one fused kernel per step), beyond the contract
tests (tests/test_rnn_contract.py runs it against the reference for every option).

float32 against float64; bfloat16/float16 by flash-attn's rule against the torch-ops implementation
in the same dtype; B = 0; the choice of backend; the fallback to the torch ops when a GPU's Triton
cannot build a step kernel; a whole 2-layer bidirectional module on a PackedSequence.

Device: CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) by default; with ``LAYERNORM_TEST_DEVICE=cuda`` the same tests run compiled kernels on CUDA
tensors. The interpreter is slow, so the shapes are small.
"""
import os
import warnings

DEVICE = os.environ.get("LAYERNORM_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"   # must precede the first `import triton`
else:
    os.environ.pop("TRITON_INTERPRET", None)

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

if DEVICE != "cpu" and not torch.cuda.is_available():
    pytest.skip(f"LAYERNORM_TEST_DEVICE={DEVICE} but no CUDA device", allow_module_level=True)

from layernorm import rnn  # noqa: E402
from layernorm.rnn import dispatch  # noqa: E402

from _rnn_cases import cast, recurrence_args, run_recurrence  # noqa: E402
from tolerances import assert_close, tol  # noqa: E402

rt = pytest.importorskip("layernorm.rnn.impl_triton")

if DEVICE == "cpu" and type(rt._lstm_fwd_step).__name__ != "InterpretedFunction":
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it), so its "
        "kernels cannot run on CPU tensors; set TRITON_INTERPRET=1 before importing torch/layernorm",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("options", [False, True])
def test_float32_against_float64(mode, options):
    args, kw = recurrence_args(mode, 4, 5, 8, 3 if options and mode == "lstm" else None, options, torch.float32, DEVICE)
    got = run_recurrence(mode, args, kw, "triton")
    a64, k64 = cast(args, kw, torch.float64)
    want = run_recurrence(mode, a64, k64, "reference")
    for k, (x, y) in enumerate(zip(got, want)):
        assert_close(x, y.float(), kind="fwd" if k < 3 else "bwd", msg=f"output {k}")


@pytest.mark.parametrize("mode", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, mode):
    """flash-attn's rule (tests/tolerances.py), over four seeds: for every output and gradient, our
    largest error against a float32 reference on the same rounded inputs is at most twice the largest
    error of backend="torch" in ``dtype`` (same algorithm, torch ops in ``dtype``), plus atol.

    Taken over seeds because per seed the two errors of a gradient through 4 steps of a tiny layer
    fluctuate: single seeds land between 0.1x and 1.3x of the bound either way, with no systematic
    excess (the interpreter also rounds fp32 -> bf16 by truncation, unlike a GPU)."""
    worst_ours, worst_torch, refs = {}, {}, {}
    for seed in range(4):
        args, kw = recurrence_args(mode, 4, 5, 8, None, False, dtype, DEVICE, seed=seed)
        ours, same = run_recurrence(mode, args, kw, "triton"), run_recurrence(mode, args, kw, "torch")
        a32, k32 = cast(args, kw, torch.float32)
        want = run_recurrence(mode, a32, k32, "reference")
        for k, (o, s, w) in enumerate(zip(ours, same, want)):
            assert o.dtype == dtype, k
            worst_ours[k] = max(worst_ours.get(k, 0.0), (o.double() - w.double()).abs().max().item())
            worst_torch[k] = max(worst_torch.get(k, 0.0), (s.double() - w.double()).abs().max().item())
    for k in worst_ours:
        _, atol = tol(dtype, "fwd" if k < 3 else "bwd")
        assert worst_ours[k] <= 2 * worst_torch[k] + atol, (k, worst_ours[k], worst_torch[k])


def test_backend_choice(monkeypatch):
    x = torch.device(DEVICE)
    assert dispatch.resolve("triton", x, torch.float32) == "triton"
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.resolve(None, x, torch.float32) == "triton"
    if DEVICE == "cpu":
        # auto never picks the interpreter
        monkeypatch.delenv(dispatch.ENV)
        assert dispatch.resolve("auto", x, torch.float16) == "torch"
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            dispatch.resolve("triton", x, torch.float32)
    else:
        monkeypatch.delenv(dispatch.ENV)
        assert dispatch.resolve("auto", x, torch.float32) == "triton"


def test_unsupported_dtype():
    xw = torch.zeros(2, 1, 8, dtype=torch.int64, device=DEVICE)
    h = torch.zeros(1, 2, dtype=torch.int64, device=DEVICE)
    w = torch.zeros(8, 2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="floating-point"):
        rnn.lstm_recurrence(xw, None, h, h, w, w[:, 0], None, w[:, 0], backend="triton")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_module_packed(monkeypatch, mode):
    """LayerNormLSTM/GRU(num_layers=2, bidirectional=True, proj_size / zoneout) on a PackedSequence with
    LAYERNORM_RNN_BACKEND=triton against backend="reference" (outputs, states, every gradient)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    cls = rnn.LayerNormLSTM if mode == "LSTM" else rnn.LayerNormGRU
    kw = dict(proj_size=3, zoneout=0.2) if mode == "LSTM" else dict(zoneout=0.2)
    torch.manual_seed(0)
    ours = cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, **kw).to(DEVICE)
    theirs = cls(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, backend="reference", **kw).to(DEVICE)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=DEVICE)
    lengths = torch.tensor([2, 4, 1])
    monkeypatch.setenv(dispatch.ENV, "triton")
    results = []
    for mod in (ours, theirs):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)
        out, state = mod(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        finals = list(state) if mode == "LSTM" else [state]
        g = torch.Generator().manual_seed(3)
        loss = sum((v * torch.randn(v.shape, generator=g, dtype=torch.float64).to(DEVICE)).sum()
                   for v in (out.data, *finals))
        grads = torch.autograd.grad(loss, [xi, *mod.parameters()])
        results.append([out.data.detach(), *(f.detach() for f in finals), *grads])
    for k, (a, b) in enumerate(zip(*results)):
        assert_close(a, b, kind="fwd" if k < 3 else "bwd", msg=f"output {k}")


def test_kernel_build_failure_falls_back_to_torch_ops(monkeypatch):
    """A step kernel that the device's Triton cannot build (simulated) warns once and the torch-ops
    implementation takes over, forward and backward, with the same results."""

    class FakeCompileError(Exception):
        pass

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise FakeCompileError("out of registers")
            return launch

    monkeypatch.setattr(rt, "_COMPILE_ERRORS", (FakeCompileError,))
    monkeypatch.setattr(rt, "_BROKEN", {})
    monkeypatch.setattr(rt, "_lstm_fwd_step", Unbuildable())
    args, kw = recurrence_args("lstm", 3, 2, 4, None, False, torch.float64, DEVICE)
    with pytest.warns(RuntimeWarning, match="could not be built on this device"):
        got = rnn.lstm_recurrence(*args, **kw, backend="triton")
    want = rnn.lstm_recurrence(*args, **kw, backend="torch")
    for a, b in zip(got, want):
        assert_close(a, b)
    assert set(rt._BROKEN) == {"lstm_forward"}
    ga = torch.autograd.grad(sum(o.sum() for o in got), [args[0], args[4]])
    gb = torch.autograd.grad(sum(o.sum() for o in want), [args[0], args[4]])
    for a, b in zip(ga, gb):  # the Triton backward on the torch-ops forward's saved tensors
        assert_close(a, b, kind="bwd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the second call is quiet
        rnn.lstm_recurrence(*args, **kw, backend="triton")
