"""``layernorm.patch(model)``: our kernels in the norms of the models people use, verified, reversible.

- :mod:`.recipes`: each Hugging Face family's norm formula, mapped onto our ops for every dtype pair;
- :mod:`.registry`: which modules are norms and which recipe (or torch rule) each class gets;
- :mod:`.verify`: the probe comparison every swap must pass;
- :mod:`.modules`: the replacement classes and the in-place class swap (and its undo);
- :mod:`.fused`: the fused residual add in Llama-layout decoder layers;
- :mod:`.report`: what a ``patch()`` call did;
- :mod:`.patch`: :func:`patch` and :func:`unpatch`.

The table of families and how each is mapped is in docs/patch.md.
"""
from .patch import patch, unpatch
from .recipes import RECIPES, Recipe
from .registry import KNOWN_CLASSES
from .report import PatchEntry, PatchReport

__all__ = ["patch", "unpatch", "PatchReport", "PatchEntry", "Recipe", "RECIPES", "KNOWN_CLASSES"]
