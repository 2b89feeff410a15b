"""patch(model) / unpatch(model) on torch modules: what is swapped, what is left and why, the report,
strict mode, the verification that guards every swap, and that a swap changes nothing else.

The Hugging Face families are in test_patch_hf.py, data-parallel training in test_patch_dist.py.
"""
from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from layernorm import LayerNorm, RMSNorm, patch, unpatch
from layernorm.patching import registry

from tolerances import assert_close


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
    # nn.RMSNorm(d, eps=1e-6), not eps=None: see test_rms_norm_default_eps_is_swapped
    torch.manual_seed(1)
    m = nn.Sequential(
        nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True),
        Block(d),
        nn.Sequential(nn.LayerNorm(d, bias=False), nn.GELU()),
        nn.RMSNorm(d, eps=1e-6),
    )
    for mod in m.modules():
        if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)) and mod.weight is not None:
            with torch.no_grad():
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
    return m.train()


def _quiet_patch(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a swap that should succeed must not warn
        return patch(model, **kw)


# --- torch modules ---------------------------------------------------------------------------------


def test_patch_keeps_parameters_and_outputs(backend):
    model = _model()
    reference = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    norms_before = sum(isinstance(m, (nn.LayerNorm, nn.RMSNorm)) for m in model.modules())
    x = torch.randn(3, 5, 16)
    assert _quiet_patch(model, backend=backend) is model
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
    _quiet_patch(model)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert model.state_dict().keys() == sd.keys()
    fresh = _model().to(torch.float64)
    fresh.load_state_dict(model.state_dict(), strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    model.load_state_dict(sd, strict=True)  # and the other way


def test_patch_a_norm_itself_and_idempotent():
    norm = nn.LayerNorm(8)
    w = norm.weight
    new = _quiet_patch(norm, backend="reference")
    assert new is norm and type(new) is LayerNorm and new.weight is w  # swapped in place
    again, report = patch(new, backend="torch", return_report=True)
    assert again is new and new.backend == "torch"
    assert [e.status for e in report.entries] == ["kept"]
    with pytest.warns(UserWarning, match="swapped nothing"):
        assert patch(nn.Linear(3, 3)).__class__ is nn.Linear


def test_backend_and_model_are_checked():
    with pytest.raises(ValueError, match="backend"):
        patch(nn.LayerNorm(4), backend="nope")
    with pytest.raises(TypeError, match="model"):
        patch(lambda x: x)
    with pytest.raises(TypeError, match="model"):
        unpatch("not a module")


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """A subclass with its own forward (like ConvNeXt's): replacing it would drop the permutes."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 1)).permute(0, 2, 1)


class TorchForwardLayerNorm(nn.LayerNorm):
    """A subclass that keeps torch's forward: safe to swap, and must stay an instance of itself."""

    def extra_info(self):
        return "mine"


def test_subclass_overriding_forward_is_left_with_a_reason():
    m = nn.Sequential(nn.Linear(8, 8), ChannelsFirstLayerNorm(8))
    x = torch.randn(2, 8, 8)
    expected = m(x)
    with pytest.warns(UserWarning, match="swapped nothing"):
        _, report = patch(m, return_report=True)
    assert type(m[1]) is ChannelsFirstLayerNorm
    (entry,) = report.left
    assert entry.name == "1" and "overrides forward" in entry.reason
    torch.testing.assert_close(m(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="strict=True"):
        patch(m, strict=True)


def test_subclass_keeping_torch_forward_is_swapped_and_stays_itself():
    m = TorchForwardLayerNorm(8)
    _quiet_patch(m, backend="reference")
    assert isinstance(m, TorchForwardLayerNorm) and isinstance(m, LayerNorm)
    assert type(m).__name__ == "TorchForwardLayerNorm" and m.extra_info() == "mine"
    assert m.backend == "reference"
    x = torch.randn(3, 8)
    assert_close(m(x), nn.functional.layer_norm(x, (8,), m.weight, m.bias, m.eps))


def test_strict_raises_before_changing_anything():
    m = nn.Sequential(nn.LayerNorm(8), ChannelsFirstLayerNorm(8))
    with pytest.raises(RuntimeError, match="1 norm module"):
        patch(m, strict=True)
    assert type(m[0]) is nn.LayerNorm, "strict must not swap anything when it raises"


def test_instance_level_forward_is_left():
    norm = nn.LayerNorm(8)
    norm.forward = lambda x: x * 0  # e.g. what accelerate's hooks do
    with pytest.warns(UserWarning, match="swapped nothing"):
        _, report = patch(norm, return_report=True)
    assert type(norm) is nn.LayerNorm and "instance" in report.left[0].reason


def test_hooks_and_training_flag_survive():
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).eval()
    seen = []
    m[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    _quiet_patch(m)
    m(torch.randn(2, 4))
    assert seen == [torch.Size([2, 8])] and not m[1].training


def test_report_says_what_was_done():
    m = nn.Sequential(nn.LayerNorm(8), nn.RMSNorm(8, eps=1e-5), LayerNorm(8), ChannelsFirstLayerNorm(8))
    with pytest.warns(UserWarning, match="left 1"):
        _, report = patch(m, return_report=True)
    assert [e.status for e in report.entries] == ["swapped", "swapped", "kept", "left"]
    assert [e.rule for e in report.swapped] == ["torch", "torch"]
    assert all(e.max_error and max(e.max_error.values()) <= 1.0 for e in report.swapped)
    assert {"float32", "bfloat16", "float16"} <= set(report.swapped[0].max_error)
    text = str(report)
    assert "2 swapped, 1 left, 1 kept" in text and "ChannelsFirstLayerNorm" in text
    assert report.to_dict()["entries"][0]["status"] == "swapped"


def test_unpatch_restores_classes_attributes_and_outputs():
    model = _model()
    reference = copy.deepcopy(model)
    classes = [type(m) for m in model.modules()]
    _quiet_patch(model, backend="reference")
    assert unpatch(model) is model
    assert [type(m) for m in model.modules()] == classes
    assert not any("backend" in m.__dict__ or "_layernorm_patched_from" in m.__dict__ for m in model.modules())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    _quiet_patch(model)  # and again
    assert isinstance(model[3], RMSNorm)


def test_unpatch_refuses_a_module_whose_class_changed():
    m = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm(8))
    _quiet_patch(m)
    m[1].__class__ = type("Wrapped", (LayerNorm,), {})  # as FSDP's fully_shard does
    with pytest.raises(RuntimeError, match="changed class"):
        unpatch(m)
    assert type(m[0]) is LayerNorm, "nothing is restored when one module cannot be"


def test_deepcopy_and_pickle_keep_the_patch():
    m = nn.Sequential(TorchForwardLayerNorm(8), nn.LayerNorm(8))
    _quiet_patch(m, backend="reference")
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone[0]) is type(m[0]) and type(clone[1]) is LayerNorm
        assert clone[0].backend == "reference"
        x = torch.randn(2, 8)
        torch.testing.assert_close(clone(x), m(x), rtol=0, atol=0)
        unpatch(clone)
        assert type(clone[0]) is TorchForwardLayerNorm and type(clone[1]) is nn.LayerNorm
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False)[0]) is type(m[0])


