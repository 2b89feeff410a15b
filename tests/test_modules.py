"""LayerNorm / RMSNorm modules as drop-in replacements of torch.nn's (patch(model): test_patch.py)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from layernorm import LayerNorm, RMSNorm

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


def test_module_backend_env(monkeypatch):
    monkeypatch.setenv("LAYERNORM_BACKEND", "reference")
    m = LayerNorm(8)
    assert_close(m(torch.ones(2, 8) * torch.arange(8.0)), nn.LayerNorm(8)(torch.ones(2, 8) * torch.arange(8.0)))
