"""``layernorm bench --tune``: tune the Triton backend's launch table on this GPU.

For each width of the issue-4 grid (1024 ... 131072 columns, rows * cols = 2^27), dtype (bf16,
fp32) and direction (forward, backward), a small set of launch configurations is timed:

* the built-in choice (:func:`layernorm.backends.triton.builtin_launch`), always first;
* its nearest neighbours in (tile elements, elements per thread): fused rows per program and
  ``num_warps`` in {1, 2, 4, 8, 16, 32}, wide column blocks {2048, 4096, 8192}; at widths where
  both kernel families are plausible (forward 8192-16384, backward 4096-8192) both are tried;
* backward only: the fastest of those again with programs per SM in {1, 2, 4, 8}.

At most ``--max-candidates`` (12) per (width, dtype, direction); each is run once and checked against
the built-in choice's result, then timed: ``--warmup`` calls, then ``--iters`` (<= 20) calls each
between two CUDA events, outputs preallocated, median kept. The op is ``layer_norm`` with weight and
bias (``--op rms_norm`` for the other); the winner is used for every op of that width and dtype.

Check (a candidate outside it is never chosen): max|out - out_default| / max|out_default| within
:data:`CHECK_TOL`. Different tiles reduce rows in a different order, so results may differ from the
built-in choice by rounding (<= 1 ulp of the output dtype); whether they are bitwise equal is
recorded (``bitwise``). Backward: dx as above, dweight/dbias (fp32 partial sums, compared before
the final cast) within 1e-4, since the number of partials changes with the grid.

The winner must beat the built-in choice by ``--min-gain`` (2%), otherwise the built-in choice is
kept (timing noise is ~1%). Files, rewritten after every (width, dtype, direction) so a run that is
killed keeps what it finished (``--out``, default ``benchmarks/results``):

* ``triton-table-<device>.json``: the winners, in the schema of :mod:`layernorm.backends.triton`
  (use it with ``LAYERNORM_TRITON_TABLE=...``; ``--install`` also writes it to the package's
  ``backends/triton_tables/<device>.json``, which CUDA launches on that device then read);
* ``triton-tune-<device>.json``: every candidate's times and check (schema ``layernorm-triton-tune/1``).

``--budget-s`` (170 s): no new group is started when the time spent plus the last group's time would
pass it. Compilation dominates (one Triton compile per candidate, ~0.3-1 s each).

On CPU, under ``TRITON_INTERPRET=1`` only, the same code runs tiny shapes (widths 64 and 4100, 5 rows,
3 candidates): timings there mean nothing; it is how the tuner is tested. Without CUDA and without the
interpreter it exits with a message.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["main", "build_parser", "candidates", "pps_variants", "SCHEMA", "CHECK_TOL", "WIDTHS"]

SCHEMA = "layernorm-triton-tune/1"
# the issue-4 grid, the widths where torch.compile won (1024, 8192) first: a budget cut keeps them
WIDTHS = (1024, 8192, 4096, 16384, 32768, 65536, 131072)
QUICK_WIDTHS = (1024, 8192, 65536)
CPU_WIDTHS = (64, 4100)
CPU_ROWS = 5
DTYPES = ("bfloat16", "float32")
NUMEL = 2**27
EPS = 1e-5

# max|out - out_default| / max|out_default| per output dtype; dweight/dbias: fp32 partial sums
CHECK_TOL = {"float32": 1e-5, "float64": 1e-12, "bfloat16": 2e-2, "float16": 2e-3, "partials": 1e-4}

_DT = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
       "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}

# candidate ranges: tile elements of a fused program, elements per thread (register budget, see
# backends/triton.py: ~16 forward, ~8 backward fit without spills; one step beyond is tried)
_FUSED_TILE = {"fwd": (1024, 16384), "bwd": (512, 8192)}
_EPT = {"fwd": (4, 32), "bwd": (2, 16)}
_WIDE_BLOCKS = (2048, 4096, 8192)
_WIDE_FROM = {"fwd": 8192, "bwd": 4096}      # wide candidates from this bucket up
_PPS = (1, 2, 4, 8)


class _Stop(Exception):
    """A message for the user and exit status 2 (no traceback)."""


# ------------------------------------------------------------------------------------- candidates
def _tile(c, bucket: int) -> int:
    return c.rows * bucket if c.kernel == "fused" else c.block


def _ept(c, bucket: int) -> float:
    return _tile(c, bucket) / (32 * c.num_warps)


def _family(tb, direction: str, kernel: str, bucket: int) -> list:
    out = []
    lo_e, hi_e = _EPT[direction]
    warps_ok = lambda tile, w: lo_e <= tile / (32 * w) <= hi_e or (w == 1 and tile / 32 < lo_e)  # noqa: E731
    if kernel == "fused":
        lo_t, hi_t = _FUSED_TILE[direction]
        lo_t = min(lo_t, tb._MAX_ROWS * bucket)
        if bucket > hi_t:
            return out
        base = tb._kernel_default(direction, "fused", bucket)
        r = 1
        while r <= tb._MAX_ROWS:
            tile = r * bucket
            if lo_t <= tile <= hi_t and tile <= tb._MAX_TILE:
                for w in tb._NUM_WARPS:
                    if warps_ok(tile, w):
                        pps = max(1, tb._WAVES // w) if direction == "bwd" else 0
                        out.append(tb.Launch("fused", w, rows=r, programs_per_sm=pps))
            r *= 2
        if base not in out and base.rows * bucket <= tb._MAX_TILE:
            out.append(base)
        return out
    if bucket < _WIDE_FROM[direction]:
        return out
    base = tb._kernel_default(direction, "wide", bucket)
    for blk in _WIDE_BLOCKS:
        if blk > max(bucket, base.block):
            continue
        for w in tb._NUM_WARPS:
            if warps_ok(blk, w):
                out.append(tb.Launch("wide", w, rows=1, block=blk, programs_per_sm=base.programs_per_sm))
    return out


def candidates(direction: str, bucket: int, limit: int) -> list:
    """The built-in launch for ``bucket`` first, then up to ``limit - 1`` of its nearest neighbours:
    distance = |log2 tile ratio| + |log2 elements-per-thread ratio| to the built-in choice of the same
    kernel family, + 1 for the other family (whose nearest member is always included when
    ``limit >= 3``). Deterministic."""
    from ..backends import triton as tb

    default = tb.builtin_launch(direction, bucket)
    pool = []
    for kernel in tb._KERNELS:
        fam_default = tb._kernel_default(direction, kernel, bucket)
        for c in _family(tb, direction, kernel, bucket):
            if c == default or c in [p[-1] for p in pool]:
                continue
            d = (abs(math.log2(_tile(c, bucket) / _tile(fam_default, bucket)))
                 + abs(math.log2(_ept(c, bucket) / _ept(fam_default, bucket)))
                 + (1.0 if kernel != default.kernel else 0.0))
            pool.append((d, kernel != default.kernel, _tile(c, bucket), c.num_warps, c))
    pool.sort(key=lambda p: p[:4])
    picked = [p[-1] for p in pool[: max(0, limit - 1)]]
    other = next((p[-1] for p in pool if p[1]), None)
    if limit >= 3 and other is not None and other not in picked:
        picked[-1] = other  # where both families are plausible, always try the other one too
    return [default] + picked


def pps_variants(best, limit: int) -> list:
    """``best`` with other backward programs-per-SM counts, nearest (in log2) first."""
    from dataclasses import replace

    others = sorted((p for p in _PPS if p != best.programs_per_sm),
                    key=lambda p: (abs(math.log2(p / best.programs_per_sm)), p))
    return [replace(best, programs_per_sm=p) for p in others[: max(0, limit)]]


# ------------------------------------------------------------------------------------------ parser
def _ints(s: str) -> List[int]:
    try:
        return [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def build_parser(prog: str = "layernorm bench --tune") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="cpu: Triton's interpreter (TRITON_INTERPRET=1), tiny shapes, for testing")
    p.add_argument("--quick", action="store_true",
                   help=f"CUDA: widths {list(QUICK_WIDTHS)}, rows*cols = 2^24, 6 candidates, 10 iterations")
    p.add_argument("--cols", type=_ints, default=None, help=f"widths (default {list(WIDTHS)})")
    p.add_argument("--dtype", default=",".join(DTYPES), help="comma list of bfloat16, float32, float16, float64")
    p.add_argument("--direction", default="fwd,bwd", help="comma list of fwd, bwd")
    p.add_argument("--op", default="layer_norm", choices=["layer_norm", "rms_norm"],
                   help="the op timed (its winner is used for every op)")
    p.add_argument("--numel", type=int, default=None, help="rows*cols (default 2^27; 2^24 with --quick)")
    p.add_argument("--rows", type=int, default=None, help="fixed row count instead of numel // cols")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="per (width, dtype, direction), at most 12 (default 10; 6 --quick; 3 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per candidate, at most 20 (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the check call (default 2)")
    p.add_argument("--min-gain", type=float, default=0.02,
                   help="a candidate replaces the built-in choice only when this much faster")
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="start no new group past this many seconds (0: no limit)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the two JSON files")
    p.add_argument("--tag", default=None, help="file name part instead of the device name")
    p.add_argument("--install", action="store_true",
                   help="also write the table to the package (backends/triton_tables/<device>.json); CUDA only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="one line per group instead of per candidate")
    return p


# ----------------------------------------------------------------------------------------- helpers
def _resolve_device(name: str) -> torch.device:
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if name in ("auto", "cuda") and torch.cuda.is_available() and not interp:
        return torch.device("cuda")
    if name == "cuda":
        raise _Stop("--device cuda: no CUDA device is visible to torch"
                    + (" (or TRITON_INTERPRET=1 is set)" if interp else ""))
    if interp:
        return torch.device("cpu")
    raise _Stop("tuning the Triton launch table needs a CUDA device; on a CPU it runs only under "
                "TRITON_INTERPRET=1 (Triton's interpreter, tiny shapes, to test the tuner)")


def _write_json(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)  # a kill mid-write never leaves half a file


def _rel(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a64, b64 = a.double(), b.double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    diff = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    return float("nan") if math.isnan(diff) else diff / max(scale, 1e-30)


def _same(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(call: Callable[[], None], device: torch.device, warmup: int, iters: int) -> Tuple[float, float]:
    """(median ms, min ms) of ``iters`` calls after ``warmup`` calls; CUDA events around each call."""
    for _ in range(warmup):
        call()
    _sync(device)
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in ev:
            s.record()
            call()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in ev]
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def _short(exc: BaseException) -> str:
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _label(c) -> str:
    s = f"{c.kernel} w{c.num_warps} " + (f"rows{c.rows}" if c.kernel == "fused" else f"block{c.block}")
    return s + (f" pps{c.programs_per_sm}" if c.programs_per_sm else "")


# ------------------------------------------------------------------------------------------- tuner
class _Inputs:
    """The tensors of one (width, dtype): x, weight, bias, dy, and the built-in forward's mean/rstd."""

    def __init__(self, M: int, N: int, dtype: torch.dtype, device: torch.device, rms: bool, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape, scale=1.0, shift=0.0):
            t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
            return t.mul_(scale).add_(shift).to(dtype)

        self.M, self.N, self.rms = M, N, rms
        self.x = randn(M, N)
        self.w = randn(N, scale=0.1, shift=1.0)
        self.b = None if rms else randn(N, scale=0.1)
        self.dy = randn(M, N)
        self.mean = self.rstd = None


