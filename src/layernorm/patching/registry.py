"""Which modules are norms, and which of them we know how to replace.

Three rules, tried in this order, each proposing a mapping that :mod:`.verify` must then confirm on
a probe input before anything is swapped:

1. **registry**: the class is one of the Hugging Face norm classes listed in :data:`KNOWN_CLASSES`
   (by module and name, so transformers is never imported here);
2. **torch**: ``nn.LayerNorm`` / ``nn.RMSNorm`` or a subclass whose ``forward`` is torch's own
   (a subclass that overrides ``forward`` is *not* taken by this rule: replacing it would drop its
   behaviour);
3. **source**: the class's ``forward`` (with the helper methods it calls on ``self``) is, as code,
   the same as one of the forwards a recipe was written from (:attr:`Recipe.sources`): same syntax
   tree once docstrings, comments, annotations and the class's own name are set aside. This is what
   covers the many classes that transformers copies from Llama, Gemma, T5 ... under other names.

A module whose class matches none of them is left alone; if it looks like a norm (see
:func:`is_norm_like`) the report says so, and ``patch(strict=True)`` raises.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
from typing import Optional

from torch import nn

from ..nn import LayerNorm, RMSNorm
from .recipes import RECIPES, Recipe, recipe_by_key

__all__ = ["KNOWN_CLASSES", "Match", "recognise", "is_norm_like", "class_name", "normalized_source"]

# module.ClassName -> recipe key. The families of issue 12, checked against transformers 5.24's source.
KNOWN_CLASSES = {
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": "llama",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm": "llama",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm": "llama",
    "transformers.models.qwen3.modeling_qwen3.Qwen3RMSNorm": "llama",
    "transformers.models.phi3.modeling_phi3.Phi3RMSNorm": "llama",
    "transformers.models.olmo2.modeling_olmo2.Olmo2RMSNorm": "olmo2",
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": "gemma",
    "transformers.models.gemma2.modeling_gemma2.Gemma2RMSNorm": "gemma",
    "transformers.models.gemma3.modeling_gemma3.Gemma3RMSNorm": "gemma",
    "transformers.models.t5.modeling_t5.T5LayerNorm": "t5",
    "transformers.models.cohere.modeling_cohere.CohereLayerNorm": "cohere",
    "transformers.models.olmo.modeling_olmo.OlmoLayerNorm": "olmo-ln",
}

# Class names of layer/RMS norms: what strict=True insists on and the report lists when left.
# Leaf modules only, so blocks named after their norm ("...LayerNormConvLayer") do not count.
_NORM_NAME = re.compile(r"(?i)(layer|rms)_?norm")


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def is_norm_like(module: nn.Module) -> bool:
    """True for ``nn.LayerNorm`` / ``nn.RMSNorm`` (and subclasses), and for leaf modules whose class
    name says layer norm or RMS norm (``LlamaRMSNorm``, ``T5LayerNorm``, ``ConvNextLayerNorm``...)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return bool(_NORM_NAME.search(type(module).__name__)) and next(iter(module.children()), None) is None


@dataclasses.dataclass
class Match:
    """A proposed mapping for one class: ``recipe`` (Hugging Face style) or ``torch_base`` (our
    ``LayerNorm`` / ``RMSNorm``), found by ``rule``; or neither, and ``reason`` says why."""

    rule: str = ""
    recipe: Optional[Recipe] = None
    torch_base: Optional[type] = None
    reason: str = ""

    @property
    def found(self) -> bool:
        return self.recipe is not None or self.torch_base is not None


# --- source comparison ---------------------------------------------------------------------------


class _Strip(ast.NodeTransformer):
    """Drops what does not change behaviour: docstrings and annotations."""

    def visit_FunctionDef(self, node):
        self.generic_visit(node)
        node.returns = None
        for arg in node.args.args + node.args.kwonlyargs + node.args.posonlyargs:
            arg.annotation = None
        for arg in (node.args.vararg, node.args.kwarg):
            if arg is not None:
                arg.annotation = None
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        return node


def _normalize_function(node: ast.FunctionDef, own_names=()) -> str:
    text = ast.unparse(_Strip().visit(node))
    for name in own_names:
        text = re.sub(rf"\b{re.escape(name)}\b", "CLS", text)
    return text


def _self_calls(node: ast.FunctionDef):
    """Names of the methods a function calls on ``self`` (``self._norm(x)`` -> ``_norm``)."""
    out = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                and isinstance(sub.func.value, ast.Name) and sub.func.value.id == "self":
            out.add(sub.func.attr)
    return out


def _function_node(func) -> Optional[ast.FunctionDef]:
    try:
        src = textwrap.dedent(inspect.getsource(inspect.unwrap(func)))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.FunctionDef) else None


@functools.lru_cache(maxsize=None)
def normalized_source(cls: type) -> Optional[str]:
    """``cls.forward`` and the methods it calls on ``self`` (defined below ``nn.Module``), as
    normalized code; None when the source is not available (classes made in a REPL, C extensions)."""
    forward = _function_node(cls.forward)
    if forward is None:
        return None
    own = [c.__name__ for c in cls.__mro__ if c not in (nn.Module, object)]
    parts = [_normalize_function(forward, own)]
    for name in sorted(_self_calls(forward)):
        attr = inspect.getattr_static(cls, name, None)
        if inspect.isfunction(attr) and not hasattr(nn.Module, name):
            node = _function_node(attr)
            if node is None:
                return None
            parts.append(_normalize_function(node, own))
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _recipe_sources():
    """normalized recipe source -> recipe."""
    out = {}
    for recipe in RECIPES:
        for src in recipe.sources:
            nodes = [n for n in ast.parse(textwrap.dedent(src)).body if isinstance(n, ast.FunctionDef)]
            forward, helpers = nodes[0], sorted(nodes[1:], key=lambda n: n.name)
            out["\n".join(_normalize_function(n) for n in [forward] + helpers)] = recipe
    return out


def recipe_for_source(cls: type) -> Optional[Recipe]:
    src = normalized_source(cls)
    return None if src is None else _recipe_sources().get(src)


# --- the rules -----------------------------------------------------------------------------------


def recognise(module: nn.Module) -> Match:
    """The mapping the rules propose for ``module`` (``Match.found`` False when none does)."""
    cls = type(module)
    if "forward" in module.__dict__:
        return Match(reason="its forward is replaced on the instance (by a hook library such as accelerate?)")
    key = KNOWN_CLASSES.get(class_name(cls))
    if key is not None:
        return Match(rule="registry", recipe=recipe_by_key(key))
    for torch_cls, ours in ((nn.LayerNorm, LayerNorm), (nn.RMSNorm, RMSNorm)):
        if isinstance(module, torch_cls):
            if cls.forward is torch_cls.forward:
                return Match(rule="torch", torch_base=ours)
            recipe = recipe_for_source(cls)
            if recipe is not None:
                return Match(rule="source", recipe=recipe)
            return Match(reason=f"subclass of torch.nn.{torch_cls.__name__} that overrides forward, "
                                "and its forward matches no known norm: replacing it would drop that behaviour")
    recipe = recipe_for_source(cls)
    if recipe is not None:
        return Match(rule="source", recipe=recipe)
    if normalized_source(cls) is None:
        return Match(reason="not a known class, and its forward's source is not available to compare")
    return Match(reason="not a known class, and its forward matches no known norm formula")
