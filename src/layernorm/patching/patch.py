"""``patch(model)`` and ``unpatch(model)``."""
from __future__ import annotations

import logging
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..backends import BACKENDS
from ..nn import LayerNorm, RMSNorm

from . import fused, modules, registry, verify
from .report import FUSED, KEPT, LEFT, NOT_FUSED, SWAPPED, PatchEntry, PatchReport

__all__ = ["patch", "unpatch"]

logger = logging.getLogger("layernorm.patch")

_OURS = (LayerNorm, RMSNorm)


def _check_backend(backend: Optional[str]) -> None:
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS) + ['auto']} or None, but got {backend!r}")


def _backend_attribute(module: nn.Module) -> str:
    return "backend" if isinstance(module, _OURS) else "_layernorm_backend"


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _verification_key(module: nn.Module, new_cls: type, attributes: dict):
    """Everything a probe result depends on: the classes, the parameters' shapes/dtypes/device and the
    module's plain attributes (eps, normalized_shape, ...). Equal keys, equal verdicts."""
    params = tuple((n, tuple(p.shape), p.dtype, p.device.type) if p is not None else (n, None)
                   for n, p in module._parameters.items())
    plain = tuple(sorted((k, v) for k, v in module.__dict__.items()
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, tuple, type(None)))
                         and _hashable(v)))
    return type(module), new_cls, params, plain, tuple(sorted(attributes.items()))


def _plan(module: nn.Module, match: registry.Match, backend: Optional[str]):
    """(factory, replacement class, attributes to add, mapping text) for a found match."""
    if match.torch_base is not None:
        factory = ("torch", match.torch_base)
        kind = "layer_norm" if match.torch_base is LayerNorm else "rms_norm"
        mapping = f"layernorm.{match.torch_base.__name__} ({kind}, eps=.eps)"
        attributes = {"backend": backend}
    else:
        factory = ("recipe", match.recipe.key)
        mapping = f"{match.recipe.describe()} [recipe {match.recipe.key}: {match.recipe.formula}]"
        attributes = {"_layernorm_backend": backend}
    new_cls = modules.make_class(type(module), factory)
    return factory, new_cls, attributes, mapping


