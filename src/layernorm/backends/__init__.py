"""Backend registry and automatic choice.

A backend is a module with ``forward`` and ``backward`` of the contract documented in
:mod:`layernorm.backends.reference`. Modules are imported lazily: a CPU-only install never imports
Triton, and a machine without numba still gets ``reference`` and ``torch``.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Dict, List, Optional

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "get_backend",
    "choose_backend",
    "resolve_backend",
]

# name -> (module path, devices it runs on)
BACKENDS: Dict[str, tuple] = {
    "reference": ("layernorm.backends.reference", ("cpu", "cuda")),
    "torch": ("layernorm.backends.torch_aten", ("cpu", "cuda")),
    "cpu": ("layernorm.backends.cpu", ("cpu",)),
    "triton": ("layernorm.backends.triton", ("cuda",)),
}

# Automatic choice per (device type, dtype), with per-op exceptions below, from `layernorm bench`
# (benchmarks/results/norm-cpu-cpu-2core.json, 2 cores, geometric means vs torch eager):
#   fp32 LayerNorm: cpu 0.99x forward, 0.94x fwd+bwd alone, 1.05x inside a Linear-LN-GELU-Linear block;
#     kept on cpu for its bitwise determinism across thread counts and its 1e20-row accuracy.
#   fp32 RMSNorm: cpu 2.3x forward, 3.8x fwd+bwd (torch's CPU rms_norm is a composite of small ops).
#   bf16 LayerNorm: torch (our cpu backend upcasts with torch first: 0.3x). bf16 RMSNorm: cpu, 2.0x / 2.6x.
#   fp16: cpu, although slower than torch for LayerNorm: ATen's fp16 CPU backward returns NaN for
#     all-zero rows with a tiny eps (pytorch #41527); ours stays finite.
_PREFERENCE = {
    ("cpu", torch.float32): ("cpu", "torch"),
    ("cpu", torch.float64): ("cpu", "torch"),
    ("cpu", torch.bfloat16): ("torch",),
    ("cpu", torch.float16): ("cpu", "torch"),
    ("cuda", torch.float32): ("triton", "torch"),
    ("cuda", torch.float64): ("torch",),
    ("cuda", torch.bfloat16): ("triton", "torch"),
    ("cuda", torch.float16): ("triton", "torch"),
}
_RMS_PREFERENCE = {
    ("cpu", torch.bfloat16): ("cpu", "torch"),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@functools.lru_cache(maxsize=None)
def _load(name: str):
    """Import a backend module; returns (module or None, reason it is unavailable)."""
    path, _ = BACKENDS[name]
    if name == "triton" and os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        return None, "triton needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter)"
    try:
        return importlib.import_module(path), ""
    except ImportError as exc:  # optional dependency missing
        return None, f"{type(exc).__name__}: {exc}"


def available_backends(device: Optional[str] = None) -> List[str]:
    """Names of the backends that can run here (on ``device`` if given: "cpu" or "cuda")."""
    out = []
    for name, (_, devices) in BACKENDS.items():
        if device is not None and torch.device(device).type not in devices:
            if not (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
                continue
        if _load(name)[0] is not None:
            out.append(name)
    return out


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, but got backend={name!r}")
    module, why = _load(name)
    if module is None:
        raise BackendUnavailable(f"backend={name!r} is not available: {why}")
    return module


def _runs_on(name: str, device: torch.device) -> bool:
    devices = BACKENDS[name][1]
    if device.type in devices:
        return True
    # Triton's interpreter runs the GPU kernels on CPU tensors (used by the test-suite).
    return name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def choose_backend(device: torch.device, dtype: torch.dtype, rms: bool = False) -> str:
    """The fastest measured backend that can run on (device, dtype) for LayerNorm (or RMSNorm when
    ``rms``). Never fails."""
    key = (device.type, dtype)
    order = _RMS_PREFERENCE.get(key) if rms else None
    for name in order or _PREFERENCE.get(key, ("torch",)):
        if _runs_on(name, device) and _load(name)[0] is not None:
            return name
    return "torch"


@torch.compiler.assume_constant_result
def resolve_backend(
    backend: Optional[str], device: torch.device, dtype: torch.dtype, rms: bool = False
) -> str:
    """backend argument -> env LAYERNORM_BACKEND -> automatic choice."""
    explicit = backend is not None
    if backend is None:
        backend = os.environ.get("LAYERNORM_BACKEND") or None
    if backend is None or backend == "auto":
        return choose_backend(device, dtype, rms)
    if backend not in BACKENDS:
        source = "backend" if explicit else "LAYERNORM_BACKEND"
        raise ValueError(f"{source} must be one of {sorted(BACKENDS) + ['auto']}, but got {backend!r}")
    if not _runs_on(backend, device):
        raise BackendUnavailable(
            f"backend={backend!r} cannot run on {device.type} tensors; it runs on {list(BACKENDS[backend][1])}"
        )
    get_backend(backend)  # raises BackendUnavailable with the reason
    return backend
