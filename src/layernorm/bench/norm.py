"""``layernorm bench``: LayerNorm / RMSNorm (and fused residual-add) against torch, torch.compile,
Liger-Kernel and QuACK, with a memory-copy baseline measured in the same run.

What is measured, for each provider x op x (rows, cols) x dtype x mode:

- ``fwd``: the forward under ``torch.no_grad()``.
- ``bwd``: the backward alone: the forward graph is built once, then
  ``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True)`` is timed. This is the
  same call for every provider (our ops included), so it includes autograd's small per-call
  overhead and the allocation of dx/dw/db, as a training step does.
- ``fwd+bwd``: forward with autograd recording, then ``torch.autograd.grad`` (graph freed).

Bytes moved (the minimum traffic; weights, bias and per-row statistics are O(rows + cols) and
left out), in units of one (rows, cols) tensor of the input dtype:

==========  ========================  ==============================
mode        layer_norm / rms_norm     add_layer_norm / add_rms_norm
==========  ========================  ==============================
fwd         2: read x, write y        4: read x, r; write y, z
bwd         3: read dy, x; write dx   4: read dy, dz, z; write dx
fwd+bwd     5                         8
==========  ========================  ==============================

The copy baseline is ``dst.copy_(src)`` of ``bytes/2`` bytes (so it reads and writes the same byte
count), timed by the same timer in the same process. ``frac_copy = copy_time / provider_time`` is
then the fraction of the copy's bandwidth the provider reaches.

Correctness first: every provider's outputs (and gradients, when a backward mode is asked for) are
compared with our ``reference`` backend on the same inputs before it is timed; a provider outside
the tolerance table is marked ``incorrect`` and not timed.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._malloc import maybe_reexec
from ._malloc import malloc_state as _malloc_state
from ._machine import describe_machine
from ._providers import EPS, OPS, Provider, Unsupported, default_providers
from ._timing import TimerConfig, Timing, time_fn, timing_method

__all__ = ["main", "build_parser", "run", "EXTRA_PROVIDERS", "TOLERANCES", "SCHEMA"]

SCHEMA = "layernorm-bench-norm/1"

# Providers added to every run (tests inject a deliberately wrong one here). Always "available".
EXTRA_PROVIDERS: List[Provider] = []

# max |out - ref| / max |ref|, per dtype, for outputs and for gradients (reductions over many rows
# in a different order cost more digits in dweight/dbias than in y)
TOLERANCES: Dict[str, Dict[str, float]] = {
    "float64": {"out": 1e-9, "grad": 1e-8},
    "float32": {"out": 1e-4, "grad": 1e-3},
    "float16": {"out": 5e-3, "grad": 2e-2},
    "bfloat16": {"out": 2e-2, "grad": 5e-2},
}

MODES = ("fwd", "bwd", "fwd+bwd")
# bytes moved per element of one (rows, cols) tensor, per (mode, fused add)
_TENSORS_MOVED = {("fwd", False): 2, ("fwd", True): 4, ("bwd", False): 3, ("bwd", True): 4,
                  ("fwd+bwd", False): 5, ("fwd+bwd", True): 8}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}

CPU_COLS = (256, 1024, 4096, 16384)
# 4 MB stays in this machine's caches; 28 MB is below glibc's largest mmap threshold (torch's outputs
# reuse memory); 64 MB is beyond both, where every fresh output page-faults (layernorm.native's
# output cache is what avoids it for ours).
CPU_TARGET_MB = (4, 28, 64)
CUDA_COLS = (1024, 4096, 8192, 16384, 32768, 65536, 131072)
CUDA_NUMEL = 2**27


# ------------------------------------------------------------------------------------------ args
def _csv(s: str) -> List[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _ints(s: str) -> List[int]:
    try:
        return [int(t) for t in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def build_parser(prog: str = "layernorm bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark LayerNorm/RMSNorm providers against a copy baseline "
        "(use `layernorm bench --rnn ...` for the recurrent layers).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available")
    p.add_argument("--op", default="layer_norm,rms_norm",
                   help=f"comma list of {list(OPS)} or 'all'")
    p.add_argument("--mode", default="fwd,bwd,fwd+bwd", help=f"comma list of {list(MODES)}")
    p.add_argument("--dtype", default=None,
                   help="comma list: float32, bfloat16, float16, float64 (default float32,bfloat16; "
                   "float32 with --quick)")
    p.add_argument("--cols", type=_ints, default=None, help="comma list of widths (normalized size)")
    p.add_argument("--rows", type=_ints, default=None,
                   help="comma list of row counts (default: CPU tensors of ~4/12/28 MB; CUDA rows*cols = --numel)")
    p.add_argument("--numel", type=int, default=CUDA_NUMEL, help="CUDA default grid: rows*cols")
    p.add_argument("--providers", default=None,
                   help="comma list to run (eager, compile, ours, ours:reference, liger, quack); "
                   "default: every available one")
    p.add_argument("--all", action="store_true", help="also time the slow ours:reference backend")
    p.add_argument("--quick", action="store_true",
                   help="a couple of shapes, few repeats, no torch.compile on CPU (< 20 s on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per measurement")
    p.add_argument("--repeats", type=int, default=None, help="most timed calls per measurement")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="directory for JSON/CSV/PNG")
    p.add_argument("--tag", default=None, help="file name suffix (default: a timestamp)")
    p.add_argument("--no-save", action="store_true", help="print tables only")
    p.add_argument("--plot", action="store_true", help="also write a PNG of fraction-of-copy vs cols")
    p.add_argument("--block", action="store_true",
                   help="also time Linear->LayerNorm->GELU->Linear fwd+bwd, torch LN vs ours (runs first)")
    p.add_argument("--calls", action="store_true",
                   help="also time single calls on (1|8|128, 768) fp32, functional and module, ours vs torch")
    p.add_argument("--model", action="store_true",
                   help="also time a GPT-2-small-shaped pre-norm stack, batch 1, 1 and 64 tokens, patched vs not")
    p.add_argument("--startup", action="store_true",
                   help="also time import + first call in fresh processes (after the one-time build)")
    p.add_argument("--record", action="store_true",
                   help="the bench of record: --block --calls --model --startup --plot and the full grid")
    p.add_argument("--no-grid", action="store_true", help="skip the op grid (with --block: the block only)")
    p.add_argument("--block-rows", type=int, default=None, help="block input rows (default 8192; 1024 with --quick)")
    p.add_argument("--block-hidden", type=int, default=1024, help="block hidden size H")
    p.add_argument("--no-reexec", action="store_true",
                   help="CPU: do not re-execute with glibc malloc thresholds set (see layernorm.bench._malloc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no tables")
    p.add_argument("--tune", action="store_true",
                   help="tune the Triton backend's launch table instead (see layernorm bench --tune --help)")
    return p


def _parse_dtypes(spec: str) -> List[torch.dtype]:
    out = []
    for name in _csv(spec):
        if name not in _DTYPES:
            raise SystemExit(f"--dtype: unknown dtype {name!r}; expected one of {sorted(set(_DTYPES))}")
        if _DTYPES[name] not in out:
            out.append(_DTYPES[name])
    return out


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _parse_list(spec: str, allowed: Sequence[str], flag: str) -> List[str]:
    items = list(allowed) if spec == "all" else _csv(spec)
    bad = [i for i in items if i not in allowed]
    if bad:
        raise SystemExit(f"{flag}: unknown {bad}; expected a comma list of {list(allowed)} or 'all'")
    return items


# ------------------------------------------------------------------------------------------ grid
def default_grid(device: torch.device, dtype: torch.dtype, quick: bool, cols=None, rows=None,
                 numel: int = CUDA_NUMEL) -> List[Tuple[int, int]]:
    """(rows, cols) pairs. CPU: ~4/12/28 MB tensors per width (<32 MiB, see layernorm.bench._malloc);
    CUDA: rows*cols = numel (2^27 by default: 512 MB fp32 tensors, far beyond L2)."""
    elt = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        cols = cols or ([4096, 32768] if quick else list(CUDA_COLS))
        if rows:
            return [(r, c) for c in cols for r in rows]
        n = numel // 4 if quick else numel
        return [(max(1, n // c), c) for c in cols]
    cols = cols or ([1024, 4096] if quick else list(CPU_COLS))
    if rows:
        return [(r, c) for c in cols for r in rows]
    targets = (4,) if quick else CPU_TARGET_MB
    out = []
    for c in cols:
        for mb in targets:
            r = max(1, round(mb * 1e6 / (c * elt)))
            if (r, c) not in out:
                out.append((r, c))
    return out


# ---------------------------------------------------------------------------------- correctness
def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.detach().double(), ref.detach().double()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item() if b.numel() else 0.0
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    if math.isnan(diff):
        return float("nan")
    return diff / max(scale, 1e-30)


def _grad_inputs(op: str, x, r, w, b) -> List[torch.Tensor]:
    rms, add = OPS[op]
    ins = [x] + ([r] if add else []) + [w] + ([] if rms else [b])
    return ins


def _grad_names(op: str) -> List[str]:
    rms, add = OPS[op]
    return ["dx"] + (["dresidual"] if add else []) + ["dweight"] + ([] if rms else ["dbias"])


def _make_inputs(op: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    rms, add = OPS[op]
    # drawn on the device: 2^27 normal samples on the host take seconds per tensor
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
        return t.mul_(scale).add_(shift).to(dtype)

    t = {
        "x": randn(rows, cols),
        "r": randn(rows, cols) if add else None,
        "w": randn(cols, scale=0.1, shift=1.0),
        "b": None if rms else randn(cols, scale=0.1),
        "dy": randn(rows, cols),
        "dz": randn(rows, cols) if add else None,
    }
    return t


def _leaves(t: dict, op: str) -> Tuple[Optional[torch.Tensor], ...]:
    """Fresh leaves requiring grad that share storage with the inputs."""
    def leaf(v):
        return None if v is None else v.detach().requires_grad_(True)
    return leaf(t["x"]), leaf(t["r"]), leaf(t["w"]), leaf(t["b"])


def _grad_outputs(t: dict, op: str) -> Tuple[torch.Tensor, ...]:
    return (t["dy"], t["dz"]) if OPS[op][1] else (t["dy"],)


def _forward_and_grads(fn, t: dict, op: str, want_grads: bool):
    with torch.no_grad():
        outs_ng = tuple(o.detach() for o in fn(t["x"], t["r"], t["w"], t["b"]))
    grads = None
    if want_grads:
        x, r, w, b = _leaves(t, op)
        outs = fn(x, r, w, b)
        grads = torch.autograd.grad(outs, _grad_inputs(op, x, r, w, b), _grad_outputs(t, op))
        grads = tuple(gr.detach() for gr in grads)
    return outs_ng, grads


def _check(outs, grads, ref_outs, ref_grads, op: str, dtype: torch.dtype,
           baseline=None) -> Tuple[bool, Dict[str, float], Dict[str, float]]:
    """Errors per output/gradient vs the reference, and whether all are within tolerance.

    The tolerance of each is ``max(TOLERANCES[dtype], 2 * eager's error)``: torch's own kernels are
    the bar (flash-attn's rule), e.g. torch's CPU bf16 LayerNorm backward reduces dweight with a
    ~5% error that a fixed bf16 tolerance would reject."""
    table = TOLERANCES[_dtype_name(dtype)]
    errs: Dict[str, float] = {}
    if baseline == "self":  # torch eager is the bar itself: its errors are recorded, never rejected
        baseline = {n: _rel_err(o, r) for n, o, r in zip(("y", "z"), outs, ref_outs)}
        if ref_grads is not None and grads is not None:
            baseline.update({n: _rel_err(g, r) for n, g, r in zip(_grad_names(op), grads, ref_grads)})
        baseline = {k: v * 0.5 if math.isfinite(v) else None for k, v in baseline.items()}
    baseline = baseline or {}
    tols: Dict[str, float] = {}
    ok = len(outs) == len(ref_outs)

    def one(name, got, ref, kind):
        nonlocal ok
        errs[name] = _rel_err(got, ref)
        b = baseline.get(name)
        tols[name] = max(table[kind], 2 * b if isinstance(b, float) else 0.0)
        ok &= errs[name] <= tols[name]

    for name, o, ro in zip(("y", "z"), outs, ref_outs):
        one(name, o, ro, "out")
    if ref_grads is not None:
        if grads is None or len(grads) != len(ref_grads):
            return False, errs, tols
        for name, gr, rg in zip(_grad_names(op), grads, ref_grads):
            one(name, gr, rg, "grad")
    return bool(ok), {k: (v if math.isfinite(v) else str(v)) for k, v in errs.items()}, tols


# ------------------------------------------------------------------------------------------- run
def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _maybe_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _CopyBaseline:
    """Copy time per byte count, measured once each by the same timer."""

    def __init__(self, device: torch.device, cfg: TimerConfig):
        self.device, self.cfg, self.cache = device, cfg, {}

    def __call__(self, nbytes: int) -> Timing:
        if nbytes not in self.cache:
            half = max(1, nbytes // 2)
            src = torch.empty(half, dtype=torch.uint8, device=self.device).random_(0, 255)
            dst = torch.empty_like(src)
            self.cache[nbytes] = time_fn(lambda: dst.copy_(src), self.device, self.cfg)
            del src, dst
        return self.cache[nbytes]


def _timed_call(fn, t: dict, op: str, mode: str):
    """The zero-argument callable timed for ``mode`` (see the module docstring)."""
    if mode == "fwd":
        x, r, w, b = t["x"], t["r"], t["w"], t["b"]

        def call():
            with torch.no_grad():
                return fn(x, r, w, b)
        return call
    x, r, w, b = _leaves(t, op)
    inputs = _grad_inputs(op, x, r, w, b)
    gouts = _grad_outputs(t, op)
    if mode == "bwd":
        outs = fn(x, r, w, b)

        def call():
            return torch.autograd.grad(outs, inputs, gouts, retain_graph=True)
        return call

    def call():
        return torch.autograd.grad(fn(x, r, w, b), inputs, gouts)
    return call


def run(args: argparse.Namespace, extra_providers: Sequence[Provider] = (), console=None,
        checkpoint=None) -> dict:
    """Run the benchmark described by parsed ``args``; returns the result document (see SCHEMA).

    ``checkpoint(doc)``, if given, is called after each (dtype, op, shape) case, so a run stopped
    from outside (a time limit's SIGKILL) still leaves the cases it finished."""
    from rich.console import Console

    console = console or Console(stderr=False)
    device = _resolve_device(args.device)
    dtypes = _parse_dtypes(args.dtype or ("float32" if args.quick else "float32,bfloat16"))
    ops = _parse_list(args.op, list(OPS), "--op")
    modes = _parse_list(args.mode, list(MODES), "--mode")
    cfg = _timer_config(args, device)
    torch.manual_seed(args.seed)

    providers = default_providers(device, include_reference=args.all)
    providers += list(EXTRA_PROVIDERS) + list(extra_providers)
    wanted = _csv(args.providers) if args.providers else None
    if wanted:
        known = [p.name for p in providers]
        bad = [n for n in wanted if n not in known]
        if bad:
            raise SystemExit(f"--providers: unknown {bad}; expected names from {known}")
        if "ours:reference" in wanted:
            for p in providers:
                if p.name == "ours:reference" and not p.reason.startswith("runs on"):
                    p.available, p.reason = True, ""
    for p in providers:
        if wanted is not None and p.name not in wanted:
            p.available, p.reason = False, p.reason or "not selected (--providers)"
        if args.quick and device.type == "cpu" and p.name == "compile" and (wanted is None or "compile" not in wanted):
            p.available, p.reason = False, "skipped by --quick on CPU (inductor's C++ compile takes longer than the run)"

    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tag": args.tag,
        "device": device.type,
        "argv": list(getattr(args, "_argv", []) or []),
        "machine": describe_machine(),
        "settings": {
            "ops": ops, "modes": modes, "dtypes": [_dtype_name(d) for d in dtypes], "eps": EPS,
            "quick": bool(args.quick), "seed": args.seed,
            "timing": timing_method(device, cfg),
            "modes_defined": {
                "fwd": "forward under torch.no_grad()",
                "bwd": "torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True) on a graph "
                       "built once; same call for every provider (includes autograd overhead, dx/dw/db allocation)",
                "fwd+bwd": "forward with autograd, then torch.autograd.grad",
            },
            "bytes_moved": {
                "unit": "one (rows, cols) tensor of the input dtype; weights and row statistics left out",
                "layer_norm/rms_norm": {"fwd": "2 (read x, write y)", "bwd": "3 (read dy, x; write dx)", "fwd+bwd": 5},
                "add_layer_norm/add_rms_norm": {"fwd": "4 (read x, r; write y, z)",
                                                "bwd": "4 (read dy, dz, z; write dx)", "fwd+bwd": 8},
            },
            "copy_baseline": "dst.copy_(src), uint8 buffers of bytes/2 each, same timer, same process",
            "correctness": {"reference": "ours:reference on the same inputs",
                            "metric": "max|out-ref| / max|ref| per output and gradient",
                            "tolerance": "max(tolerances[dtype][out|grad], 2 * eager's error on the same output)",
                            "tolerances": TOLERANCES},
            "malloc": _malloc_state(device),
        },
        "providers": {p.name: {"available": p.available, "reason": p.reason, "version": p.version,
                               "description": p.description} for p in providers},
        "copy": [],
        "results": [],
        "summary": [],
        "block": None,
        "interrupted": False,
        "partial": False,
    }
    active = [p for p in providers if p.available]
    if device.type == "cuda" and any(p.name == "ours" for p in active):
        # which launch table the triton backend uses (LAYERNORM_TRITON_TABLE, a packaged device file,
        # or the built-in rule): a tuned table changes its timings
        try:
            from ..backends import triton as _triton_backend

            doc["settings"]["triton_table"] = _triton_backend.table_info(device)
        except Exception as exc:  # recorded, never fatal: the provider's own error says more
            doc["settings"]["triton_table"] = {"error": _short_error(exc)}

    doc["noise"] = {"load_average_start": doc["machine"].get("load_average")}
    if args.block:
        doc["block"] = [run_block(device, dt, args, cfg, console) for dt in dtypes]
    if device.type == "cpu" and (args.calls or args.model or args.startup):
        from . import overhead

        if args.calls:
            doc["calls"] = overhead.run_calls(quick=args.quick)
        if args.model:
            doc["model"] = overhead.run_model(quick=args.quick)
        if args.startup:
            doc["startup"] = overhead.run_startup(runs=2 if args.quick else 5)

    if not args.no_grid:
        copy = _CopyBaseline(device, cfg)
        cases = [(dt, op, rc) for dt in dtypes for op in ops
                 for rc in default_grid(device, dt, args.quick, args.cols, args.rows, args.numel)]
        try:
            _run_grid(cases, active, modes, device, cfg, copy, args.seed, doc, console, args.quiet, checkpoint)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (timeout): keep and save what was measured
            doc["interrupted"] = True
            console.print("[yellow]interrupted: saving the results measured so far[/]")
        doc["copy"] = [{"bytes": b, "ms": t.median_ms, "gbps": b / t.median_ms / 1e6, "spread": t.spread}
                       for b, t in sorted(copy.cache.items())]
        _add_speedups(doc["results"])
        doc["summary"] = summarize(doc["results"])
    doc["noise"] = assess_noise(doc)
    return doc


# Above these, a run is flagged as too noisy to trust (a quiet run of this machine stays well below).
# frac_copy: `copy_` writes through the caches, so each output line is first read (3 transfers per
# element); the native forward writes outputs of 32 MiB and more with streaming stores (2 transfers),
# so up to 1.5x a copy is physical there. 1.6 leaves that a tenth of margin.
NOISE_LIMITS = {"load_average": 1.0, "spread": 0.15, "frac_copy": 1.6}


def assess_noise(doc: dict) -> dict:
    """Signs that the machine was busy during the run, and a warning for each."""
    from ._machine import load_average

    noise = dict(doc.get("noise") or {})
    noise["load_average_end"] = load_average()
    warnings = []
    start = noise.get("load_average_start")
    if start and start[0] > NOISE_LIMITS["load_average"]:
        warnings.append(f"load average {start[0]:.2f} at the start (> {NOISE_LIMITS['load_average']}): "
                        "other processes shared the cores")
    spreads = [c["spread"] for c in doc.get("copy", []) if c.get("spread") is not None]
    spreads += [r["spread"] for r in doc.get("results", []) if r.get("spread") is not None]
    spreads += [r[k] for r in (doc.get("calls") or []) + (doc.get("model") or [])
                for k in r if k.startswith("spread")]
    spreads = [v for v in spreads if v == v]
    if spreads:
        noise["median_spread"] = statistics.median(spreads)
        noise["max_spread"] = max(spreads)
        if noise["median_spread"] > NOISE_LIMITS["spread"]:
            warnings.append(f"median spread of repeats {noise['median_spread']:.0%} "
                            f"(> {NOISE_LIMITS['spread']:.0%}): timings moved while measured")
    over = [r for r in doc.get("results", []) if (r.get("frac_copy") or 0) > NOISE_LIMITS["frac_copy"]]
    if over:
        worst = max(over, key=lambda r: r["frac_copy"])
        warnings.append(f"{len(over)} results beyond {NOISE_LIMITS['frac_copy']}x the copy bandwidth (worst "
                        f"{worst['frac_copy']:.0%}, {worst['provider']} {worst['op']} {worst['mode']}): "
                        "the copy baseline was measured in a slower moment")
    noise["limits"] = NOISE_LIMITS
    noise["warnings"] = warnings
    noise["trustworthy"] = not warnings
    return noise


def _run_grid(cases, providers, modes, device, cfg, copy, seed, doc, console, quiet, checkpoint=None):
    from rich.progress import Progress

    want_grads = any(m != "fwd" for m in modes)
    ref_provider = next(p for p in default_providers(device, include_reference=True) if p.name == "ours:reference")
    with Progress(transient=True, console=console, disable=quiet) as progress:
        task = progress.add_task("bench", total=len(cases) * len(providers))
        for dtype, op, (rows, cols) in cases:
            t = _make_inputs(op, rows, cols, dtype, device, seed)
            ref_outs, ref_grads = _forward_and_grads(ref_provider.build(op, device), t, op, want_grads)
            base = {"op": op, "dtype": _dtype_name(dtype), "rows": rows, "cols": cols}
            baseline_errs = None
            for p in providers:
                progress.update(task, description=f"{p.name} {op} {_dtype_name(dtype)} {rows}x{cols}")
                rs = _run_provider(p, t, op, dtype, modes, device, cfg, copy, ref_outs, ref_grads, base,
                                   "self" if p.name == "eager" else baseline_errs)
                if p.name == "eager" and rs and rs[0]["max_err"]:
                    baseline_errs = rs[0]["max_err"]
                doc["results"].extend(rs)
                progress.advance(task)
                _free(device)
            if not quiet:
                cells = []
                for r in doc["results"][-len(providers) * len(modes):]:
                    if r["mode"] == modes[-1]:
                        cells.append(f"{r['provider']} " + (f"{r['ms']:.3f}" if r["status"] == "ok" else r["status"]))
                console.print(f"[dim]{_dtype_name(dtype)} {op} {rows}x{cols} {modes[-1]} ms: " + ", ".join(cells) + "[/]")
            del t, ref_outs, ref_grads
            _free(device)
            if checkpoint is not None:
                _add_speedups(doc["results"])
                doc["partial"] = True
                checkpoint(doc)


def _run_provider(p, t, op, dtype, modes, device, cfg, copy, ref_outs, ref_grads, base,
                  baseline_errs=None) -> List[dict]:
    rows = []

    def row(mode, status, **kw):
        d = dict(base, provider=p.name, mode=mode, status=status, ms=None, ms_min=None, reps=None, spread=None,
                 bytes=None, gbps=None, copy_ms=None, copy_gbps=None, frac_copy=None, speedup_vs_eager=None,
                 max_err=None, tol=None, error=None)
        d.update(kw)
        return d

    try:
        fn = p.build(op, device)
    except Unsupported as exc:
        return [row(m, "unsupported", error=str(exc)) for m in modes]
    except Exception as exc:
        return [row(m, "error", error=_short_error(exc)) for m in modes]
    fwd_only = op in p.fwd_only_ops
    grads_needed = ref_grads is not None and not fwd_only
    try:
        outs, grads = _forward_and_grads(fn, t, op, grads_needed)
        _maybe_sync(device)
    except Exception as exc:
        return [row(m, "error", error=_short_error(exc)) for m in modes]
    ok, errs, tols = _check(outs, grads, ref_outs, ref_grads if grads_needed else None, op, dtype, baseline_errs)
    del outs, grads
    if not ok:
        return [row(m, "incorrect", max_err=errs, tol=tols, error="outside tolerance; not timed") for m in modes]
    elt = t["x"].element_size()
    numel = t["x"].numel()
    for mode in modes:
        if fwd_only and mode != "fwd":
            rows.append(row(mode, "unsupported", max_err=errs, tol=tols, error="forward only"))
            continue
        nbytes = _TENSORS_MOVED[(mode, OPS[op][1])] * numel * elt
        try:
            timing = time_fn(_timed_call(fn, t, op, mode), device, cfg)
            c = copy(nbytes)
        except Exception as exc:
            rows.append(row(mode, "error", max_err=errs, tol=tols, error=_short_error(exc)))
            _free(device)
            continue
        rows.append(row(mode, "ok", ms=timing.median_ms, ms_min=timing.min_ms, reps=timing.reps,
                        spread=timing.spread, bytes=nbytes,
                        gbps=nbytes / timing.median_ms / 1e6, copy_ms=c.median_ms,
                        copy_gbps=nbytes / c.median_ms / 1e6, frac_copy=c.median_ms / timing.median_ms,
                        max_err=errs, tol=tols))
    return rows


def _add_speedups(results: List[dict]) -> None:
    eager = {(r["op"], r["dtype"], r["rows"], r["cols"], r["mode"]): r["ms"]
             for r in results if r["provider"] == "eager" and r["status"] == "ok"}
    for r in results:
        e = eager.get((r["op"], r["dtype"], r["rows"], r["cols"], r["mode"]))
        if r["status"] == "ok" and e:
            r["speedup_vs_eager"] = e / r["ms"]


def _geomean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarize(results: List[dict]) -> List[dict]:
    """Geometric means over shapes and ops, per (provider, mode, dtype)."""
    keys = []
    for r in results:
        k = (r["provider"], r["mode"], r["dtype"])
        if k not in keys:
            keys.append(k)
    out = []
    for prov, mode, dt in keys:
        rs = [r for r in results if (r["provider"], r["mode"], r["dtype"]) == (prov, mode, dt)]
        ok = [r for r in rs if r["status"] == "ok"]
        out.append({
            "provider": prov, "mode": mode, "dtype": dt, "n_ok": len(ok), "n": len(rs),
            "n_incorrect": sum(r["status"] == "incorrect" for r in rs),
            "n_error": sum(r["status"] == "error" for r in rs),
            "geomean_speedup_vs_eager": _geomean([r["speedup_vs_eager"] for r in ok]),
            "geomean_frac_copy": _geomean([r["frac_copy"] for r in ok]),
        })
    return out


# ----------------------------------------------------------------------------------------- block
def run_block(device, dtype, args, cfg, console) -> dict:
    """Linear(H,H) -> LayerNorm(H) -> GELU -> Linear(H,H), fwd+bwd, torch's LayerNorm vs ours.

    Measured in one process, in this order: torch's block alone (before any of our kernels ran,
    when the block runs first), then ours once (JIT, thread-pool start), then the two interleaved.
    The before/after ratio of torch's own time shows the interference of our kernels' thread pool
    with torch's (both spin on the same cores on CPU).
    """
    from torch import nn

    from ..backends import choose_backend
    from ..nn import LayerNorm as OurLayerNorm

    H = args.block_hidden
    M = args.block_rows or (1024 if args.quick else 8192)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(M, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    gy = torch.randn(M, H, generator=g).to(device=device, dtype=dtype)

    def block(norm):
        torch.manual_seed(args.seed)
        return nn.Sequential(nn.Linear(H, H), norm, nn.GELU(), nn.Linear(H, H)).to(device=device, dtype=dtype)

    torch_model = block(nn.LayerNorm(H))
    ours_model = block(OurLayerNorm(H))
    ours_model.load_state_dict(torch_model.state_dict())
    chosen = choose_backend(device, dtype)

    def step(model):
        def call():
            for q in model.parameters():
                q.grad = None
            x.grad = None
            model(x).backward(gy)
        return call

    st, so = step(torch_model), step(ours_model)
    rounds = 3 if args.quick else 7
    small = TimerConfig(warmup=1, min_reps=2 if args.quick else 3, max_reps=5 if args.quick else 10,
                        budget_s=cfg.budget_s / 2)
    before = time_fn(st, device, TimerConfig(warmup=cfg.warmup, min_reps=small.min_reps * 2,
                                             max_reps=small.max_reps * 2, budget_s=cfg.budget_s))
    so()
    _maybe_sync(device)
    # same outputs (within the dtype's tolerance) or the comparison is void
    with torch.no_grad():
        err = _rel_err(ours_model(x), torch_model(x))
    t_torch, t_ours = [], []
    for _ in range(rounds):
        t_torch.append(time_fn(st, device, small).median_ms)
        t_ours.append(time_fn(so, device, small).median_ms)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    res = {
        "dtype": _dtype_name(dtype), "rows": M, "hidden": H, "ours_backend": chosen,
        "model": f"Linear({H},{H}) -> LayerNorm({H}) -> GELU -> Linear({H},{H}), fwd+bwd (backward of a fixed gy)",
        "torch_ms_before_ours": before.median_ms,
        "torch_ms": med(t_torch), "ours_ms": med(t_ours),
        "speedup_ours_vs_torch": med(t_torch) / med(t_ours),
        "torch_after_over_before": med(t_torch) / before.median_ms,
        "max_rel_err_output": err,
        "method": f"torch block timed alone first; then ours once; then {rounds} interleaved rounds, median of "
                  "per-round medians",
    }
    if not args.quiet:
        console.print(
            f"[bold]block[/] {res['model']} {M}x{H} {res['dtype']} on {device.type}: torch {res['torch_ms']:.2f} ms "
            f"(alone before ours: {before.median_ms:.2f} ms), ours[{chosen}] {res['ours_ms']:.2f} ms -> "
            f"{res['speedup_ours_vs_torch']:.2f}x; output rel err {err:.1e}")
    return res


# ---------------------------------------------------------------------------------------- output
def _fmt_cell(r: Optional[dict]) -> str:
    if r is None:
        return ""
    s = r["status"]
    if s == "ok":
        sp = r["speedup_vs_eager"]
        return f"{r['ms']:.3f} ms\n{r['frac_copy']:.0%} copy" + (f" {sp:.2f}x" if sp else "")
    if s == "incorrect":
        worst = max((v for v in r["max_err"].values() if isinstance(v, float)), default=float("nan"))
        return f"[red]WRONG[/] {worst:.1e}"
    if s == "unsupported":
        return "[dim]-[/]"
    return "[red]error[/]"


def print_tables(doc: dict, console) -> None:
    from rich.table import Table

    results = doc["results"]
    provs = list(dict.fromkeys(r["provider"] for r in results))
    for dt in doc["settings"]["dtypes"]:
        for mode in doc["settings"]["modes"]:
            rs = [r for r in results if r["dtype"] == dt and r["mode"] == mode]
            if not rs:
                continue
            tab = Table(title=f"{doc['device']} {dt} {mode}: median ms, fraction of copy bandwidth, speedup vs eager",
                        show_lines=True)
            tab.add_column("op")
            tab.add_column("rows x cols", justify="right")
            tab.add_column("copy GB/s", justify="right")
            for p in provs:
                tab.add_column(p, justify="right")
            shapes = list(dict.fromkeys((r["op"], r["rows"], r["cols"]) for r in rs))
            for op, m, n in shapes:
                cells = {r["provider"]: r for r in rs if (r["op"], r["rows"], r["cols"]) == (op, m, n)}
                copy_gbps = next((r["copy_gbps"] for r in cells.values() if r["copy_gbps"]), None)
                tab.add_row(op, f"{m}x{n}", f"{copy_gbps:.0f}" if copy_gbps else "",
                            *[_fmt_cell(cells.get(p)) for p in provs])
            console.print(tab)
    tab = Table(title="geometric mean over shapes and ops")
    for c in ("provider", "mode", "dtype", "ok/n", "x eager", "frac of copy", "wrong", "errors"):
        tab.add_column(c, justify="right" if c not in ("provider", "mode", "dtype") else "left")
    for s in doc["summary"]:
        sp, fc = s["geomean_speedup_vs_eager"], s["geomean_frac_copy"]
        tab.add_row(s["provider"], s["mode"], s["dtype"], f"{s['n_ok']}/{s['n']}",
                    f"{sp:.2f}" if sp else "-", f"{fc:.0%}" if fc else "-",
                    str(s["n_incorrect"] or ""), str(s["n_error"] or ""))
    console.print(tab)
    skipped = {k: v["reason"] for k, v in doc["providers"].items() if not v["available"]}
    if skipped:
        console.print("[dim]not run: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()) + "[/]")


def print_overhead(doc: dict, console) -> None:
    """Tables of the --calls, --model and --startup measurements."""
    from rich.table import Table

    if doc.get("calls"):
        tab = Table(title="single calls, (rows, 768) float32: median microseconds per call")
        for c in ("case", "rows", "threads", "torch", "ours", "ours / torch", "spread"):
            tab.add_column(c, justify="left" if c == "case" else "right")
        for r in doc["calls"]:
            tab.add_row(r["case"], str(r["rows"]), str(r["threads"]), f"{r['torch_us']:.2f}", f"{r['ours_us']:.2f}",
                        f"{r['ratio_ours_over_torch']:.2f}", f"{max(r['spread_torch'], r['spread_ours']):.0%}")
        console.print(tab)
    if doc.get("model"):
        tab = Table(title="model inference: patched vs unpatched")
        for c in ("model", "tokens", "unpatched ms", "patched ms", "patched / unpatched", "spread", "max |diff|"):
            tab.add_column(c, justify="left" if c == "model" else "right")
        for r in doc["model"]:
            tab.add_row(r["model"], str(r["tokens"]), f"{r['unpatched_ms']:.3f}", f"{r['patched_ms']:.3f}",
                        f"{r['ratio_patched_over_unpatched']:.3f}",
                        f"{max(r['spread_unpatched'], r['spread_patched']):.0%}", f"{r['max_abs_diff_output']:.1e}")
        console.print(tab)
    if doc.get("startup"):
        s = doc["startup"]
        console.print(f"fresh process (median of {s['runs']}): import torch {s['import_torch_s']:.2f} s, then import "
                      f"layernorm {s['import_layernorm_s']:.3f} s and the first layer_norm call "
                      f"{s['first_call_s'] * 1e3:.2f} ms (build folder {s['build_folder']})")


CSV_FIELDS = ["provider", "op", "mode", "dtype", "rows", "cols", "status", "ms", "ms_min", "reps", "spread", "bytes", "gbps",
              "copy_ms", "copy_gbps", "frac_copy", "speedup_vs_eager", "max_err", "tol", "error"]


def save(doc: dict, out_dir: str, tag: Optional[str], plot: bool, csv_too: bool = True) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = f"norm-{doc['device']}-{tag or time.strftime('%Y%m%d-%H%M%S')}"
    paths = {"json": os.path.join(out_dir, stem + ".json"), "csv": os.path.join(out_dir, stem + ".csv")}
    tmp = paths["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, paths["json"])  # a reader (or a kill mid-write) never sees half a file
    if not csv_too:
        return paths
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in doc["results"]:
            w.writerow(dict(r, max_err=json.dumps(r["max_err"]) if r["max_err"] else "",
                            tol=json.dumps(r["tol"]) if r["tol"] else ""))
    if plot and doc["results"]:
        paths["png"] = os.path.join(out_dir, stem + ".png")
        plot_results(doc, paths["png"])
    return paths


def plot_results(doc: dict, path: str) -> None:
    """Fraction of copy bandwidth vs cols: one panel per (mode, op), one line per provider,
    solid fp32 / dashed bf16 (geometric mean over row counts at each width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in doc["results"] if r["status"] == "ok"]
    modes, ops = doc["settings"]["modes"], doc["settings"]["ops"]
    provs = list(dict.fromkeys(r["provider"] for r in res))
    styles = {"float32": "-", "bfloat16": "--", "float16": ":", "float64": "-."}
    colors = {p: f"C{i % 10}" for i, p in enumerate(provs)}
    fig, axes = plt.subplots(len(modes), len(ops), figsize=(4.2 * len(ops), 3.2 * len(modes)), squeeze=False,
                             sharex=True)
    for i, mode in enumerate(modes):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            for p in provs:
                for dt in doc["settings"]["dtypes"]:
                    pts = {}
                    for r in res:
                        if (r["provider"], r["mode"], r["op"], r["dtype"]) == (p, mode, op, dt):
                            pts.setdefault(r["cols"], []).append(r["frac_copy"])
                    if pts:
                        xs = sorted(pts)
                        ax.plot(xs, [_geomean(pts[c]) for c in xs], styles.get(dt, "-"), color=colors[p],
                                marker="o", ms=3, label=f"{p} {dt}")
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_title(f"{op} {mode}", fontsize=9)
            ax.set_ylabel("fraction of copy bandwidth", fontsize=8)
            ax.set_xlabel("cols", fontsize=8)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, max(1, len(labels))), fontsize=7)
    gpu = (doc["machine"].get("cuda") or {}).get("name")
    fig.suptitle(f"layernorm bench on {gpu or doc['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(labels) / 6), 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def _timer_config(args, device) -> TimerConfig:
    if device.type == "cuda":
        cfg = TimerConfig(warmup=3, min_reps=10, max_reps=50, budget_s=0.03)
        if args.quick:
            cfg = TimerConfig(warmup=2, min_reps=5, max_reps=20, budget_s=0.02)
    else:
        cfg = TimerConfig(warmup=2, min_reps=5, max_reps=50, budget_s=0.3)
        if args.quick:
            cfg = TimerConfig(warmup=1, min_reps=3, max_reps=5, budget_s=0.03)
    if args.warmup is not None:
        cfg.warmup = args.warmup
    if args.repeats is not None:
        cfg.max_reps = max(1, args.repeats)
        cfg.min_reps = min(cfg.min_reps, cfg.max_reps)
    if args.budget is not None:
        cfg.budget_s = args.budget
    return cfg


def _maybe_reexec(argv: List[str], args) -> None:
    """CPU: re-execute ``python -m layernorm.cli bench ...`` with the malloc advice set, once."""
    maybe_reexec(["bench", *argv], args.device, args.no_reexec)


def _sigterm_as_interrupt() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, handler)


def main(argv: Optional[Sequence[str]] = None, *, allow_reexec: bool = False) -> int:
    """Entry point of ``layernorm bench`` (norm ops). ``allow_reexec`` only from the real command line."""
    from rich.console import Console

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--tune" in argv:
        from .tune import main as tune_main

        return tune_main([a for a in argv if a != "--tune"])
    args = build_parser().parse_args(argv)
    args._argv = argv
    if args.record:
        args.block = args.calls = args.model = args.startup = args.plot = True
    if allow_reexec:
        _maybe_reexec(argv, args)
    console = Console()
    _sigterm_as_interrupt()
    t0 = time.perf_counter()
    checkpoint = None
    if not args.no_save:
        stem_tag = args.tag or time.strftime("%Y%m%d-%H%M%S")
        args.tag = stem_tag

        def checkpoint(d):
            d["elapsed_s"] = round(time.perf_counter() - t0, 2)
            save(d, args.out, stem_tag, plot=False, csv_too=False)
    doc = run(args, console=console, checkpoint=checkpoint)
    doc["partial"] = False
    doc["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if not args.quiet and doc["results"]:
        print_tables(doc, console)
    if not args.quiet:
        print_overhead(doc, console)
    for w in doc["noise"]["warnings"]:
        console.print(f"[yellow]too noisy to trust: {w}[/]")
    if not args.no_save:
        paths = save(doc, args.out, args.tag, args.plot)
        console.print("wrote " + ", ".join(paths.values()))
    bad = [s for s in doc["summary"] if s["n_incorrect"]]
    if bad and not args.quiet:
        console.print("[yellow]providers outside tolerance (not timed): "
                      + ", ".join(sorted({s['provider'] for s in bad})) + "[/]")
    return 0
