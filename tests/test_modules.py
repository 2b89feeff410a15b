"""LayerNorm / RMSNorm modules as drop-in replacements of torch.nn's, and patch(model)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from layernorm import LayerNorm, RMSNorm, patch

from tolerances import assert_close

PAIRS = [
    (LayerNorm, nn.LayerNorm, {}),
    (LayerNorm, nn.LayerNorm, {"bias": False}),
    (LayerNorm, nn.LayerNorm, {"elementwise_affine": False}),
    (RMSNorm, nn.RMSNorm, {}),
    (RMSNorm, nn.RMSNorm, {"eps": 1e-6}),
    (RMSNorm, nn.RMSNorm, {"elementwise_affine": False}),
]
PAIR_IDS = ["ln", "ln-nobias", "ln-noaffine", "rms", "rms-eps", "rms-noaffine"]


def _randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS, ids=PAIR_IDS)
def test_state_dict_round_trip_and_outputs(backend, ours_cls, torch_cls, kwargs):
    shape = (6, 5)
    theirs = torch_cls(shape, **kwargs)
    _randomize(theirs)
    ours = ours_cls(shape, **kwargs, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    back = torch_cls(shape, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in back.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k])
    x = torch.randn(3, 4, *shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = ours(x), theirs(x2)
    assert_close(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    assert_close(x.grad, x2.grad, "bwd")
    for p, p2 in zip(ours.parameters(), theirs.parameters()):
        assert_close(p.grad, p2.grad, "bwd")
    assert isinstance(ours, torch_cls)
    assert (ours.weight is None) == (not kwargs.get("elementwise_affine", True))


def test_extra_repr_shows_backend():
    assert "backend=torch" in repr(LayerNorm(8, backend="torch"))
    assert "backend=auto" in repr(RMSNorm(8))
    r = repr(LayerNorm((4, 8), eps=1e-6, elementwise_affine=False))
    assert "(4, 8)" in r and "eps=1e-06" in r and "elementwise_affine=False" in r


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_factory_kwargs(cls, dtype):
    m = cls(8, device="cpu", dtype=dtype)
    assert m.weight.dtype == dtype and m.weight.device.type == "cpu"
    y = m(torch.randn(2, 8, dtype=dtype))
    assert y.dtype == dtype
    meta = cls(8, device="meta")
    assert meta.weight.device.type == "meta"


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, d)
        self.shared = self.norm  # the same module under two names

    def forward(self, x):
        return self.rms(self.proj(self.norm(x))) + self.shared(x)


def _model(d=16):
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True),
        Block(d),
        nn.Sequential(nn.LayerNorm(d, bias=False), nn.GELU()),
        nn.RMSNorm(d),
    )
    for mod in m.modules():
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and mod.weight is not None:
            with torch.no_grad():
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
    return m.train()


def test_patch_keeps_parameters_and_outputs(backend):
    model = _model()
    reference = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    norms_before = sum(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in model.modules())
    x = torch.randn(3, 5, 16)
    assert patch(model, backend=backend) is model
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == norms_before
    assert all(isinstance(m, (LayerNorm, RMSNorm)) and m.backend == backend for m in norms)
    assert all(isinstance(m, nn.LayerNorm) for m in norms if isinstance(m, LayerNorm))
    assert model[1].norm is model[1].shared, "a shared norm must stay shared"
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    for n, p in params_after.items():
        assert p is params_before[n], n  # same objects: optimizers keep working
    assert model.training and model[0].norm1.training
    y, y_ref = model(x), reference(x)
    assert_close(y, y_ref, "bwd")  # several norms and matmuls deep: gradient-level tolerance
    y.sum().backward()
    y_ref.sum().backward()
    for (n, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, p_ref.grad, "bwd", msg=lambda m, n=n: f"{n}: {m}")


def test_patch_keeps_dtype_and_device_and_state_dict():
    model = _model().to(torch.float64)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    patch(model)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert model.state_dict().keys() == sd.keys()
    fresh = _model().to(torch.float64)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_patch_a_norm_itself_and_idempotent():
    norm = nn.LayerNorm(8)
    w = norm.weight
    new = patch(norm, backend="reference")
    assert isinstance(new, LayerNorm) and new.weight is w
    again = patch(new, backend="torch")
    assert again is new and new.backend == "torch"
    assert patch(nn.Linear(3, 3)).__class__ is nn.Linear


def test_module_backend_env(monkeypatch):
    monkeypatch.setenv("LAYERNORM_BACKEND", "reference")
    m = LayerNorm(8)
    assert_close(m(torch.ones(2, 8) * torch.arange(8.0)), nn.LayerNorm(8)(torch.ones(2, 8) * torch.arange(8.0)))