def _fwd_runner(tb, cfg, t: _Inputs):
    from ..backends import reference

    acc = reference.stat_dtype(t.x.dtype)
    y = torch.empty_like(t.x)
    mean = None if t.rms else torch.empty((t.M,), dtype=acc, device=t.x.device)
    rstd = torch.empty((t.M,), dtype=acc, device=t.x.device)

    def call():
        tb._launch_forward(cfg, t.x, None, t.w, t.b, y, None, mean, rstd, EPS, t.rms)

    return call, {"y": y, "mean": mean, "rstd": rstd}


def _bwd_runner(tb, cfg, t: _Inputs, sms: int):
    plan = tb._bwd_plan(cfg, t.M, t.N, sms)
    dx, dwp, dbp, c1, c2 = tb._bwd_buffers(plan, t.x, True, t.b is not None, t.rms)
    dw = torch.empty((t.N,), dtype=dwp.dtype, device=t.x.device)
    db = torch.empty_like(dw) if dbp is not None else None

    def call():
        tb._launch_backward(plan, t.dy, None, t.x, t.w, t.mean, t.rstd, t.rms, t.b is not None,
                            dx, dwp, dbp, c1, c2)
        torch.sum(dwp, dim=0, out=dw)
        if dbp is not None:
            torch.sum(dbp, dim=0, out=db)

    return call, {"dx": dx, "dweight": dw, "dbias": db}


