"""Bad input fails as it fails in torch: the same exception type and the same message.

Every case runs through ``layernorm`` and through ``torch.nn.functional``; both must raise, with
equal type and first line. The fused ops (no torch counterpart) and backend selection have their own
messages, checked by pattern.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import layernorm
from layernorm import backends

# torch.nn.functional.rms_norm warns on mixed input/weight dtypes before it computes
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")


def x8():
    return torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(8))


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(exc), str(exc).strip().splitlines()[0]
    return None, "no error"


# (id, the arguments of layer_norm and F.layer_norm)
LAYER_NORM_CASES = [
    ("shape-mismatch", lambda: (x8(), (5,))),
    ("shape-too-long", lambda: (x8(), (2, 3, 8, 1))),
    ("shape-empty", lambda: (x8(), ())),
    ("shape-negative", lambda: (x8(), (-8,))),
    ("shape-int", lambda: (x8(), 8)),
    ("shape-str", lambda: (x8(), "8")),
    ("shape-float", lambda: (x8(), (8.7,))),
    ("shape-none", lambda: (x8(), None)),
    ("shape-tensor", lambda: (x8(), torch.tensor([8]))),
    ("input-0d", lambda: (torch.tensor(1.0), (1,))),
    ("input-list", lambda: ([1.0, 2.0], (2,))),
    ("input-int64", lambda: (torch.arange(8).view(1, 8), (8,))),
    ("input-complex", lambda: (x8().cfloat(), (8,))),
    ("weight-shape", lambda: (x8(), (8,), torch.ones(7))),
    ("weight-2d", lambda: (x8(), (8,), torch.ones(1, 8))),
    ("bias-shape", lambda: (x8(), (8,), None, torch.ones(7))),
    ("weight-float64", lambda: (x8(), (8,), torch.ones(8, dtype=torch.float64))),
    ("bias-float64", lambda: (x8(), (8,), None, torch.ones(8, dtype=torch.float64))),
    ("weight-bf16-for-fp32", lambda: (x8(), (8,), torch.ones(8, dtype=torch.bfloat16))),
    ("bf16-fp32w-bf16b", lambda: (x8().bfloat16(), (8,), torch.ones(8), torch.zeros(8, dtype=torch.bfloat16))),
    ("bf16-fp16w", lambda: (x8().bfloat16(), (8,), torch.ones(8, dtype=torch.float16))),
    ("weight-int64", lambda: (x8(), (8,), torch.ones(8, dtype=torch.int64))),
    ("eps-str", lambda: (x8(), (8,), None, None, "1e-5")),
    ("eps-none", lambda: (x8(), (8,), None, None, None)),
]


RMS_NORM_CASES = [
    ("shape-mismatch", lambda: (x8(), (5,))),
    ("shape-empty", lambda: (x8(), [])),
    ("shape-str", lambda: (x8(), "8")),
    ("shape-float", lambda: (x8(), (8.7,))),
    ("input-int32", lambda: (torch.ones(2, 8, dtype=torch.int32), (8,))),
    ("weight-shape", lambda: (x8(), (8,), torch.ones(3, 8))),
    ("eps-str", lambda: (x8(), (8,), None, "a")),
]


ERROR_CASES = [pytest.param(layernorm.layer_norm, TF.layer_norm, case, id=f"layer_norm-{name}")
               for name, case in LAYER_NORM_CASES]
ERROR_CASES += [pytest.param(layernorm.rms_norm, TF.rms_norm, case, id=f"rms_norm-{name}") for name, case in RMS_NORM_CASES]


@pytest.mark.parametrize("ours_fn,torch_fn,case", ERROR_CASES)
def test_errors_are_torchs(ours_fn, torch_fn, case):
    ours = _outcome(lambda: ours_fn(*case()))
    theirs = _outcome(lambda: torch_fn(*case()))
    assert theirs[0] is not None, "the case must be an error in torch"
    assert ours == theirs


ACCEPTED = [
    ("eps-negative", lambda f: f(x8(), (8,), None, None, -0.5)),
    ("eps-nan", lambda f: f(x8(), (8,), None, None, float("nan"))),
    ("eps-bool", lambda f: f(x8(), (8,), None, None, True)),
    ("shape-list", lambda f: f(x8(), [8])),
    ("shape-size", lambda f: f(x8(), torch.Size([3, 8]))),
    ("weight-noncontiguous", lambda f: f(x8(), (8,), torch.ones(16)[::2])),
    ("bf16-fp32-params", lambda f: f(x8().bfloat16(), (8,), torch.ones(8), torch.zeros(8))),
]


@pytest.mark.parametrize("call", [c[1] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED])
def test_what_torch_accepts_is_accepted(call):
    ours, theirs = call(layernorm.layer_norm), call(TF.layer_norm)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


def test_rms_norm_accepts_any_float_weight_dtype_like_torch():
    for w in (torch.ones(8, dtype=torch.float64), torch.ones(8, dtype=torch.bfloat16)):
        assert layernorm.rms_norm(x8(), (8,), w).dtype == TF.rms_norm(x8(), (8,), w).dtype == torch.float32
    assert layernorm.rms_norm(x8(), (8,), eps=-0.5).isnan().any() == TF.rms_norm(x8(), (8,), eps=-0.5).isnan().any()


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_param_device_names_the_device(name):
    # the meta device stands in for a second device; torch's message, naming the argument
    with pytest.raises(RuntimeError, match=rf"Tensor on device meta is not on the expected device cpu!.*{name}"):
        layernorm.layer_norm(x8(), (8,), **{name: torch.ones(8, device="meta")})


def test_residual_mismatch():
    with pytest.raises(RuntimeError, match=r"Expected residual of the input's shape \[2, 3, 8\].*\[2, 3, 7\]"):
        layernorm.add_layer_norm(x8(), torch.randn(2, 3, 7), (8,))
    with pytest.raises(RuntimeError, match=r"residual.*Double"):
        layernorm.add_rms_norm(x8(), x8().double(), (8,))
    with pytest.raises(RuntimeError, match=r"meta.*residual"):
        layernorm.add_layer_norm(x8(), torch.randn(2, 3, 8, device="meta"), (8,))
    with pytest.raises(TypeError, match=r"add_layer_norm\(\): argument 'residual' \(position 2\) must be Tensor"):
        layernorm.add_layer_norm(x8(), None, (8,))


def test_casting_mode():
    with pytest.raises(ValueError, match=r"casting_mode must be one of \('torch', 'llama'\), but got 'gemma'"):
        layernorm.rms_norm(x8(), (8,), casting_mode="gemma")
    with pytest.raises(ValueError, match="casting_mode"):
        layernorm.add_rms_norm(x8(), x8(), (8,), casting_mode="gemma", backend="reference")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of.*'nope'"):
        layernorm.layer_norm(x8(), (8,), backend="nope")
    with pytest.raises(ValueError, match="backend"):
        layernorm.LayerNorm(8, backend="nope")


def test_unknown_backend_from_env(monkeypatch):
    monkeypatch.setenv("LAYERNORM_BACKEND", "nope")
    with pytest.raises(ValueError, match="LAYERNORM_BACKEND.*'nope'"):
        layernorm.layer_norm(x8(), (8,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton can run here")
def test_backend_that_cannot_run_here(monkeypatch):
    # tests/conftest.py turns Triton's CPU interpreter on; without it triton cannot run on CPU tensors
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="triton.*cuda"):
        layernorm.layer_norm(x8(), (8,), backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="triton"):
        layernorm.LayerNorm(8, backend="triton")(x8())
    assert "triton" not in layernorm.available_backends("cpu")


def test_reference_backend_checks_like_the_operators():
    # the reference bypasses the operators; it must still refuse what they refuse, with their message
    for backend in ("reference", "torch"):
        ours = _outcome(lambda: layernorm.layer_norm(x8(), (5,), backend=backend))
        assert ours == _outcome(lambda: TF.layer_norm(x8(), (5,)))


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        layernorm.patch(lambda x: x)
