"""Invalid arguments fail early, with a message that names the argument."""
from __future__ import annotations

import pytest
import torch

import layernorm
from layernorm import backends


def x8():
    return torch.randn(2, 3, 8)


def test_mismatched_normalized_shape():
    with pytest.raises(ValueError, match=r"normalized_shape=\[5\].*input.*size\[2, 3, 8\]"):
        layernorm.layer_norm(x8(), (5,))
    with pytest.raises(ValueError, match="normalized_shape"):
        layernorm.rms_norm(x8(), (2, 3, 8, 1))


def test_empty_or_negative_normalized_shape():
    with pytest.raises(ValueError, match="normalized_shape must be non-empty"):
        layernorm.layer_norm(x8(), ())
    with pytest.raises(ValueError, match="normalized_shape"):
        layernorm.layer_norm(x8(), (-8,))
    with pytest.raises(TypeError, match="normalized_shape"):
        layernorm.layer_norm(x8(), None)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_param_shape(name):
    kwargs = {name: torch.ones(7)}
    with pytest.raises(ValueError, match=rf"Expected {name} to be of same shape as normalized_shape.*\[7\]"):
        layernorm.layer_norm(x8(), (8,), **kwargs)


def test_wrong_weight_shape_rms_and_fused():
    with pytest.raises(ValueError, match="weight"):
        layernorm.rms_norm(x8(), (8,), torch.ones(3, 8))
    with pytest.raises(ValueError, match="weight"):
        layernorm.add_rms_norm(x8(), x8(), (8,), torch.ones(9))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_param_dtype(name):
    with pytest.raises(TypeError, match=rf"{name}.*float32.*torch.float64"):
        layernorm.layer_norm(x8(), (8,), **{name: torch.ones(8, dtype=torch.float64)})
    # float32 parameters are allowed with low-precision input, float64 ones are not
    layernorm.layer_norm(x8().bfloat16(), (8,), **{name: torch.ones(8)})
    with pytest.raises(TypeError, match=name):
        layernorm.layer_norm(x8().bfloat16(), (8,), **{name: torch.ones(8, dtype=torch.float64)})


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_wrong_param_device(name):
    # the meta device stands in for a second device
    with pytest.raises(ValueError, match=rf"{name}.*device.*meta"):
        layernorm.layer_norm(x8(), (8,), **{name: torch.ones(8, device="meta")})


def test_integer_input():
    with pytest.raises(TypeError, match="input must have a floating-point dtype.*torch.int64"):
        layernorm.layer_norm(torch.arange(8).view(1, 8), (8,))
    with pytest.raises(TypeError, match="input"):
        layernorm.rms_norm(torch.ones(2, 8, dtype=torch.int32), (8,))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        layernorm.layer_norm([1.0, 2.0], (2,))


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        layernorm.layer_norm(x8(), (8,), eps=eps)
    with pytest.raises(ValueError, match="eps"):
        layernorm.rms_norm(x8(), (8,), eps=eps)


def test_eps_type():
    with pytest.raises(TypeError, match="eps"):
        layernorm.layer_norm(x8(), (8,), eps="1e-5")
    with pytest.raises(TypeError, match="eps"):
        layernorm.layer_norm(x8(), (8,), eps=True)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of.*'nope'"):
        layernorm.layer_norm(x8(), (8,), backend="nope")
    with pytest.raises(ValueError, match="backend"):
        layernorm.LayerNorm(8, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        backends.get_backend("nope")


def test_unknown_backend_from_env(monkeypatch):
    monkeypatch.setenv("LAYERNORM_BACKEND", "nope")
    with pytest.raises(ValueError, match="LAYERNORM_BACKEND.*'nope'"):
        layernorm.layer_norm(x8(), (8,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton can run here")
def test_backend_that_cannot_run_here(monkeypatch):
    # tests/conftest.py turns Triton's CPU interpreter on; without it triton cannot run on CPU tensors
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(backends.BackendUnavailable, match="triton"):
        layernorm.layer_norm(x8(), (8,), backend="triton")
    with pytest.raises(backends.BackendUnavailable, match="triton"):
        layernorm.LayerNorm(8, backend="triton")(x8())
    assert "triton" not in layernorm.available_backends("cpu")


def test_residual_mismatch():
    with pytest.raises(ValueError, match=r"residual.*\[2, 3, 7\]"):
        layernorm.add_layer_norm(x8(), torch.randn(2, 3, 7), (8,))
    with pytest.raises(ValueError, match=r"residual.*torch.float64"):
        layernorm.add_rms_norm(x8(), x8().double(), (8,))
    with pytest.raises(ValueError, match=r"residual.*meta"):
        layernorm.add_layer_norm(x8(), torch.randn(2, 3, 8, device="meta"), (8,))
    with pytest.raises(TypeError, match="residual"):
        layernorm.add_layer_norm(x8(), torch.ones(2, 3, 8, dtype=torch.int64), (8,))


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        layernorm.patch(lambda x: x)
