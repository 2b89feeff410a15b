"""The replacement classes, and the in-place swap to them and back.

A swap changes the *class* of the module object (``module.__class__ = Patched``) and adds a few
attributes; nothing else. Parameters, buffers, hooks, the training flag, ``state_dict`` keys and the
object's identity are the original's, so optimizers, FSDP/DDP wrappers, tied weights and any other
reference to the module keep working, and :func:`restore` undoes it exactly.

The replacement class of a class ``C`` is a subclass of ``C`` with the same name (so
``isinstance(m, C)`` holds and Hugging Face code that looks at class names, e.g. ``_init_weights``,
sees what it expects), whose ``forward`` runs our ops:

- Hugging Face style norms: ``C`` + :class:`RecipeNorm` (the recipe's forward, see ``recipes``);
- ``nn.LayerNorm`` / ``nn.RMSNorm`` themselves: our :class:`layernorm.LayerNorm` / ``RMSNorm``;
  their subclasses whose ``forward`` is torch's: ``C`` + our class's ``forward``.

Made at run time, these classes cannot be pickled by name; :meth:`_Patched.__reduce_ex__` pickles an
instance as "the patched class of C" instead, so ``copy.deepcopy`` and ``torch.save(model)`` keep the
patch (loading needs layernorm importable, as for any model holding layernorm's modules).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .recipes import Recipe, recipe_by_key

__all__ = [
    "RecipeNorm", "recipe_class", "torch_class", "swap", "restore", "is_patched", "original_class",
    "replacement_class", "make_class", "MARKER", "fused_add_norm",
]

# Instance attribute holding (original class, factory name, factory argument, attributes we added):
# the replacement class is ``_FACTORIES[name](original, argument)`` (cached, so always the same
# object). Classes made at run time are not kept here, so the marker pickles.
MARKER = "_layernorm_patched_from"


def is_patched(module: nn.Module) -> bool:
    return MARKER in module.__dict__


def original_class(module: nn.Module) -> type:
    return module.__dict__[MARKER][0]


def replacement_class(module: nn.Module) -> type:
    """The class :func:`swap` gave ``module`` (its class now, unless something changed it since)."""
    original, name, arg, _ = module.__dict__[MARKER]
    return _FACTORIES[name](original, arg)


def make_class(original: type, factory: Tuple[str, object]) -> type:
    """The replacement class of ``original`` made by ``factory`` = (name, argument)."""
    return _FACTORIES[factory[0]](original, factory[1])


def swap(module: nn.Module, factory: Tuple[str, object], attributes: Dict[str, object]) -> None:
    """Turn ``module`` into an instance of ``_FACTORIES[factory[0]](type(module), factory[1])``, in place."""
    original = type(module)
    name, arg = factory
    new_cls = _FACTORIES[name](original, arg)
    for key, value in attributes.items():
        object.__setattr__(module, key, value)
    object.__setattr__(module, MARKER, (original, name, arg, tuple(attributes)))
    module.__class__ = new_cls


def restore(module: nn.Module) -> None:
    """Undo :func:`swap` (the caller checked that ``type(module)`` is still the replacement class)."""
    original, _, _, attributes = module.__dict__[MARKER]
    module.__class__ = original
    for key in attributes + (MARKER,):
        module.__dict__.pop(key, None)


class _Patched:
    """Pickles (and deep-copies) an instance of a run-time class as ``factory(original, arg)``."""

    _layernorm_factory: Tuple[str, type, object]

    def __reduce_ex__(self, protocol):
        name, original, arg = type(self)._layernorm_factory
        return _rebuild, (name, original, arg), self.__dict__.copy()


def _rebuild(factory_name: str, original: type, arg) -> nn.Module:
    cls = _FACTORIES[factory_name](original, arg)
    return cls.__new__(cls)


def _single_input(module: nn.Module, args, kwargs) -> Tensor:
    """The one tensor the original forward takes, however it was passed."""
    if len(args) == 1 and not kwargs:
        return args[0]
    original = type(module)._layernorm_factory[1]
    bound = inspect.signature(original.forward).bind(module, *args, **kwargs)
    _, value = bound.arguments.values()  # (self, the input)
    return value


class RecipeNorm(_Patched):
    """Mixin placed before a Hugging Face norm class: its forward runs the class's recipe."""

    _layernorm_recipe: Recipe
    _layernorm_backend: Optional[str]

    def forward(self, *args, **kwargs) -> Tensor:
        x = _single_input(self, args, kwargs)
        device_type = x.device.type
        # The original forward casts explicitly and is the same with or without autocast; our ops
        # must not be re-cast by an enclosing autocast region either.
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                out = self._layernorm_recipe.forward(self, x, self._layernorm_backend)
        else:
            out = self._layernorm_recipe.forward(self, x, self._layernorm_backend)
        if out is NotImplemented:  # a dtype combination the recipe leaves to the original
            return self._layernorm_original_forward(x)
        return out

    def _layernorm_original_forward(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def _layernorm_forward_add(self, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``(self(residual + x), residual + x)``, fused when exact (see ``Recipe.forward_add``)."""
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            total = residual + x
            return self(total), total
        normed, total = self._layernorm_recipe.forward_add(self, x, residual, self._layernorm_backend)
        if normed is NotImplemented:
            normed = self._layernorm_original_forward(total)
        return normed, total

    def extra_repr(self) -> str:
        base = super().extra_repr()
        ours = f"layernorm={self._layernorm_recipe.key}, backend={self._layernorm_backend or 'auto'}"
        return f"{base}, {ours}" if base else ours


@functools.lru_cache(maxsize=None)
def recipe_class(original: type, recipe_key: str) -> type:
    """The replacement class of a Hugging Face style norm class ``original``."""
    recipe = recipe_by_key(recipe_key)
    return type(original.__name__, (RecipeNorm, original), {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": f"{original.__name__} running layernorm's {recipe.describe()} (recipe {recipe.key!r}).",
        "_layernorm_recipe": recipe,
        "_layernorm_factory": ("recipe", original, recipe_key),
    })


@functools.lru_cache(maxsize=None)
def torch_class(original: type, ours: type) -> type:
    """The replacement of ``nn.LayerNorm`` / ``nn.RMSNorm`` or of a subclass whose forward is torch's."""
    if original in (nn.LayerNorm, nn.RMSNorm):
        return ours
    return type(original.__name__, (_Patched, original, ours), {
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "forward": ours.forward,
        "extra_repr": ours.extra_repr,
        "_layernorm_factory": ("torch", original, ours),
    })


def _fused_factory(original: type, arg) -> type:
    from .fused import fused_layer_class  # the fused layers depend on this module, not the reverse

    return fused_layer_class(original, arg)


_FACTORIES: Dict[str, Callable[[type, object], type]] = {
    "recipe": recipe_class,
    "torch": torch_class,
    "fused": _fused_factory,
}


def _no_hooks(module: nn.Module) -> bool:
    """True when calling ``module(x)`` would go straight to ``forward`` (torch's own fast path test
    in ``Module._call_impl``): then calling our method directly changes nothing observable."""
    from torch.nn.modules import module as _m

    return not (
        module._backward_hooks or module._backward_pre_hooks or module._forward_hooks
        or module._forward_pre_hooks or _m._global_backward_pre_hooks or _m._global_backward_hooks
        or _m._global_forward_hooks or _m._global_forward_pre_hooks
    )


def fused_add_norm(norm: nn.Module, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """``(norm(residual + x), residual + x)``: one fused op when ``norm`` is one of ours without hooks,
    else exactly the unfused code (the sum, then the module call with its hooks)."""
    if isinstance(norm, RecipeNorm) and _no_hooks(norm):
        return norm._layernorm_forward_add(x, residual)
    total = residual + x
    return norm(total), total

