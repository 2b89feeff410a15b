"""Build and load the C++ extension, once per environment.

The binary depends on the sources, the torch it is compiled against, the Python ABI and the compiler
flags (which include the instruction set). All of them go into a key, and each key has its own
folder under the cache (``$LAYERNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/layernorm``, else
``~/.cache/layernorm``): two environments never evict each other's build, and an environment that
finds its folder built loads the library directly, without asking a build tool anything.

A build announces itself on stderr in one line before it compiles. A build that fails (no compiler,
no Python headers) is remembered in the folder, so later processes do not retry it; each process
then warns once and runs on torch's own kernels. ``layernorm build`` (or :func:`build`) builds
ahead of time, and retries a failed build.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Tuple

import torch

__all__ = ["NAME", "BuildFailed", "build", "build_key", "build_folder", "cache_root", "arch_flags", "load"]

NAME = "layernorm_native"
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("module.cpp", "norm_ops.cpp", "norm_kernels.cpp", "output_cache.cpp", "rnn.cpp")
# -fno-trapping-math lets gcc turn clamps into blends and -fno-math-errno inlines sqrt; without them
# the RNN's row loops do not vectorize. Neither changes results (no -ffast-math: NaN and rounding
# behaviour of the statistics stay IEEE).
# FMT_HEADER_ONLY: torch's argument-parser header formats with fmt, whose library torch does not export.
_CFLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-DNDEBUG", "-DFMT_HEADER_ONLY"]
_LDFLAGS = ["-fopenmp"]
# Measured on this project's 2-core machine (docs/backends.md); printed in the announcement.
_TYPICAL_BUILD = "about 2 minutes on 2 cores"


class BuildFailed(RuntimeError):
    """The extension could not be built here; the message says why and what fixes it."""


def arch_flags() -> Tuple[str, List[str]]:
    """(tag, flags) for the instruction set torch itself dispatches to on this CPU.

    The norm kernels are AVX2 everywhere: they are bound by memory, and 256-bit vectors were as fast
    as 512-bit ones for them (docs/backends.md) without the clock drop some CPUs take. On AVX-512
    machines the recurrent row passes (``rnn.cpp``), whose transcendentals are bound by compute, are
    compiled for 512-bit vectors (``LAYERNORM_AVX512``; docs/rnn_fast.md, "Which instruction set").
    """
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        capability = "DEFAULT"
    if capability == "AVX512":
        return "avx512", ["-mavx2", "-mfma", "-mf16c", "-DLAYERNORM_AVX512"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "generic", []


def build_key() -> str:
    """Hex digest of everything the binary depends on."""
    digest = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    tag, flags = arch_flags()
    for part in (
        torch.__version__,
        str(getattr(torch.version, "git_version", "")),
        sys.implementation.cache_tag,
        sysconfig.get_config_var("EXT_SUFFIX") or "",
        tag,
        " ".join(_CFLAGS + flags + _LDFLAGS),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_root() -> Path:
    root = os.environ.get("LAYERNORM_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "layernorm"


def build_folder() -> Path:
    return cache_root() / f"native-{build_key()}"


def _library(folder: Path) -> Path:
    return folder / f"{NAME}.so"


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(NAME, str(path))
    spec = importlib.util.spec_from_file_location(NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[NAME] = module
    return module


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _compile(folder: Path) -> None:
    from torch.utils import cpp_extension

    tag, flags = arch_flags()
    print(
        f"layernorm: building its C++ extension (CPU kernels of LayerNorm/RMSNorm and LSTM/GRU) for this "
        f"environment (torch {torch.__version__}, Python {sys.version_info[0]}.{sys.version_info[1]}, {tag}) "
        f"into {folder}: {_TYPICAL_BUILD}, once.",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()
    cpp_extension.load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=_CFLAGS + flags,
        extra_ldflags=list(_LDFLAGS),  # cpp_extension appends to the list it is given
        build_directory=str(folder),
        is_python_module=True,
        verbose=False,
    )
    (folder / "build-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")


_state = {"module": None, "error": None}
_lock = threading.Lock()


def build(force: bool = False) -> ModuleType:
    """Build the extension if this environment has no build yet (or ``force``), load it and return it.

    Raises :class:`BuildFailed` when it cannot be built."""
    folder = build_folder()
    library, failed = _library(folder), folder / "build-failed.txt"
    with _lock:
        if _state["module"] is not None and not force:
            return _state["module"]
        folder.parent.mkdir(parents=True, exist_ok=True)
        with open(folder.parent / f"{folder.name}.lock", "w") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process may be building the same key
            if force:
                shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
            if not library.exists():
                if failed.exists():
                    raise BuildFailed(failed.read_text().strip())
                if _compiler() is None:
                    raise BuildFailed("no C++ compiler found (looked for $CXX, c++ and g++)")
                try:
                    _compile(folder)
                except Exception as exc:  # compiler errors, missing headers, ...
                    lines = str(exc).strip().splitlines()
                    reason = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
                    failed.write_text(reason + "\n")
                    raise BuildFailed(reason) from exc
        if _state["module"] is None:  # a library cannot be loaded twice: a forced rebuild serves new processes
            _state["module"] = _import(library)
        _state["error"] = None
        return _state["module"]


def load() -> Optional[ModuleType]:
    """The extension module (built on first use in this environment), or None, with one warning per
    process, when it cannot be built."""
    if _state["module"] is not None:
        return _state["module"]
    if _state["error"] is not None:
        return None
    try:
        return build()
    except BuildFailed as exc:
        _state["error"] = exc
        warnings.warn(
            f"layernorm: its C++ extension is not available ({exc}). LayerNorm/RMSNorm run on torch's own "
            f"kernels and LayerNormLSTM/GRU on the slower torch-ops path. To fix: install a C++ compiler and "
            f"the Python headers (e.g. `apt install g++ python3-dev`), then run `layernorm build`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