def test_meta_parameters_are_verified_on_cpu():
    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
    _, report = patch(m, return_report=True)
    assert type(m[1]) is LayerNorm and m[1].weight.device.type == "meta"
    assert any("meta" in note for note in report.swapped[0].notes)


def test_rms_norm_default_eps_is_swapped():
    norm = nn.RMSNorm(8)
    _, report = patch(norm, return_report=True)
    assert report.swapped, report


# --- the rules and the verification ----------------------------------------------------------------


class CopiedLlamaRMSNorm(nn.Module):
    """Not a Hugging Face class: a copy of LlamaRMSNorm's code under another name (the source rule)."""

    def __init__(self, hidden_size, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """A docstring does not change the code."""
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)  # comments neither
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class AlmostLlamaRMSNorm(CopiedLlamaRMSNorm):
    """One token different (eps outside the square root): must not be taken for Llama's."""

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states / (torch.sqrt(variance) + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def test_keyword_input_is_accepted_as_by_the_original():
    m = CopiedLlamaRMSNorm(8)
    _quiet_patch(m)
    x = torch.randn(2, 8)
    torch.testing.assert_close(m(hidden_states=x), m(x), rtol=0, atol=0)


def test_source_rule_takes_exact_copies_only():
    assert registry.recipe_for_source(CopiedLlamaRMSNorm).key == "llama"
    assert registry.recipe_for_source(AlmostLlamaRMSNorm) is None
    m = nn.Sequential(CopiedLlamaRMSNorm(8, eps=1e-5), AlmostLlamaRMSNorm(8))
    with pytest.warns(UserWarning, match="left 1"):
        _, report = patch(m, return_report=True)
    assert [e.rule for e in report.swapped] == ["source"]
    assert isinstance(m[0], CopiedLlamaRMSNorm) and type(m[1]) is AlmostLlamaRMSNorm
    assert "matches no known norm" in report.left[0].reason


def test_verification_refuses_a_wrong_mapping(monkeypatch):
    # Tell the registry that AlmostLlamaRMSNorm is Llama's: the probe must catch the lie (the eps
    # row and the per-row scale differ) and leave the module as it is.
    monkeypatch.setitem(registry.KNOWN_CLASSES, registry.class_name(AlmostLlamaRMSNorm), "llama")
    m = AlmostLlamaRMSNorm(8)
    with pytest.warns(UserWarning, match="swapped nothing"):
        _, report = patch(m, return_report=True)
    assert type(m) is AlmostLlamaRMSNorm
    assert report.left[0].rule == "registry" and "verification failed" in report.left[0].reason


class PerHeadLayerNorm(nn.Module):
    """Cohere's q/k norm shape: a (heads, head_dim) weight over the last dimension only."""

    def __init__(self, hidden_size=None, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        mean = hidden_states.mean(-1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon)
        hidden_states = self.weight.to(torch.float32) * hidden_states
        return hidden_states.to(input_dtype)


def test_per_head_weight_is_left_with_a_reason():
    m = PerHeadLayerNorm((4, 8))
    with pytest.warns(UserWarning):
        _, report = patch(m, return_report=True)
    assert type(m) is PerHeadLayerNorm and "per-head" in report.left[0].reason
    assert registry.recipe_for_source(PerHeadLayerNorm).key == "cohere"  # recognised, then refused


def test_norm_like_names():
    assert registry.is_norm_like(nn.LayerNorm(3)) and registry.is_norm_like(ChannelsFirstLayerNorm(3))
    assert registry.is_norm_like(PerHeadLayerNorm(3))
    assert not registry.is_norm_like(nn.GroupNorm(1, 3)) and not registry.is_norm_like(nn.BatchNorm1d(3))

    class LayerNormConvLayer(nn.Module):  # a block named after its norm is not a norm
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 1)

    assert not registry.is_norm_like(LayerNormConvLayer())


def test_norms_inside_torch_transformer_encoder_layers_carry_a_note():
    # torch's inference fast path for nn.TransformerEncoderLayer reads norm weights itself and never
    # calls the norm modules: the swap is real for training, and the report says where it is not
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    _, report = patch(layer, return_report=True)
    assert len(report.swapped) == 2
    for entry in report.swapped:
        assert any("_transformer_encoder_layer_fwd" in note for note in entry.notes), entry
