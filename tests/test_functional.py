"""Forward and every gradient of the four ops, for every CPU backend, against the reference backend
and against torch.nn.functional (the fused ops against norm(x + r)); plus the backend contract, fp64
gradcheck/gradgradcheck, determinism, and backend selection."""
from __future__ import annotations

import pytest
import torch

import layernorm
from layernorm import backends
from layernorm.backends import reference

from _helpers import OPS, is_fused, is_rms, make_case, run
from conftest import CPU_BACKENDS
from tolerances import LOW_PRECISION, assert_close, assert_flash_rule

# torch.nn.functional.rms_norm warns on bf16 input with fp32 weight (it falls back to its composite)
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

# (shape, normalized_shape): 1, primes, non-powers of two, rank 2 to 5, multi-dim normalized_shape,
# zero-size batch.
SHAPES = [
    ((1, 1), (1,)),
    ((7, 13), (13,)),
    ((3, 5, 97), (97,)),
    ((4, 1000), (1000,)),
    ((2, 3, 4, 24), (4, 24)),
    ((2, 1, 3, 2, 5), (3, 2, 5)),
    ((0, 16), (16,)),
]
# (input dtype, weight/bias dtype)
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16", "bf16-fp32w"]


def check_against_oracles(case, backend, dtype, param_dtype):
    ours = run(case, backend=backend)
    if dtype in LOW_PRECISION:
        # flash-attn's rule: fp32 oracle on the same rounded inputs, torch in the same dtype as yardstick
        ref32 = run(case.to(torch.float32), backend="reference")
        torch_same = run(case, impl="torch")
        for k in ours:
            assert ours[k].dtype == torch_same[k].dtype, k
            kind = "fwd" if k in ("y", "z") else "bwd"
            assert_flash_rule(ours[k], torch_same[k], ref32[k], kind, dtype=dtype, name=k)
    else:
        for oracle in (run(case, backend="reference"), run(case, impl="torch")):
            for k in ours:
                kind = "fwd" if k in ("y", "z") else "bwd"
                assert_close(ours[k], oracle[k], kind, msg=lambda m, k=k: f"{k}: {m}")
    return ours