def patch(
    model: nn.Module,
    backend: Optional[str] = None,
    *,
    strict: bool = False,
    fuse_residual: bool = False,
    return_report: bool = False,
) -> Union[nn.Module, Tuple[nn.Module, PatchReport]]:
    """Make the norms inside ``model`` run layernorm's kernels, in place, changing nothing else.

    Recognised (see :mod:`layernorm.patching.registry`): ``nn.LayerNorm`` / ``nn.RMSNorm`` and their
    subclasses that keep torch's ``forward``; the norm classes of Hugging Face's Llama, Mistral,
    Qwen2/2.5/3 (with ``q_norm``/``k_norm``), Phi-3, OLMo/OLMo2, Gemma 1/2/3, T5, Cohere, and every
    class whose ``forward`` is, as code, one of theirs. Each is mapped with its family's numerics
    (Gemma's ``1 + w``, Llama's rounding of ``xhat`` before the weight, its own eps attribute).

    Every swap is verified when it is made: on probe inputs in float32, bfloat16, float16 (and the
    parameters' dtype) and under autocast, the replacement must give the original's output dtype,
    values and gradients within the dtype's tolerance, or the module is left as it is and the report
    says why. A swap changes the module's class in place (a subclass of the original, with the same
    name), so parameters stay the same objects, ``state_dict`` keys and ``save_pretrained`` /
    ``from_pretrained`` are unaffected, optimizers keep their state, and :func:`unpatch` undoes it.

    Args:
        model: any module (a norm itself works too).
        backend: the backend our ops use in the swapped modules; None chooses per call.
        strict: raise ``RuntimeError`` (before changing anything) if a layer/RMS norm would be left.
        fuse_residual: also fuse the post-attention residual add into the norm (``add_rms_norm``) in
            Llama-layout decoder layers (see :mod:`layernorm.patching.fused`; measured in docs/patch.md).
        return_report: return ``(model, report)`` instead of ``model``.

    Warns (``UserWarning``) when nothing was swapped, and when a norm module is left.

    Example::

        >>> model = transformers.AutoModelForCausalLM.from_config(config)
        >>> model, report = layernorm.patch(model, return_report=True)
        >>> print(report)   # what was swapped, how, and what was left and why
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    _check_backend(backend)
    report = PatchReport()
    bypassed = _bypassed_by_fused_encoder(model)
    planned: List[Tuple[nn.Module, tuple, dict]] = []
    verdicts: Dict[object, verify.Verification] = {}
    for name, module in model.named_modules():
        cls_name = registry.class_name(type(module))
        if isinstance(module, fused.FusedLayer):
            continue
        if modules.is_patched(module) or isinstance(module, _OURS):
            if backend is not None:
                object.__setattr__(module, _backend_attribute(module), backend)
            origin = modules.original_class(module) if modules.is_patched(module) else None
            report.entries.append(PatchEntry(
                name, registry.class_name(origin) if origin else cls_name, KEPT,
                reason="patched before" if origin else "already a layernorm module"))
            continue
        match = registry.recognise(module)
        if not match.found:
            if registry.is_norm_like(module):
                report.entries.append(PatchEntry(name, cls_name, LEFT, reason=match.reason))
            continue
        reason = match.recipe.check(module) if match.recipe is not None else None
        if reason:
            report.entries.append(PatchEntry(name, cls_name, LEFT, rule=match.rule, reason=reason))
            continue
        factory, new_cls, attributes, mapping = _plan(module, match, backend)
        key = _verification_key(module, new_cls, attributes)
        if key not in verdicts:
            # the Hugging Face formulas compute in float32 whatever the input (x.float())
            computes_in = torch.float32 if match.recipe is not None else None
            verdicts[key] = verify.verify_swap(module, new_cls, attributes, computes_in)
        verdict = verdicts[key]
        entry = PatchEntry(name, cls_name, SWAPPED if verdict.ok else LEFT, rule=match.rule, mapping=mapping,
                           max_error=dict(verdict.max_error), notes=list(verdict.notes))
        if not verdict.ok:
            entry.reason = f"verification failed: {verdict.reason}"
        else:
            planned.append((module, factory, attributes))
            if id(module) in bypassed:
                entry.notes.append(_FUSED_ENCODER_NOTE)
        report.entries.append(entry)

    if strict and report.left:
        raise RuntimeError(
            f"patch(strict=True): {len(report.left)} norm module(s) would be left as they are, nothing was "
            f"changed:\n{PatchReport(report.left).summary()}")
    for module, factory, attributes in planned:
        modules.swap(module, factory, attributes)
    if fuse_residual:
        _fuse(model, report)

    logger.info("%s", report)
    if not report.swapped and not report.kept:
        detail = f":\n{report}" if report.left else ": it contains no layer norm or RMS norm module"
        warnings.warn(f"layernorm.patch swapped nothing in {type(model).__name__}{detail}", UserWarning, stacklevel=2)
    elif report.left:
        warnings.warn(
            f"layernorm.patch left {len(report.left)} norm module(s) of {type(model).__name__} as they are:\n"
            f"{PatchReport(report.left)}", UserWarning, stacklevel=2)
    return (model, report) if return_report else model


_FUSED_ENCODER_NOTE = (
    "inside nn.TransformerEncoderLayer: in eval mode without autograd torch runs its fused encoder-layer kernel "
    "(torch._transformer_encoder_layer_fwd), which reads this norm's parameters itself, so there the layer's "
    "LayerNorm is torch's; in training or with autograd the swapped module runs")


def _bypassed_by_fused_encoder(model: nn.Module) -> set:
    """ids of the norms torch's fused encoder-layer inference path skips (it takes their weights only)."""
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    return {id(norm) for layer in layers for norm in (layer.norm1, layer.norm2)}


def _fuse(model: nn.Module, report: PatchReport) -> None:
    verdicts: Dict[object, verify.Verification] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, fused.FusedLayer):
            continue
        layout, reason = fused.fusable_layout(layer)
        if layout is None and reason is None:
            continue  # not a decoder layer of that layout: nothing to say
        cls_name = registry.class_name(type(layer))
        if layout is None:
            report.entries.append(PatchEntry(name, cls_name, NOT_FUSED, reason=reason))
            continue
        norm = layer.post_attention_layernorm
        key = _verification_key(norm, type(norm), {})
        if key not in verdicts:
            verdicts[key] = verify.verify_fused_add(norm)
        verdict = verdicts[key]
        entry = PatchEntry(name, cls_name, FUSED if verdict.ok else NOT_FUSED, rule=layout,
                           mapping=f"residual add + post_attention_layernorm -> add_{norm._layernorm_recipe.kind}_norm",
                           max_error=dict(verdict.max_error), notes=list(verdict.notes))
        if verdict.ok:
            modules.swap(layer, ("fused", layout), {})
        else:
            entry.reason = f"verification failed: {verdict.reason}"
        report.entries.append(entry)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on every module of ``model``: each gets its original class back (and loses
    the attributes patch added). Raises ``RuntimeError``, changing nothing, if a patched module's class
    was changed since (e.g. wrapped by FSDP's ``fully_shard``). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, but got {type(model).__name__}")
    patched = [(n, m) for n, m in model.named_modules() if modules.is_patched(m)]
    stuck = [(n, m) for n, m in patched if type(m) is not modules.replacement_class(m)]
    if stuck:
        names = ", ".join(n or "<root>" for n, _ in stuck[:5])
        raise RuntimeError(f"unpatch: {len(stuck)} module(s) changed class since they were patched ({names}), "
                           "e.g. by FSDP's fully_shard: unpatch before wrapping; nothing was changed")
    for _, module in patched:
        modules.restore(module)
    logger.info("layernorm.unpatch: %d module(s) restored", len(patched))
    return model
