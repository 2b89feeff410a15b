"""The ``triton`` backend against the spec (backends.reference), forward and every gradient.

Device: CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is
imported) by default; with ``LAYERNORM_TEST_DEVICE=cuda`` the same tests run compiled kernels on CUDA
tensors (the interpreter is switched off). scripts/gpu_tests.sh runs that mode plus large shapes.

Interpreter caveat: it rounds float32 -> bfloat16 by truncation where the GPU rounds to nearest even,
so bf16 outputs may differ from the reference by one bf16 ulp on CPU (inside the bf16 tolerance);
on CUDA the stored residual sum z must match the reference bitwise.
"""
import os

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

import layernorm  # noqa: E402
from layernorm import backends  # noqa: E402
from layernorm.backends import reference  # noqa: E402

tb = pytest.importorskip("layernorm.backends.triton")

# The interpreter is chosen when @triton.jit runs, i.e. when triton (its tl.sum, tl.zeros, ...) and
# our kernels are first imported. `import layernorm` imports torch._dynamo, which imports triton: so
# TRITON_INTERPRET=1 must be set before that (tests/conftest.py does it, or export it yourself).
if DEVICE == "cpu" and not all(
    type(f).__name__ == "InterpretedFunction" for f in (triton.language.sum, tb._fwd_fused)
):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set (torch._dynamo imports it), so its "
        "kernels cannot run on CPU tensors; set TRITON_INTERPRET=1 before importing torch/layernorm",
        allow_module_level=True,
    )
from layernorm import ops  # noqa: E402
from tolerances import tol  # noqa: E402

OPS = {  # name -> (rms, has_residual)
    "layer_norm": (False, False),
    "rms_norm": (True, False),
    "add_layer_norm": (False, True),
    "add_rms_norm": (True, True),
}
DTYPES = {  # name -> (input dtype, weight dtype)
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16_w32": (torch.bfloat16, torch.float32),
}
ROWS = [1, 3, 7]
# LAYERNORM_TEST_QUICK=1 (scripts/gpu_tests.sh): each new shape/dtype compiles kernels on a GPU
# (~0.5 s each), so the matrix is trimmed to fit the script's time budget.
if os.environ.get("LAYERNORM_TEST_QUICK") == "1":
    ROWS = [1, 7]
    DTYPES.pop("fp16")


