"""Backend names, what each runs, and the automatic choice.

The functional API takes ``backend=`` as an override; without it, calls go through the operators of
:mod:`layernorm.ops`, which pick their kernel by device (CPU: the C++ kernels; CUDA: Triton).

``"cpu"``
    The operators' C++ CPU kernels (the C++ extension; CPU tensors).
``"triton"``
    The operators' Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``,
    Triton's interpreter, through :mod:`layernorm.backends.triton`'s launchers: how the test-suite
    runs them without a GPU).
``"torch"``
    ``torch.nn.functional``: torch's own kernels, the baseline.
``"reference"``
    :mod:`layernorm.backends.reference`, plain PyTorch under autograd: the spec every other backend
    is tested against.

Triton and the extension are loaded lazily: a CPU-only install never imports Triton.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailable",
    "available_backends",
    "choose_backend",
    "resolve_backend",
    "native_available",
    "triton_available",
]

ENV_VAR = "LAYERNORM_BACKEND"

# name -> the device types it runs on
BACKENDS: Dict[str, Tuple[str, ...]] = {
    "reference": ("cpu", "cuda"),
    "torch": ("cpu", "cuda"),
    "cpu": ("cpu",),
    "triton": ("cuda",),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


def native_available() -> bool:
    """True when the C++ extension (and so the operators) loaded."""
    from ..ops import NATIVE

    return NATIVE is not None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> Tuple[bool, str]:
    """(whether Triton imports, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def _why_not(name: str, device: torch.device) -> str:
    """'' when backend ``name`` can run on ``device`` here, else the reason."""
    runs_on = BACKENDS[name]
    if device.type not in runs_on and not (name == "triton" and device.type == "cpu" and _interpreted()):
        return f"it runs on {list(runs_on)} tensors, not {device.type}"
    if name in ("cpu", "triton") and not native_available():
        return "the C++ extension is not built (see the warning at import; `layernorm build` retries)"
    if name == "triton":
        ok, why = triton_available()
        if not ok:
            return why
        if device.type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
    return ""


def available_backends(device: Optional[str] = None) -> List[str]:
    """Names of the backends that can run here (on ``device`` if given: "cpu" or "cuda")."""
    devices = [torch.device(device)] if device is not None else [torch.device("cpu"), torch.device("cuda")]
    return [name for name in BACKENDS if any(not _why_not(name, d) for d in devices)]


def choose_backend(device: torch.device, dtype: torch.dtype, rms: bool = False) -> str:
    """The automatic choice for (device, dtype): the operators' kernels where they run (the C++ kernels
    on CPU, Triton on CUDA), else torch's. Never fails."""
    if device.type == "cpu" and native_available():
        return "cpu"
    if device.type == "cuda" and not _why_not("triton", device):
        return "triton"
    return "torch"


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype, rms: bool = False) -> str:
    """backend argument -> environment variable ``LAYERNORM_BACKEND`` -> automatic choice.

    An explicitly requested backend that cannot run raises :class:`BackendUnavailable` with the reason."""
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None or backend == "auto":
        return choose_backend(device, dtype, rms)
    if backend not in BACKENDS:
        source = "backend" if explicit else ENV_VAR
        raise ValueError(f"{source} must be one of {sorted(BACKENDS) + ['auto']}, but got {backend!r}")
    why = _why_not(backend, device)
    if why:
        raise BackendUnavailable(f"backend={backend!r} cannot run here: {why}")
    return backend
