"""Which implementation runs a recurrence: the one switch, ``backend=``, and its one environment variable.

``backend`` (argument of the modules and of :func:`~layernorm.rnn.lstm_recurrence`):

- ``"reference"``: :mod:`layernorm.rnn.reference`, a Python loop with autograd's backward (the spec);
- ``"torch"``: :mod:`layernorm.rnn.impl_torch`, the hand-written backward in torch ops (any device);
- ``"cpp"``: :mod:`layernorm.rnn.impl_cpp`, the whole time loop in the C++ extension (CPU, float32/64);
- ``"triton"``: :mod:`layernorm.rnn.impl_triton`, one fused Triton kernel per step (CUDA; CPU tensors
  only under ``TRITON_INTERPRET=1``);
- ``None`` or ``"auto"``: ``$LAYERNORM_RNN_BACKEND`` if set, else the fastest that runs here: ``cpp``
  for CPU float32/float64 when the extension builds, ``triton`` for CUDA when Triton imports, else
  ``torch``.

An explicit backend that cannot run on the given tensors raises; ``auto`` never does.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

__all__ = ["BACKENDS", "ENV", "check_backend", "resolve", "implementation", "native"]

BACKENDS = ("auto", "reference", "torch", "cpp", "triton")
ENV = "LAYERNORM_RNN_BACKEND"


def check_backend(backend: Optional[str], name: str = "backend") -> Optional[str]:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {list(BACKENDS)} or None, but got {name}={backend!r}")
    return backend


def native():
    """The C++ extension module (built once per environment), or None where it cannot be built."""
    from ..native import load

    return load()


@functools.lru_cache(maxsize=None)
def _triton():
    """(the Triton implementation, None) or (None, the import error)."""
    try:
        from .impl_triton import TritonImpl
    except Exception as exc:  # not installed, or a broken install: the torch path still works
        return None, exc
    return TritonImpl, None


def _interpreted(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(backend: Optional[str], device, dtype: torch.dtype) -> str:
    """The concrete backend (``reference``, ``torch``, ``cpp`` or ``triton``) for tensors of this device and dtype.

    Raises ``ValueError``/``RuntimeError`` when an explicitly named backend cannot run them."""
    device = torch.device(device)
    choice = backend if backend not in (None, "auto") else os.environ.get(ENV) or "auto"
    if backend is None and choice not in BACKENDS:
        raise ValueError(f"${ENV} must be one of {list(BACKENDS)}, but got {choice!r}")
    if choice in ("reference", "torch"):
        return choice
    cpp_ok = device.type == "cpu" and dtype in (torch.float32, torch.float64)
    if choice == "cpp":
        if not cpp_ok:
            raise ValueError(f"backend='cpp' needs CPU float32/float64 tensors, but got {dtype} on {device}")
        if native() is None:
            raise RuntimeError("backend='cpp' requested, but the C++ extension is not built (`layernorm build` says why)")
        return "cpp"
    if choice == "triton":
        if device.type != "cuda" and not _interpreted(device):
            raise ValueError(f"backend='triton' needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                             f"but got tensors on {device}")
        impl, err = _triton()
        if impl is None:
            raise RuntimeError(f"backend='triton' requested, but triton does not import: {err}")
        return "triton"
    if cpp_ok and native() is not None:
        return "cpp"
    if device.type == "cuda" and _triton()[0] is not None:
        return "triton"
    return "torch"


def implementation(name: str):
    """The object with the contract's methods for a concrete backend name (not ``reference``)."""
    if name == "torch":
        from .impl_torch import TorchOps

        return TorchOps
    if name == "cpp":
        from .impl_cpp import cpp_impl

        return cpp_impl()
    if name == "triton":
        impl, err = _triton()
        if impl is None:
            raise RuntimeError(f"backend='triton' requested, but triton does not import: {err}")
        return impl
    raise ValueError(f"no implementation object for backend {name!r}")
