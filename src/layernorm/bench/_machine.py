"""What machine a benchmark ran on: enough to tell two result files apart and to reproduce them.

Shared by ``layernorm info`` and every benchmark's JSON (``machine`` block). Reading versions goes
through package metadata, so describing the machine does not import triton.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Dict, List, Optional

__all__ = ["describe_machine", "package_versions", "cpu_model", "native_extension", "load_average", "ENV_VARS"]

# environment variables that change timings; recorded verbatim (None when unset)
ENV_VARS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "LAYERNORM_BACKEND",
    "LAYERNORM_RNN_BACKEND",
    "LAYERNORM_CACHE_DIR",
    "TRITON_INTERPRET",
    "CUDA_VISIBLE_DEVICES",
)

_PACKAGES = ("layernorm", "torch", "numpy", "triton", "liger-kernel", "quack-kernels", "rich", "matplotlib")


def package_versions() -> Dict[str, Optional[str]]:
    """Installed version of each package that matters here, None when absent."""
    out: Dict[str, Optional[str]] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["layernorm"] is None:  # running from a source tree (PYTHONPATH=src) without an install
        try:
            import layernorm

            out["layernorm"] = getattr(layernorm, "__version__", None)
        except ImportError:
            pass
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None:  # the imported one wins over metadata (several torches on a path)
        out["torch"] = torch_mod.__version__
    return out


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_extension() -> Dict[str, Optional[object]]:
    """The C++ extension of this environment: built or not, where, for which instruction set."""
    from ..native import loader

    tag, _ = loader.arch_flags()
    folder = loader.build_folder()
    seconds = folder / "build-seconds.txt"
    module = loader.load()
    return {
        "built": module is not None,
        "folder": str(folder),
        "isa": tag,
        "build_seconds": float(seconds.read_text()) if seconds.exists() else None,
        "error": None if module is not None else str(loader._state["error"]),
    }


def load_average() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages (a busy machine makes timings unreliable)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cuda_block(torch) -> Optional[dict]:
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1),
        "l2_cache_mb": round(getattr(p, "L2_cache_size", 0) / 2**20, 1) or None,
        "cuda_runtime": torch.version.cuda,
        "device_count": torch.cuda.device_count(),
    }


def describe_machine() -> dict:
    """Platform, CPU, core and thread counts, package versions, GPU and timing-relevant env vars."""
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_parallel_info": _parallel_backend(torch),
        "native": native_extension(),
        "load_average": load_average(),
        "versions": package_versions(),
        "cuda": _cuda_block(torch),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
    }


def _parallel_backend(torch) -> Optional[str]:
    # e.g. "OpenMP" / "native thread pool"; the line in parallel_info() that names it
    try:
        for line in torch.__config__.parallel_info().splitlines():
            if line.startswith("ATen parallel backend"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return None
