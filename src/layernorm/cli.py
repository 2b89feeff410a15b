"""The ``layernorm`` command.

::

    layernorm info [--json]          versions, devices, backends and the automatic choice per dtype
    layernorm build [--force]        build the C++ extension for this environment now
    layernorm bench [...]            LayerNorm/RMSNorm providers vs a copy baseline (see --help)
    layernorm bench --rnn [...]      the layer-normalized LSTM/GRU benchmark
    layernorm bench --models [...]   Hugging Face model families, patched vs unpatched
    layernorm bench --tune [...]     tune the Triton backend's launch table on this GPU
    layernorm lab [...]              experiments that test claims about normalization

Sub-commands are imported only when run, so ``layernorm info`` works without matplotlib, and a
missing optional part fails with one line saying what is missing, not a traceback.
"""
from __future__ import annotations

import json
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "info"]

_USAGE = """usage: layernorm {info,build,bench,lab} [...]

  info [--json]        versions, devices, available backends, automatic choice per (device, dtype)
  build [--force]      build the C++ extension for this environment now (otherwise: on first import)
  bench [...]          norm-op benchmark (layernorm bench --help)
  bench --rnn [...]    recurrent-layer benchmark (layernorm bench --rnn --help)
  bench --models [...] Hugging Face families patched vs not (layernorm bench --models --help)
  bench --tune [...]   tune the Triton launch table on this GPU (layernorm bench --tune --help)
  lab [...]            experiments (layernorm lab --help)
  --version            print the version
"""


def _fail(msg: str) -> int:
    print(f"layernorm: {msg}", file=sys.stderr)
    return 2


def _import_main(module: str, what: str):
    """``module.main`` or None after printing why (an ImportError names the missing piece)."""
    import importlib

    try:
        return importlib.import_module(module).main
    except ImportError as exc:
        _fail(f"{what} is not available: {type(exc).__name__}: {exc}")
    except AttributeError:
        _fail(f"{what}: {module} has no main()")
    return None


def info_dict() -> dict:
    """Everything ``layernorm info`` prints, as a JSON-able dict."""
    import torch

    import layernorm
    from layernorm.backends import BACKENDS, _why_not, available_backends, choose_backend

    from .bench._machine import describe_machine

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    backends = {}
    for dev in devices:
        d = torch.device(dev)
        backends[dev] = {
            "available": available_backends(dev),
            "unavailable": {name: _why_not(name, d) for name in BACKENDS if _why_not(name, d)},
            "auto": {str(dt).replace("torch.", ""): choose_backend(d, dt)
                     for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)},
        }
    return {
        "layernorm": {"version": getattr(layernorm, "__version__", None), "path": layernorm.__file__},
        "machine": describe_machine(),
        "backends": backends,
    }


def build(argv: Sequence[str] = ()) -> int:
    """``layernorm build``: build this environment's C++ extension now (CI, containers)."""
    import argparse
    import time

    p = argparse.ArgumentParser(prog="layernorm build", description=(
        "Build the C++ extension for this environment (it is otherwise built on first import), "
        "or report where the existing build is."))
    p.add_argument("--force", action="store_true", help="rebuild even if a build exists (also retries a failed one)")
    args = p.parse_args(list(argv))
    from layernorm.native import loader

    folder = loader.build_folder()
    existed = (folder / f"{loader.NAME}.so").exists() and not args.force
    started = time.perf_counter()
    try:
        loader.build(force=args.force)
    except loader.BuildFailed as exc:
        return _fail(f"the C++ extension could not be built: {exc}\n"
                     "  install a C++ compiler and the Python headers (e.g. `apt install g++ python3-dev`) and retry")
    what = "already built" if existed else f"built in {time.perf_counter() - started:.0f} s"
    print(f"layernorm: C++ extension {what}: {folder}")
    return 0


def info(argv: Sequence[str] = ()) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="layernorm info", description="Versions, devices and backends.")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(list(argv))
    d = info_dict()
    if args.json:
        print(json.dumps(d, indent=1, default=str))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    m = d["machine"]
    t = Table(title=f"layernorm {d['layernorm']['version']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in m["versions"].items():
        t.add_row(k, v or "[dim]not installed[/]")
    t.add_row("python", f"{m['python']} on {m['platform']}")
    t.add_row("cpu", f"{m['cpu_model']} ({m['cpu_count']} cpus, {m['cpu_affinity']} usable)")
    t.add_row("torch threads", f"{m['torch_threads']} intra-op, {m['torch_interop_threads']} inter-op "
                               f"({m['torch_parallel_info'] or '?'})")
    nat = m["native"]
    t.add_row("C++ extension", f"built for {nat['isa']}: {nat['folder']}" if nat["built"] else
              f"[red]not built[/]: {nat['error']} (`layernorm build` retries)")
    cuda = m["cuda"]
    t.add_row("cuda", "no CUDA device" if cuda is None else
              f"{cuda['name']} (sm {cuda['capability']}, {cuda['multiprocessors']} SMs, {cuda['memory_gib']} GiB, "
              f"CUDA {cuda['cuda_runtime']})")
    set_env = {k: v for k, v in m["env"].items() if v is not None}
    t.add_row("env", ", ".join(f"{k}={v}" for k, v in set_env.items()) or "[dim]none of the relevant vars set[/]")
    con.print(t)
    b = Table(title="backends")
    for c in ("device", "available", "auto: float32", "float64", "bfloat16", "float16", "unavailable"):
        b.add_column(c)
    for dev, v in d["backends"].items():
        a = v["auto"]
        b.add_row(dev, ", ".join(v["available"]), a["float32"], a["float64"], a["bfloat16"], a["float16"],
                  "\n".join(f"{k}: {r}" for k, r in v["unavailable"].items()))
    con.print(b)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point. ``argv`` None means the real command line."""
    from_command_line = argv is None
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_USAGE, end="")
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd in ("--version", "-V"):
        from layernorm import __version__

        print(f"layernorm {__version__}")
        return 0
    try:
        if cmd == "info":
            return info(rest)
        if cmd == "build":
            return build(rest)
        if cmd == "bench":
            if "--tune" in rest:
                fn = _import_main("layernorm.bench.tune", "the Triton launch-table tuner (layernorm.bench.tune)")
                return 2 if fn is None else int(fn([a for a in rest if a != "--tune"]) or 0)
            if "--models" in rest:
                rest = [a for a in rest if a != "--models"]
                fn = _import_main("layernorm.bench.models", "the model benchmark (layernorm.bench.models)")
                if fn is None:
                    return 2
                if from_command_line:
                    from layernorm.bench._malloc import maybe_reexec

                    maybe_reexec(["bench", "--models", *rest], None, "--no-reexec" in rest)
                return int(fn([a for a in rest if a != "--no-reexec"]) or 0)
            if "--rnn" in rest:
                rest = [a for a in rest if a != "--rnn"]
                fn = _import_main("layernorm.bench.rnn", "the RNN benchmark (layernorm.bench.rnn)")
                return 2 if fn is None else int(fn(rest, allow_reexec=from_command_line) or 0)
            fn = _import_main("layernorm.bench.norm", "the norm benchmark (layernorm.bench.norm)")
            if fn is None:
                return 2
            return int(fn(rest, allow_reexec=from_command_line) or 0)
        if cmd == "lab":
            fn = _import_main("layernorm.lab.cli", "the lab (layernorm.lab.cli)")
            return 2 if fn is None else int(fn(rest) or 0)
    except KeyboardInterrupt:
        return _fail("interrupted")
    return _fail(f"unknown command {cmd!r}\n{_USAGE}")


if __name__ == "__main__":
    sys.exit(main())