def _check(outs: dict, ref: dict, dtype_name: str) -> Tuple[bool, Dict[str, Any], bool]:
    errs, ok = {}, True
    for k, v in outs.items():
        if ref.get(k) is None and v is None:
            continue
        tol = CHECK_TOL["partials"] if k in ("dweight", "dbias") else CHECK_TOL[dtype_name]
        if k in ("mean", "rstd"):
            tol = CHECK_TOL["float32"] if dtype_name != "float64" else CHECK_TOL["float64"]
        e = _rel(v, ref.get(k))
        errs[k] = e if math.isfinite(e) else str(e)
        ok &= math.isfinite(e) and e <= tol
    bitwise = all(_same(v, ref.get(k)) for k, v in outs.items())
    return bool(ok), errs, bitwise


def _run_candidates(tb, direction, cands, t, device, dtype_name, warmup, iters, sms, ref, log):
    """Check then time each candidate; returns (records, reference outputs)."""
    recs = []
    for c in cands:
        rec: Dict[str, Any] = {"launch": c.to_json(direction), "label": _label(c), "ok": False, "bitwise": None,
                               "err": None, "ms": None, "ms_min": None, "error": None}
        t0 = time.perf_counter()
        try:
            call, outs = (_fwd_runner(tb, c, t) if direction == "fwd" else _bwd_runner(tb, c, t, sms))
            call()  # compiles on first use
            _sync(device)
            rec["first_call_s"] = round(time.perf_counter() - t0, 3)
            if ref is None:  # the built-in choice: the reference of the group (its own buffers, which
                ref = dict(outs)  # its timed calls rewrite with the same values: deterministic kernels)
                ok, errs, bitwise = True, {}, True
            else:
                ok, errs, bitwise = _check(outs, ref, dtype_name)
            rec.update(ok=ok, err=errs, bitwise=bitwise)
            if ok:
                rec["ms"], rec["ms_min"] = _time(call, device, warmup, iters)
            del call, outs
        except Exception as exc:  # a launch the device rejects (resources), a compile error: recorded
            rec["error"] = _short(exc)
        recs.append(rec)
        log(f"    {_label(c):34s} " + (f"{rec['ms']:.4f} ms" if rec["ms"] is not None else
                                        ("REJECTED " + json.dumps(rec["err"]) if rec["error"] is None
                                         else "ERROR " + rec["error"]))
            + ("" if rec["bitwise"] in (None, True) else "  (not bitwise)"))
        if ref is None:  # the built-in choice failed: nothing to compare with
            break
    return recs, ref


