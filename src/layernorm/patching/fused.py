"""Fused residual: ``add_rms_norm`` wired into Llama-family decoder layers (``patch(fuse_residual=True)``).

A Llama-layout decoder layer computes, after attention::

    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)

which the fused layer replaces with one call, ``(normed, residual) = add_norm(hidden_states, residual)``
(one pass over the sum instead of an add, then a norm that reads it again). Everything else in the
layer is the original code.

Which layers: those whose ``forward`` is, as code, the layer this was written from (transformers
5.24's ``LlamaDecoderLayer.forward``, shared verbatim by Mistral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE,
Gemma, OLMo, SmolLM3, GLM, Ministral, Arcee, ...; compared as in ``registry``, the class name set
aside), and whose ``post_attention_layernorm`` was swapped. The fused step is verified on probes
against the unfused code before the layer is swapped; at run time it falls back to the unfused code
whenever the norm has hooks (they must see their call) or the dtypes make the fused op inexact.
"""
from __future__ import annotations

import ast
import functools
import textwrap
from typing import Optional, Tuple

from torch import nn

from .modules import RecipeNorm, _Patched, fused_add_norm
from .registry import _normalize_function, normalized_source

__all__ = ["LLAMA_LAYER_SOURCE", "fusable_layout", "fused_layer_class"]

LLAMA_LAYER_SOURCE = '''
@deprecate_kwarg('past_key_values', '5.40.0', new_name='cache')
def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
            position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                      position_ids=position_ids, cache=cache, use_cache=use_cache,
                                      position_embeddings=position_embeddings, **kwargs)
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
'''


def _fused_llama_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                         use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states, residual = fused_add_norm(self.post_attention_layernorm, hidden_states, residual)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def _llama_forward():
    # the original's own decorator, so that the deprecated keyword is renamed (and warned about) as before
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(_fused_llama_forward)


@functools.lru_cache(maxsize=None)
def _layouts():
    node = ast.parse(textwrap.dedent(LLAMA_LAYER_SOURCE)).body[0]
    return {_normalize_function(node): "llama"}


_FORWARDS = {"llama": _llama_forward}


def fusable_layout(layer: nn.Module) -> Tuple[Optional[str], str]:
    """(layout key, None) when ``layer`` can be fused; (None, None) when it is not a decoder layer of
    a layout fused here (transformers 5.24's ``LlamaDecoderLayer``); else (None, why not)."""
    src = normalized_source(type(layer))
    layout = _layouts().get(src) if src is not None else None
    if layout is None:
        return None, None
    if "forward" in layer.__dict__:
        return None, "its forward is replaced on the instance"
    norm = getattr(layer, "post_attention_layernorm", None)
    if not isinstance(norm, RecipeNorm):
        return None, "its post_attention_layernorm was not swapped"
    return layout, None


class FusedLayer(_Patched):
    """Marker base of the fused decoder layer classes."""


@functools.lru_cache(maxsize=None)
def fused_layer_class(original: type, layout: str) -> type:
    return type(original.__name__, (FusedLayer, original), {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "forward": _FORWARDS[layout](),
        "_layernorm_factory": ("fused", original, layout),
    })
