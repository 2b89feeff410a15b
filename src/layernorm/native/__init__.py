"""The package's C++ extension: every CPU kernel, and the registration of its operators.

Sources are in ``csrc/``; :mod:`layernorm.native.loader` builds them once per environment and loads
the result. :func:`load` returns the extension module, or None when this machine cannot build it.
"""
from .loader import BuildFailed, build, build_folder, load

__all__ = ["BuildFailed", "build", "build_folder", "load"]