def tune_group(tb, direction: str, width: int, dtype_name: str, t: _Inputs, device: torch.device,
               limit: int, warmup: int, iters: int, min_gain: float, log) -> Tuple[dict, Any]:
    """Tune one (direction, width, dtype); returns (record, winning Launch or None)."""
    import triton

    bucket = triton.next_power_of_2(width)
    sms = tb._sm_count(t.x)
    default = tb.builtin_launch(direction, bucket)
    t0 = time.perf_counter()
    if direction == "fwd":
        cands = candidates("fwd", bucket, limit)
        recs, _ = _run_candidates(tb, "fwd", cands, t, device, dtype_name, warmup, iters, sms, None, log)
    else:
        n_pps = min(3, max(1, limit // 4))
        cands = candidates("bwd", bucket, max(1, limit - n_pps))
        recs, ref = _run_candidates(tb, "bwd", cands, t, device, dtype_name, warmup, iters, sms, None, log)
        ok = [(r["ms"], c) for r, c in zip(recs, cands) if r["ms"] is not None]
        if ok and len(recs) == len(cands):
            best = min(ok, key=lambda p: p[0])[1]
            more = [c for c in pps_variants(best, min(n_pps, limit - len(cands))) if c not in cands]
            more_recs, _ = _run_candidates(tb, "bwd", more, t, device, dtype_name, warmup, iters, sms, ref, log)
            cands, recs = cands + more, recs + more_recs
    timed = [(r["ms"], i) for i, r in enumerate(recs) if r["ms"] is not None]
    winner, default_ms, best_ms = None, None, None
    if timed and recs[0]["ms"] is not None:
        default_ms = recs[0]["ms"]
        best_ms, i = min(timed)
        winner = cands[i] if best_ms < default_ms * (1 - min_gain) else default
        if winner is default:
            best_ms = default_ms
    record = {
        "direction": direction, "dtype": dtype_name, "width": width, "bucket": bucket, "rows": t.M,
        "sms": sms, "default": default.to_json(direction),
        "winner": winner.to_json(direction) if winner is not None else None,
        "default_ms": default_ms, "winner_ms": best_ms,
        "speedup": (default_ms / best_ms) if default_ms and best_ms else None,
        "seconds": round(time.perf_counter() - t0, 2), "candidates": recs,
    }
    return record, winner


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> Tuple[dict, dict, Dict[str, str]]:
    """Tune as ``args`` say; returns (timings document, table document, paths written)."""
    from ..backends import triton as tb  # imports triton (after TRITON_INTERPRET was read)
    from ._machine import describe_machine

    device = _resolve_device(args.device)
    cpu = device.type == "cpu"
    if cpu and type(tb._fwd_fused).__name__ != "InterpretedFunction":
        raise _Stop("TRITON_INTERPRET=1 was set after triton was imported, so its kernels cannot run on CPU "
                    "tensors; set it in the environment before starting python")
    dtypes = []
    for name in (s.strip() for s in args.dtype.split(",") if s.strip()):
        if name not in _DT:
            raise _Stop(f"--dtype: unknown {name!r}; expected from {sorted(_DT)}")
        if tb._dtype_name(_DT[name]) not in dtypes:
            dtypes.append(tb._dtype_name(_DT[name]))
    directions = [s.strip() for s in args.direction.split(",") if s.strip()]
    if not directions or any(d not in ("fwd", "bwd") for d in directions):
        raise _Stop(f"--direction: expected a comma list of fwd, bwd; got {args.direction!r}")
    widths = args.cols or (list(CPU_WIDTHS) if cpu else list(QUICK_WIDTHS if args.quick else WIDTHS))
    numel = args.numel or (2**24 if args.quick else NUMEL)
    fixed_rows = args.rows or (CPU_ROWS if cpu and not args.numel else None)
    limit = args.max_candidates or (3 if cpu else 6 if args.quick else 10)
    if not 1 <= limit <= 12:
        raise _Stop(f"--max-candidates: {limit} is not in [1, 12]")
    iters = args.iters or (2 if cpu else 10 if args.quick else 20)
    if not 1 <= iters <= 20:
        raise _Stop(f"--iters: {iters} is not in [1, 20]")
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 2)
    if args.install and cpu:
        raise _Stop("--install: interpreter timings mean nothing; install tables tuned on a GPU only")

    name = torch.cuda.get_device_name(device) if not cpu else "cpu (triton interpreter)"
    stem = args.tag or tb.device_table_name(name)
    os.makedirs(args.out, exist_ok=True)
    paths = {"table": os.path.join(args.out, f"triton-table-{stem}.json"),
             "timings": os.path.join(args.out, f"triton-tune-{stem}.json")}
    if args.install:
        paths["installed"] = os.path.join(tb.TABLES_DIR, tb.device_table_name(name) + ".json")
    rms = args.op == "rms_norm"
    plan = [(w, dt, d) for w in widths for dt in dtypes for d in directions]
    created = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    doc: Dict[str, Any] = {
        "schema": SCHEMA, "created": created, "device": name, "machine": describe_machine(),
        "argv": list(getattr(args, "_argv", []) or []),
        "settings": {
            "op": args.op, "widths": widths, "dtypes": dtypes, "directions": directions,
            "rows": fixed_rows, "numel": None if fixed_rows else numel, "max_candidates": limit,
            "warmup": warmup, "iters": iters,
            "min_gain": args.min_gain, "budget_s": args.budget_s, "check_tol": CHECK_TOL,
            "clock": ("torch.cuda.Event pairs around each call, outputs preallocated, no L2 flush "
                      "(tensors of rows*cols >> L2)") if not cpu else "time.perf_counter (interpreter)",
            "statistic": "median of iters",
        },
        "groups": [], "complete": False, "stopped": None, "elapsed_s": 0.0,
    }
    entries: Dict[Tuple[str, str, int], Any] = {}
    t_start = time.perf_counter()

    def table_doc() -> dict:
        info = {"device": name, "created": created,
                "tuner": {"by": "layernorm bench --tune", "op": args.op,
                          "numel": None if fixed_rows else numel, "rows": fixed_rows,
                          "groups_done": len(doc["groups"]), "groups_planned": len(plan),
                          "complete": doc["complete"], "timings_file": os.path.basename(paths["timings"])},
                "notes": "winners per (dtype, direction, width bucket); missing buckets: the built-in rule"}
        return tb.LaunchTable(entries, source=paths["table"], info=info).to_dict()

    def save() -> None:
        doc["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        _write_json(paths["timings"], doc)
        td = table_doc()
        tb.table_from_dict(td, source=paths["table"])  # what we write must load
        _write_json(paths["table"], td)
        if args.install:
            os.makedirs(tb.TABLES_DIR, exist_ok=True)
            _write_json(paths["installed"], td)

    log(f"tuning the triton launch table on {name}: {len(plan)} groups (widths {widths}, {dtypes}, "
        f"{directions}), <= {limit} candidates x {iters} iterations, op {args.op}, budget {args.budget_s:.0f} s")
    last_group_s = 0.0
    inputs: Optional[_Inputs] = None
    key = None
    try:
        for i, (width, dt, direction) in enumerate(plan):
            spent = time.perf_counter() - t_start
            if args.budget_s and spent + last_group_s > args.budget_s:
                doc["stopped"] = (f"budget: {spent:.0f} s spent + {last_group_s:.0f} s for a group > "
                                  f"--budget-s {args.budget_s:.0f}; {len(plan) - i} groups not run")
                log(f"stopping: {doc['stopped']}")
                break
            g0 = time.perf_counter()
            rows = fixed_rows or max(1, numel // width)
            if key != (width, dt):
                inputs = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                inputs = _Inputs(rows, width, _DT[dt], device, rms, args.seed)
                with tb.use_table(tb.BUILTIN):  # statistics for the backward from the built-in forward
                    _, _, inputs.mean, inputs.rstd = tb.forward(inputs.x, None, inputs.w, inputs.b, EPS, rms)
                key = (width, dt)
            log(f"[{i + 1}/{len(plan)}] {dt} {direction} {rows}x{width} "
                f"({time.perf_counter() - t_start:.0f} s)" + ("" if not args.quiet else " ..."))
            quiet_log = (lambda s: None) if args.quiet else log
            rec, winner = tune_group(tb, direction, width, dt, inputs, device, limit, warmup, iters,
                                     args.min_gain, quiet_log)
            doc["groups"].append(rec)
            if winner is not None:
                entries[(direction, dt, rec["bucket"])] = winner
                sp = rec["speedup"]
                log(f"  -> {_label(winner)}: {rec['winner_ms']:.4f} ms vs built-in {rec['default_ms']:.4f} ms "
                    f"({sp:.2f}x) [{rec['seconds']:.1f} s]")
            else:
                log(f"  -> no timing of the built-in choice; bucket left to the built-in rule [{rec['seconds']:.1f} s]")
            last_group_s = time.perf_counter() - g0
            save()
        else:
            doc["complete"] = True
    except KeyboardInterrupt:
        doc["stopped"] = "interrupted (SIGINT/SIGTERM)"
        log("interrupted: saving the groups finished so far")
    finally:
        del inputs
    save()
    log(f"wrote {paths['table']} and {paths['timings']}" + (f"; installed {paths['installed']}"
                                                            if args.install else "")
        + f" ({doc['elapsed_s']:.0f} s, {len(doc['groups'])}/{len(plan)} groups)")
    return doc, table_doc(), paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``layernorm bench --tune`` (``argv`` without ``--tune``)."""
    argv = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--tune"]
    args = build_parser().parse_args(argv)
    args._argv = argv
    from .norm import _sigterm_as_interrupt

    _sigterm_as_interrupt()  # a `timeout` SIGTERM still saves the finished groups

    def log(s: str) -> None:
        print(s, flush=True)

    try:
        doc, _, _ = run(args, log=log)
    except _Stop as exc:
        print(f"layernorm bench --tune: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if doc["complete"] or doc["stopped"] and doc["stopped"].startswith("budget") else 130


if __name__ == "__main__":
    raise SystemExit(main())