def close(actual, expected, what, tol_dtype=None, kind=None):
    """assert_close with tests/tolerances.py's entry for the compared dtype (forward or backward)."""
    assert (actual is None) == (expected is None), f"{what}: one is None"
    if expected is None:
        return
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    kind = kind or ("bwd" if what.startswith("backward") or "grad" in what else "fwd")
    if kind == "fwd" and DEVICE == "cpu":
        kind = "interpreted"
    rtol, atol = tol(tol_dtype or expected.dtype, kind)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def make(M, N, op, dtype, wdtype, with_w=True, with_b=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    rms, has_res = OPS[op]

    def rnd(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * s).to(dt).to(DEVICE)

    x = rnd(M, N, s=scale)
    r = rnd(M, N, s=scale) if has_res else None
    w = rnd(N, dt=wdtype) if with_w else None
    b = rnd(N, dt=wdtype) if (with_b and not rms) else None
    dy = rnd(M, N)
    dz = rnd(M, N) if has_res else None
    return x, r, w, b, dy, dz, rms


def check_op(M, N, op, dtype, wdtype, with_w=True, with_b=True, scale=1.0, offset=0.0, rounded=False):
    x, r, w, b, dy, dz, rms = make(M, N, op, dtype, wdtype, with_w, with_b, scale=scale)
    eps = 1e-5
    hf = (offset, rounded)
    ours = tb.forward(x, r, w, b, eps, rms, *hf)
    ref = reference.forward(x, r, w, b, eps, rms, *hf)
    # the interpreter's truncated z (see the module docstring) moves the fp32 statistics by ~1 ulp of z
    stat_tol = dtype if (DEVICE == "cpu" and r is not None) else None
    for name, a, e in zip(("y", "z", "mean", "rstd"), ours, ref):
        close(a, e, f"forward {name}", stat_tol if name in ("mean", "rstd") else None)
    if DEVICE != "cpu" and r is not None:
        assert torch.equal(ours[1], ref[1]), "z = x + residual must be rounded exactly as the reference"
    # backward from identical saved tensors, so only the backward kernels are compared
    _, z, mean, rstd = ref
    h = z if z is not None else x
    ours = tb.backward(dy, dz, h, w, b, mean, rstd, rms, *hf)
    ref = reference.backward(dy, dz, h, w, b, mean, rstd, rms, *hf)
    for name, a, e in zip(("dx", "dweight", "dbias"), ours, ref):
        # with rounding, dweight sums dy * xhat rounded to the input dtype: that dtype's precision
        close(a, e, f"backward {name}", dtype if rounded else None)


@pytest.mark.parametrize("dname", ["fp32", "bf16", "bf16_w32"])
@pytest.mark.parametrize("hf", ["gemma-offset", "llama-round"])
@pytest.mark.parametrize("op", ["rms_norm", "add_rms_norm"])
def test_hugging_face_numerics(op, hf, dname):
    """RMSNorm's offset (Gemma's 1 + w) and rounding before the weight (Llama), fused and wide kernels."""
    check_op(3, 100, op, *DTYPES[dname], offset=1.0 if hf == "gemma-offset" else 0.0, rounded=hf == "llama-round")


@pytest.mark.parametrize("op", list(OPS))
def test_cuda_registration_glue(op):
    """layernorm.ops.triton_forward/backward, the functions registered as the operators' CUDA kernels,
    on N-d tensors: (rows, cols) views, empty placeholders and the output mask, against the reference."""
    rms, has_res = OPS[op]
    x, r, w, b, dy, dz, _ = make(6, 24, op, torch.float32, torch.float32)
    x, r, dy = x.view(2, 3, 24), (r.view(2, 3, 24) if has_res else None), dy.view(2, 3, 24)
    dz = dz.view(2, 3, 24) if has_res else None
    y, z, mean, rstd = ops.triton_forward(x, r, [24], w, b, 1e-5, rms, 0.0, False)
    ry, rz, rmean, rrstd = reference.forward(x.view(6, 24), None if r is None else r.view(6, 24), w, b, 1e-5, rms)
    close(y, ry.view(2, 3, 24), "y")
    assert (z.numel() == 0) == (not has_res) and (mean.numel() == 0) == rms
    h = z if has_res else x
    dx, dw, db = ops.triton_backward(dy, dz, h, mean, rstd, [24], w, b, rms, 0.0, False, [True, True, False])
    rdx, rdw, _ = reference.backward(dy.view(6, 24), None if dz is None else dz.view(6, 24), h.view(6, 24), w, b,
                                     rmean, rrstd, rms)
    close(dx, rdx.view(2, 3, 24), "backward dx")
    close(dw, rdw, "backward dweight")
    assert db.numel() == 0, "the output mask asked for no dbias"


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("N", [1, 100, 1000, 4097])
@pytest.mark.parametrize("M", ROWS)
@pytest.mark.parametrize("op", list(OPS))
def test_matches_reference(op, M, N, dname):
    check_op(M, N, op, *DTYPES[dname])


@pytest.mark.parametrize("with_w,with_b", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_optional_weight_bias(op, with_w, with_b, dname):
    check_op(5, 300, op, *DTYPES[dname], with_w=with_w, with_b=with_b)


def test_float64():
    for op in OPS:
        check_op(3, 257, op, torch.float64, torch.float64)


@pytest.fixture
def narrow_tables():
    """A launch table that sends every width above 128 to the looping (wide-row) kernels, 128-column
    blocks, so small widths exercise them (what the built-in rule does above 8192 / 4096 columns)."""
    wide = {"kernel": "wide", "block": 128, "num_warps": 4}
    buckets = [str(2**k) for k in range(8, 21)]
    doc = {"fwd": {b: wide for b in buckets}, "bwd": {b: dict(wide, programs_per_sm=8) for b in buckets}}
    with tb.use_table(doc):
        yield


@pytest.mark.parametrize("dname", [d for d in ("fp32", "bf16_w32", "fp16") if d in DTYPES])
@pytest.mark.parametrize("N", [129, 700])  # 2 and 6 column blocks, the last one partial
@pytest.mark.parametrize("op", list(OPS))
def test_wide_kernels(narrow_tables, op, N, dname):
    check_op(7, N, op, *DTYPES[dname])


@pytest.mark.parametrize("op", ["layer_norm", "add_rms_norm"])
def test_wide_kernels_real_width(op):
    # 20000 > 8192 and 4096 (built-in rule): the production wide path, 5 column blocks
    check_op(2, 20000, op, torch.float32, torch.float32)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_huge_rows_do_not_overflow(request, op, wide):
    """|x| ~ 1e20: the sum of squares overflows float32; the rescue keeps y finite (reference.row_rstd)."""
    if wide:
        request.getfixturevalue("narrow_tables")
    x, r, w, b, _, _, rms = make(4, 300, op, torch.float32, torch.float32, scale=1e20)
    y, z, mean, rstd = tb.forward(x, r, w, b, 1e-5, rms)
    ref = reference.forward(x, r, w, b, 1e-5, rms)
    assert torch.isfinite(y).all() and (rstd > 0).all()
    close(y, ref[0], "y")
    close(rstd / ref[3], torch.ones_like(rstd), "rstd ratio")


def test_nonfinite_rows_follow_reference():
    x = torch.randn(3, 50).to(DEVICE)
    x[1, 7] = float("inf")
    x[2, 3] = float("nan")
    y, _, mean, rstd = tb.forward(x, None, None, None, 1e-5, False)
    ry, _, rmean, rrstd = reference.forward(x, None, None, None, 1e-5, False)
    torch.testing.assert_close(y, ry, equal_nan=True)
    torch.testing.assert_close(rstd, rrstd, equal_nan=True)


@pytest.mark.parametrize("N,narrow", [(100, False), (300, True)])
def test_deterministic(request, N, narrow):
    """Two runs are bitwise equal, dweight/dbias included (many rows per program, several programs)."""
    if narrow:
        request.getfixturevalue("narrow_tables")
    x, r, w, b, dy, dz, rms = make(19, N, "add_layer_norm", torch.float32, torch.float32)
    outs = []
    for _ in range(2):
        y, z, mean, rstd = tb.forward(x, r, w, b, 1e-5, rms)
        outs.append((y, z, mean, rstd) + tuple(tb.backward(dy, dz, z, w, b, mean, rstd, rms)))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_constant_rows_and_zero_eps():
    x = torch.full((3, 64), 2.5).to(DEVICE)
    y, _, mean, rstd = tb.forward(x, None, None, None, 1e-5, False)
    assert torch.equal(y, torch.zeros_like(y))
    close(mean, torch.full_like(mean, 2.5), "mean")


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_public_api(dname):
    """layernorm.* with backend="triton", autograd included, against backend="reference"."""
    dtype, wdtype = DTYPES[dname]
    if DEVICE == "cpu":  # the interpreter's route needs the extension only for the argument checks
        assert backends.resolve_backend("triton", torch.device(DEVICE), dtype) == "triton"
    g = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE).requires_grad_(True)

    x, r, w, b = leaf(2, 3, 96), leaf(2, 3, 96), leaf(96), leaf(96)
    # a loss linear in the outputs, so the upstream gradients do not depend on forward rounding
    cot = [torch.randn(2, 3, 96, generator=g).to(DEVICE) for _ in range(2)]
    cases = {
        "layer_norm": lambda be: (layernorm.layer_norm(x, (96,), w, b, backend=be),),
        "rms_norm": lambda be: (layernorm.rms_norm(x, (96,), w, backend=be),),
        "add_layer_norm": lambda be: layernorm.add_layer_norm(x, r, (96,), w, b, backend=be),
        "add_rms_norm": lambda be: layernorm.add_rms_norm(x, r, (96,), w, backend=be),
    }
    for name, fn in cases.items():
        results = {}
        for be in ("triton", "reference"):
            outs = fn(be)
            loss = sum((o.float() * c).sum() for o, c in zip(outs, cot))
            grads = torch.autograd.grad(loss, [x, r, w, b], allow_unused=True)
            results[be] = (outs, grads)
        for a, e in zip(results["triton"][0], results["reference"][0]):
            close(a, e, f"{name} output")
        for a, e in zip(results["triton"][1], results["reference"][1]):
            close(a, e, f"{name} grad")