# every dtype with weight (and bias); without affine parameters only fp32 and bf16, to keep it quick
DTYPE_AFFINE = [pytest.param(d, p, True, id=i) for (d, p), i in zip(DTYPES, DTYPE_IDS)] + [
    pytest.param(torch.float32, torch.float32, False, id="fp32-plain"),
    pytest.param(torch.bfloat16, torch.bfloat16, False, id="bf16-plain"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,param_dtype,affine", DTYPE_AFFINE)
@pytest.mark.parametrize("shape,nshape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_grads(backend, op, dtype, param_dtype, shape, nshape, affine):
    case = make_case(op, shape, nshape, dtype, param_dtype, weight=affine, bias=affine)
    ours = check_against_oracles(case, backend, dtype, param_dtype)
    assert ours["y"].shape == case.x.shape and ours["y"].dtype == dtype
    if affine:
        assert ours["dweight"].dtype == param_dtype


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_weight_without_bias_and_bias_without_weight(backend, op):
    for weight, bias in ((True, False), (False, True)):
        case = make_case(op, (6, 40), (40,), weight=weight, bias=bias)
        check_against_oracles(case, backend, torch.float32, torch.float32)


NONCONTIGUOUS = {
    "transpose": ((24, 6), lambda t: t.t()),                    # (6, 24), strides (1, 6)
    "slice": ((5, 48), lambda t: t[:, ::2]),                    # (5, 24), stride 2 in the row
    "permute3d": ((24, 3, 4), lambda t: t.permute(1, 2, 0)),    # (3, 4, 24)
    "expand": ((1, 24), lambda t: t.expand(5, 24)),             # stride 0 over rows
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", list(NONCONTIGUOUS))
def test_noncontiguous_input(backend, op, kind):
    shape, transform = NONCONTIGUOUS[kind]
    case = make_case(op, shape, (24,), transform=transform)
    assert not case.x.is_contiguous()
    case.weight = torch.randn(48)[::2]  # non-contiguous weight too
    check_against_oracles(case, backend, torch.float32, torch.float32)


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_wide_rows_over_65536(backend, op):
    # Kernels that keep a row on chip usually cap the block at 65536 columns (Liger, flash-attn).
    case = make_case(op, (2, 70001), (70001,))
    check_against_oracles(case, backend, torch.float32, torch.float32)


needs_native = pytest.mark.skipif(not backends.native_available(), reason="the C++ extension is not built")


@needs_native
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hf", ["plain", "offset", "round"])
def test_kernel_ops_contract(rms, residual, dtype, hf):
    """The kernel ops every operator runs on (layernorm::norm_forward / norm_backward) against the
    reference module's forward/backward, output by output (the statistics included)."""
    if hf != "plain" and not rms:
        pytest.skip("offset and rounding are RMSNorm options")
    offset, rounded = (1.0 if hf == "offset" else 0.0), hf == "round"
    M, N = 9, 37
    x = torch.randn(M, N).to(dtype)
    r = torch.randn(M, N).to(dtype) if residual else None
    w, b = torch.randn(N).to(dtype), (None if rms else torch.randn(N).to(dtype))
    dy = torch.randn(M, N).to(dtype)
    dz = torch.randn(M, N).to(dtype) if residual else None
    got = torch.ops.layernorm.norm_forward(x, r, [N], w, b, 1e-5, rms, offset, rounded)
    exp = reference.forward(x, r, w, b, 1e-5, rms, offset, rounded)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    for g, e, name in zip(got, exp, ("y", "z", "mean", "rstd")):
        if e is None:
            assert g.numel() == 0, name  # absent outputs are empty tensors
            continue
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert_close(g, e, "fwd", dtype=dtype if name in ("y", "z") else stat)
    z = got[1] if residual else x
    mask = [True, True, not rms]
    gb = torch.ops.layernorm.norm_backward(dy, dz, z, got[2], got[3], [N], w, b, rms, offset, rounded, mask)
    eb = reference.backward(dy, dz, z, w, b, exp[2], exp[3], rms, offset, rounded)
    for g, e, name in zip(gb, eb, ("dx", "dweight", "dbias")):
        if e is None:
            assert g.numel() == 0, name
            continue
        assert g.dtype == e.dtype, name
        assert_close(g, e, "bwd", dtype=dtype)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_reference_backward_is_autograd_of_reference_forward(rms, residual):
    """The hand-derived backward (docs/math.md) equals autograd of the forward, in fp64."""
    M, N = 6, 11
    x = torch.randn(M, N, dtype=torch.float64, requires_grad=True)
    r = torch.randn(M, N, dtype=torch.float64, requires_grad=True) if residual else None
    w = torch.randn(N, dtype=torch.float64, requires_grad=True)
    b = None if rms else torch.randn(N, dtype=torch.float64, requires_grad=True)
    dy, dz = torch.randn(M, N, dtype=torch.float64), torch.randn(M, N, dtype=torch.float64)
    y, z, mean, rstd = reference.forward(x, r, w, b, 1e-5, rms)
    outs, grads_out = [y], [dy]
    if residual:
        outs.append(z)
        grads_out.append(dz)
    leaves = [t for t in (x, w, b) if t is not None]
    auto = torch.autograd.grad(outs, leaves, grads_out)
    h = (z if residual else x).detach()
    dx, dw, db = reference.backward(dy, dz if residual else None, h, w.detach(), None if b is None else b.detach(),
                                    None if mean is None else mean.detach(), rstd.detach(), rms)
    torch.testing.assert_close(dx, auto[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, auto[1], rtol=1e-10, atol=1e-12)
    if b is not None:
        torch.testing.assert_close(db, auto[2], rtol=1e-10, atol=1e-12)


def _fp64_args(op, shape, nshape):
    case = make_case(op, shape, nshape, torch.float64)
    args = [case.x] + ([case.residual] if is_fused(op) else []) + [case.weight] + ([] if is_rms(op) else [case.bias])
    return [a.detach().requires_grad_(True) for a in args]


def _fp64_fn(op, nshape, backend):
    fn = getattr(layernorm, op)
    if is_fused(op):
        return lambda x, r, *p: tuple(fn(x, r, nshape, *p, eps=1e-5, backend=backend))
    return lambda x, *p: fn(x, nshape, *p, eps=1e-5, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck_fp64(backend, op):
    for shape, nshape in (((3, 5), (5,)), ((2, 2, 3), (2, 3))):
        fn, args = _fp64_fn(op, nshape, backend), _fp64_args(op, shape, nshape)
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_deterministic_bitwise(backend, op):
    """Same inputs -> bitwise equal outputs and dweight, over repeats and thread counts."""
    case = make_case(op, (64, 300), (300,))
    threads = torch.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            results.setdefault(n, []).append(run(case, backend=backend))
    finally:
        torch.set_num_threads(threads)
    runs = results[1] + results[2]
    if backend == "torch" and op == "layer_norm":
        # ATen's CPU LayerNorm backward sums dweight in one buffer per thread: the summation order,
        # hence the last bits, follow the thread count. Only repeats at one count are compared.
        runs = results[2]
        for k in ("y", "dx", "dweight"):
            assert torch.equal(results[1][0][k], results[1][1][k]), k
    for other in runs[1:]:
        for k in ("y", "dx", "dweight"):
            assert torch.equal(runs[0][k], other[k]), k


def test_available_backends():
    names = layernorm.available_backends()
    assert {"reference", "torch"} <= set(names)
    assert set(layernorm.available_backends("cpu")) <= set(names) | {"triton"}
    assert set(CPU_BACKENDS) <= set(layernorm.available_backends("cpu"))
    assert all(n in backends.BACKENDS for n in names)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_automatic_choice_never_fails(dtype):
    name = backends.resolve_backend(None, torch.device("cpu"), dtype)
    assert name in layernorm.available_backends("cpu")
    assert backends.resolve_backend("auto", torch.device("cpu"), dtype) == name
    # a device nothing special is known for still gets a backend (torch's)
    assert backends.choose_backend(torch.device("meta"), dtype) == "torch"
    x = torch.randn(3, 8).to(dtype)
    assert layernorm.layer_norm(x, (8,)).dtype == dtype
    assert layernorm.rms_norm(x, (8,)).dtype == dtype


def test_env_var_selects_backend(monkeypatch, backend):
    monkeypatch.setenv("LAYERNORM_BACKEND", backend)
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) == backend
    # an explicit argument wins over the environment
    other = "reference" if backend != "reference" else "torch"
    assert backends.resolve_backend(other, torch.device("cpu"), torch.float32) == other
    # the variable changes what runs: count the calls each backend makes
    calls = []
    if backend == "torch":
        target, name = torch.nn.functional, "layer_norm"
    elif backend == "reference":
        target, name = reference, "forward"
    else:
        target, name = layernorm.functional, "_EAGER_OPS"
    original = getattr(target, name)
    if name == "_EAGER_OPS":
        counted = {k: (lambda *a, _f=f: calls.append(1) or _f(*a)) for k, f in original.items()}
    else:
        counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr(target, name, counted)
    layernorm.layer_norm(torch.randn(2, 8), (8,))
    assert calls, "LAYERNORM_BACKEND was not used"
    monkeypatch.setenv("LAYERNORM_BACKEND", "auto")
    assert backends.resolve_backend(None, torch.device("cpu"), torch.float32) in CPU_BACKENDS


def test_zero_columns(backend):
    # normalized_shape with a 0: nothing to normalize, like torch (view(-1, 0) would be ambiguous)
    x = torch.randn(3, 0, requires_grad=True)
    w = torch.randn(0, requires_grad=True)
    y = layernorm.layer_norm(x, (0,), w, backend=backend)
    y.sum().backward()
    assert y.shape == (3, 0) and x.grad.shape == (3, 0) and w.grad.shape == (0,)
    assert layernorm.rms_norm(torch.randn(2, 3, 0), (3, 0), backend=backend).shape == (2, 3, 0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA autocast needs a CUDA device"))])
def test_autocast_policy_is_torchs(device):
    """Under autocast our ops return what torch's return: float32 on CUDA (torch's fp32 policy for the
    norms), the input's dtype on CPU (no policy)."""
    import torch.nn.functional as TF

    x = torch.randn(4, 16, device=device)
    w = torch.randn(16, device=device)
    for inp in (x, x.to(torch.bfloat16)):
        with torch.autocast(device, dtype=torch.bfloat16):
            ours = layernorm.layer_norm(inp, (16,), w.to(inp.dtype))
            theirs = TF.layer_norm(inp, (16,), w.to(inp.dtype))
            assert ours.dtype == theirs.dtype
            assert layernorm.rms_norm(inp, (16,), w.to(inp.dtype)).dtype == TF.rms_norm(inp, (16,), w.to(inp.dtype)).dtype
