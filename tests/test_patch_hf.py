"""patch() on Hugging Face models: tiny random-init configs of 18 families (nothing downloaded).

Per family: every norm swapped (strict=True), logits equal in float32 (MODEL_LOGITS_FP32) and in
bfloat16 (flash-attn's rule against the float32 model), 5 AdamW steps with equal losses, state_dict
round trips both ways and save_pretrained / from_pretrained. The recipes are also checked class by
class on every (input dtype, weight dtype) pair, and the fused residual on the Llama-layout families.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import layernorm  # noqa: E402
from layernorm.bench.models import FAMILIES, build_model, model_inputs, perturb_norms  # noqa: E402
from layernorm.patching import KNOWN_CLASSES, modules, registry  # noqa: E402

from tolerances import MODEL_LOGITS_FP32, TRAINING_LOSSES_FP32, assert_close, assert_flash_rule, tol  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# family -> (norm classes expected, recipe or torch rule they map to)
EXPECTED = {
    "llama": ("LlamaRMSNorm", "llama"),
    "mistral": ("MistralRMSNorm", "llama"),
    "qwen2": ("Qwen2RMSNorm", "llama"),
    "qwen3": ("Qwen3RMSNorm", "llama"),
    "phi3": ("Phi3RMSNorm", "llama"),
    "olmo": ("OlmoLayerNorm", "olmo-ln"),
    "olmo2": ("Olmo2RMSNorm", "olmo2"),
    "gemma": ("GemmaRMSNorm", "gemma"),
    "gemma2": ("Gemma2RMSNorm", "gemma"),
    "gemma3": ("Gemma3RMSNorm", "gemma"),
    "cohere": ("CohereLayerNorm", "cohere"),
    "t5": ("T5LayerNorm", "t5"),
    "gpt2": ("LayerNorm", "torch"),
    "bert": ("LayerNorm", "torch"),
    "gpt_neox": ("LayerNorm", "torch"),
    "opt": ("LayerNorm", "torch"),
    "falcon": ("LayerNorm", "torch"),
    "phi": ("LayerNorm", "torch"),
}
FAMILY_IDS = list(FAMILIES)
# decoder layers with transformers 5.24's LlamaDecoderLayer.forward: fuse_residual applies
LLAMA_LAYOUT = ["llama", "mistral", "qwen2", "qwen3", "olmo", "gemma"]


def _pair(family, dtype=torch.float32, **patch_kwargs):
    """(unpatched, patched copy, report) of the family's tiny model with perturbed norm weights."""
    ref = perturb_norms(build_model(family, "tiny", dtype=dtype), seed=1)
    model = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing may be left
        model, report = layernorm.patch(model, strict=True, return_report=True, **patch_kwargs)
    return ref, model, report


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _train(model, inputs, steps=5):
    """Losses of ``steps`` AdamW steps, and the gradients of the first step."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, first_grads = [], None
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), first_grads


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_every_norm_is_swapped_with_its_family_mapping(family):
    ref, model, report = _pair(family)
    cls_name, mapping = EXPECTED[family]
    norms = [name for name, m in ref.named_modules() if registry.is_norm_like(m)]
    assert norms and [e.name for e in report.swapped] == norms
    assert not report.left
    for entry in report.swapped:
        assert entry.cls.rsplit(".", 1)[-1] == cls_name
        rule_target = "torch" if entry.rule == "torch" else entry.mapping.split("[recipe ")[1].split(":")[0]
        assert rule_target == mapping, entry
        assert max(entry.max_error.values()) <= 1.0
    for name, m in model.named_modules():
        if name in norms:
            assert modules.is_patched(m) and type(m).__name__ == cls_name
            assert isinstance(m, type(dict(ref.named_modules())[name]))  # still an instance of the original class
    if family == "qwen3":  # the per-head q/k norms of Qwen3
        assert {"model.layers.0.self_attn.q_norm", "model.layers.0.self_attn.k_norm"} <= set(norms)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_logits_equal_in_float32(family):
    ref, model, _ = _pair(family)
    inputs = model_inputs(family, ref, "tiny")
    expected, actual = _logits(ref, inputs), _logits(model, inputs)
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_logits_in_bfloat16_follow_the_flash_rule(family):
    ref, model, _ = _pair(family, dtype=torch.bfloat16)
    ref32 = copy.deepcopy(ref).float()  # the same (bf16-rounded) weights, computed in float32
    inputs = model_inputs(family, ref, "tiny")
    ours, theirs, exact = _logits(model, inputs), _logits(ref, inputs), _logits(ref32, inputs)
    assert ours.dtype == theirs.dtype
    assert_flash_rule(ours.float(), theirs.float(), exact, dtype=torch.bfloat16, name=family)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_five_adamw_steps_give_equal_losses(family):
    ref, model, _ = _pair(family)
    inputs = model_inputs(family, ref, "tiny")
    (expected, grads_ref), (actual, grads) = _train(ref, inputs), _train(model, inputs)
    assert bool(expected[-1] < expected[0]), "the reference must be learning, or equal losses mean nothing"
    rtol, atol = TRAINING_LOSSES_FP32
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    # The gradients of the first step, as one vector relative to its largest entry (some are exactly
    # zero in theory, e.g. attention key biases, and hold rounding noise only). Later parameters are
    # not compared: Adam divides by sqrt(v), so such a parameter moves by +-lr on noise alone.
    assert grads.keys() == grads_ref.keys()
    flat, flat_ref = (torch.cat([g[n].flatten() for n in grads_ref]) for g in (grads, grads_ref))
    scale = flat_ref.abs().max()
    assert_close(flat / scale, flat_ref / scale, "bwd")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_state_dict_round_trips_both_ways(family):
    ref, model, _ = _pair(family)
    inputs = model_inputs(family, ref, "tiny")
    assert list(model.state_dict()) == list(ref.state_dict())
    fresh = build_model(family, "tiny", dtype=torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)  # patched -> unpatched
    torch.testing.assert_close(_logits(fresh, inputs), _logits(ref, inputs), rtol=0, atol=0)
    other = perturb_norms(build_model(family, "tiny", seed=7), seed=7)
    model.load_state_dict(other.state_dict(), strict=True)  # unpatched -> patched
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(_logits(model, inputs), _logits(other, inputs), rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "t5", "gpt2"])
def test_save_pretrained_from_pretrained(family, tmp_path):
    ref, model, _ = _pair(family)
    inputs = model_inputs(family, ref, "tiny")
    model.save_pretrained(tmp_path / "patched")
    loaded = type(ref).from_pretrained(tmp_path / "patched")  # a plain, unpatched model
    assert not any(modules.is_patched(m) for m in loaded.modules())
    torch.testing.assert_close(_logits(loaded.eval(), inputs), _logits(ref, inputs), rtol=0, atol=0)
    layernorm.patch(loaded, strict=True)
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(_logits(loaded, inputs), _logits(ref, inputs), rtol=rtol, atol=atol)


def test_patching_mid_training_keeps_the_optimizer_state():
    ref = perturb_norms(build_model("llama", "tiny"), seed=1).train()
    model = copy.deepcopy(ref)
    inputs = model_inputs("llama", ref, "tiny")
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    losses = {0: [], 1: []}
    for step in range(5):
        if step == 2:
            layernorm.patch(model, strict=True)
        for i, (m, opt) in enumerate(zip((ref, model), opts)):
            opt.zero_grad()
            loss = m(**inputs).loss
            loss.backward()
            opt.step()
            losses[i].append(loss.detach())
    assert_close(torch.stack(losses[1]), torch.stack(losses[0]), "bwd")


def test_unpatch_restores_a_hf_model():
    ref, model, _ = _pair("gemma3", fuse_residual=False)
    layernorm.unpatch(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    inputs = model_inputs("gemma3", ref, "tiny")
    torch.testing.assert_close(_logits(model, inputs), _logits(ref, inputs), rtol=0, atol=0)


def test_autocast_bfloat16_matches_the_unpatched_model():
    # Under autocast the q/k norms of Qwen3 see bfloat16 activations with float32 weights: the
    # Llama formula then returns float32, which the recipe reproduces.
    ref, model, _ = _pair("qwen3")
    inputs = model_inputs("qwen3", ref, "tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, ours = _logits(ref, inputs), _logits(model, inputs)
    exact = _logits(ref, inputs)
    assert ours.dtype == theirs.dtype
    assert_flash_rule(ours.float(), theirs.float(), exact, dtype=torch.bfloat16, name="qwen3 autocast")


def test_a_wrong_mapping_would_fail_the_logits_test():
    # Negative control for MODEL_LOGITS_FP32: Gemma's norms swapped, bypassing the verification, with
    # OLMo2's recipe (the same formula without Gemma's "1 +") must move the logits well past it.
    ref = perturb_norms(build_model("gemma", "tiny"), seed=1)
    model = copy.deepcopy(ref)
    for m in model.modules():
        if type(m).__name__ == "GemmaRMSNorm":
            modules.swap(m, ("recipe", "olmo2"), {"_layernorm_backend": None, "variance_epsilon": m.eps})
    inputs = model_inputs("gemma", ref, "tiny")
    assert (_logits(model, inputs) - _logits(ref, inputs)).abs().max() > 100 * MODEL_LOGITS_FP32[1]


# --- the recipes on every dtype pair -----------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
_COARSE = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _hf_class(qualified):
    module, _, name = qualified.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _instance(cls, hidden, dtype):
    m = cls(hidden)
    perturb_norms(m, scale=0.5, seed=3)
    return m.to(dtype)


@pytest.mark.parametrize("qualified", sorted(KNOWN_CLASSES), ids=lambda q: q.rsplit(".", 1)[-1])
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [1, 7, 24])
def test_recipe_reproduces_the_class_on_every_input_dtype(qualified, weight_dtype, hidden):
    if hidden == 1 and KNOWN_CLASSES[qualified] in ("cohere", "olmo-ln"):
        pytest.skip("a LayerNorm over one column is identically 0, its gradients too: nothing to compare")
    cls = _hf_class(qualified)
    original = _instance(cls, hidden, weight_dtype)
    patched = copy.deepcopy(original)
    layernorm.patch(patched, strict=True)
    assert modules.is_patched(patched)
    for x_dtype in DTYPES:
        x = (torch.randn(3, 5, hidden, dtype=torch.float64) * torch.tensor([1.0, 1e-3, 30.0]).view(3, 1, 1)).to(x_dtype)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        try:
            expected = original(x1)
        except RuntimeError:
            continue  # the original cannot run this pair (nothing to reproduce)
        actual = patched(x2)
        assert actual.dtype == expected.dtype, (x_dtype, weight_dtype)
        # the Hugging Face forwards compute in float32 whatever the input (x.float(), even for float64)
        coarsest = max((torch.float32, x_dtype, weight_dtype, expected.dtype), key=_COARSE.__getitem__)
        # atol relative to the output's or the weight's largest magnitude (every row of a norm is
        # O(weight); a single column of LayerNorm is exactly 0 in one and a few ulps off in another)
        w_max = max((p.detach().abs().max().double() for p in original.parameters()), default=torch.tensor(1.0))
        out_scale = torch.maximum(expected.detach().abs().max().double(), w_max.double())
        rtol, atol = tol(coarsest)
        torch.testing.assert_close(actual.double() / out_scale, expected.double() / out_scale, rtol=rtol, atol=atol)
        g = torch.randn_like(expected)
        grads = torch.autograd.grad(actual, [x2] + list(patched.parameters()), g)
        grads_ref = torch.autograd.grad(expected, [x1] + list(original.parameters()), g)
        # dx: relative to the terms it is made of, |g| |w| rstd ~ |g| |y| / rms(x) per row (they cancel,
        # fully for one column); parameter gradients: relative to their largest magnitude
        rms = x.double().square().mean(-1, keepdim=True).sqrt()
        term = g.double().abs().amax(-1, keepdim=True) * expected.detach().double().abs().amax(-1, keepdim=True)
        dx_scale = torch.where(rms > 0, term / rms.clamp_min(1e-300), grads_ref[0].double().abs().amax(-1, keepdim=True))
        scales = [dx_scale] + [e.abs().max().double() for e in grads_ref[1:]]
        for a, e, sc in zip(grads, grads_ref, scales):
            rtol, atol = tol(max((coarsest, a.dtype), key=_COARSE.__getitem__), "bwd")
            sc = sc.clamp_min(1e-300)
            torch.testing.assert_close(a.double() / sc, e.double() / sc, rtol=rtol, atol=atol)


# --- fused residual ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", LLAMA_LAYOUT)
def test_fused_residual_gives_equal_logits_and_losses(family):
    ref, model, report = _pair(family, fuse_residual=True)
    layers = model.model.layers
    assert len(report.fused) == len(layers) and not report.not_fused
    assert all(modules.is_patched(layer) for layer in layers)
    inputs = model_inputs(family, ref, "tiny")
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(_logits(model, inputs), _logits(ref, inputs), rtol=rtol, atol=atol)
    rtol, atol = TRAINING_LOSSES_FP32  # five AdamW steps amplify rounding differences (see the table)
    torch.testing.assert_close(_train(model, inputs)[0], _train(ref, inputs)[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_residual_in_bfloat16(family):
    ref, model, report = _pair(family, dtype=torch.bfloat16, fuse_residual=True)
    assert report.fused
    inputs = model_inputs(family, ref, "tiny")
    exact = _logits(copy.deepcopy(ref).float(), inputs)
    assert_flash_rule(_logits(model, inputs).float(), _logits(ref, inputs).float(), exact, dtype=torch.bfloat16)


def test_fused_layer_calls_the_fused_op_and_falls_back_when_the_norm_has_hooks(monkeypatch):
    ref, model, _ = _pair("llama", fuse_residual=True)
    inputs = model_inputs("llama", ref, "tiny")
    calls = []
    real = layernorm.patching.recipes.add_rms_norm
    monkeypatch.setattr(layernorm.patching.recipes, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    _logits(model, inputs)
    assert len(calls) == len(model.model.layers)
    seen = []
    model.model.layers[0].post_attention_layernorm.register_forward_hook(lambda *a: seen.append(1))
    calls.clear()
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(_logits(model, inputs), _logits(ref, inputs), rtol=rtol, atol=atol)
    assert seen == [1] and len(calls) == len(model.model.layers) - 1  # the hooked norm saw its call


def test_fused_layers_with_gradient_checkpointing():
    ref, model, _ = _pair("llama", fuse_residual=True)
    inputs = model_inputs("llama", ref, "tiny")
    for m in (ref, model):
        m.gradient_checkpointing_enable()
    assert_close(_train(model, inputs)[0], _train(ref, inputs)[0], "bwd")


@pytest.mark.slow
def test_fused_model_under_torch_compile():
    ref, model, _ = _pair("llama", fuse_residual=True)
    inputs = model_inputs("llama", ref, "tiny")
    rtol, atol = MODEL_LOGITS_FP32
    torch.testing.assert_close(_logits(torch.compile(model), inputs), _logits(ref, inputs), rtol=rtol, atol=atol)


def test_layers_of_another_layout_are_not_fused():
    _, model, report = _pair("phi3", fuse_residual=True)
    assert not report.fused and not report.not_fused  # Phi-3's layer has dropout: another layout
    assert not any(modules.is_patched(layer) for layer in model.model.layers)
