"""``layernorm bench --rnn``: layer-normalized LSTM/GRU against nn.LSTM/nn.GRU and a naive loop.

Providers, per cell type (LSTM, GRU):

- ``layernorm``: :class:`~layernorm.nn.LayerNormLSTM` / ``LayerNormGRU`` with the default backend
  (the fast recurrence when ``layernorm.nn.rnn_fast`` imports, else the reference; its implementation,
  e.g. ``triton`` on CUDA, is recorded as ``recurrence_impl`` in the JSON);
- ``layernorm-torch-ops`` (opt-in): the same with ``LAYERNORM_RNN_IMPL=torch``, the per-step torch-ops
  recurrence (about 15 launches per step on CUDA): the "before" of the fused Triton kernel;
- ``reference``: the same modules with ``backend="reference"`` (Python loop, autograd backward);
- ``naive``: what one writes by hand: ``nn.Linear`` + ``nn.LayerNorm`` called step by step
  (:class:`NaiveLNLSTM`, :class:`NaiveLNGRU` below), the input projection inside the loop;
- ``torch``: ``nn.LSTM`` / ``nn.GRU`` (no normalization: the speed to aim at, not the same maths).

Shapes: T = 100 time steps, batch B in {1, 32, 128}, input = hidden = H in {256, 512}, float32.
``--gpu-case``: the one GPU shape of the fused-kernel issue, T = 256, B = 64, I = H = 512, with the
providers ``layernorm``, ``layernorm-torch-ops`` and ``torch`` (cuDNN) unless ``--providers`` is given.
Measured: forward (no grad) and forward+backward (loss = output.sum()), median ms (min kept as
``*_min_ms``), the providers of a shape interleaved call by call so drifting load on a shared machine
hits them alike; ``ratio`` is the time over the ``torch`` provider's in the same shape. Memory: on
CUDA the peak allocated during forward+backward above what was allocated before; on CPU (where allocator statistics are not
available) the bytes of the tensors autograd saves for backward in one forward, counted once per
storage and without parameters: the "training memory" of the layer. Tensors a custom autograd
function keeps outside ``save_for_backward`` are not seen by that count.

``--quick`` uses T = 25, H = 64, B in {1, 16} and few repeats (under 30 s on 2 idle cores) and writes
``rnn-<device>-quick.json`` so it never overwrites a full run's ``rnn-<device>.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._malloc import malloc_state, maybe_reexec
from ._machine import describe_machine
from ._timing import TimerConfig, time_interleaved, timing_method

__all__ = ["main", "NaiveLNLSTM", "NaiveLNGRU", "saved_tensor_bytes"]

PROVIDERS = ("layernorm", "layernorm-torch-ops", "reference", "naive", "torch")
DEFAULT_PROVIDERS = ("layernorm", "reference", "naive", "torch")
GPU_CASE_PROVIDERS = ("layernorm", "layernorm-torch-ops", "torch")
_IMPL_ENV = "LAYERNORM_RNN_IMPL"


class NaiveLNLSTM(nn.Module):
    """The hand-written LN-LSTM: ``nn.Linear`` and ``nn.LayerNorm`` modules called at every step."""

    def __init__(self, input_size: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        G = 4 * hidden_size
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, G, bias=False, **f)
        self.hh = nn.Linear(hidden_size, G, bias=True, **f)
        self.ln_ih = nn.LayerNorm(G, bias=False, **f)
        self.ln_hh = nn.LayerNorm(G, bias=False, **f)
        self.ln_cell = nn.LayerNorm(hidden_size, **f)

    def forward(self, x: Tensor):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.hidden_size)
        c = x.new_zeros(B, self.hidden_size)
        outs = []
        for t in range(T):
            gates = self.ln_ih(self.ih(x[t])) + self.ln_hh(self.hh(h))
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_cell(c))
            outs.append(h)
        return torch.stack(outs), (h, c)


class NaiveLNGRU(nn.Module):
    """The hand-written LN-GRU (LN over the r/u block and over the candidate block), step by step."""

    def __init__(self, input_size: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        H = hidden_size
        self.hidden_size = H
        self.ih_ru = nn.Linear(input_size, 2 * H, **f)
        self.ih_n = nn.Linear(input_size, H, **f)
        self.hh_ru = nn.Linear(H, 2 * H, bias=False, **f)
        self.hh_n = nn.Linear(H, H, bias=False, **f)
        self.ln = nn.ModuleList([nn.LayerNorm(s, bias=False, **f) for s in (2 * H, 2 * H, H, H)])

    def forward(self, x: Tensor):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.hidden_size)
        outs = []
        for t in range(T):
            r, u = torch.sigmoid(self.ln[0](self.ih_ru(x[t])) + self.ln[1](self.hh_ru(h))).chunk(2, 1)
            n = torch.tanh(self.ln[2](self.ih_n(x[t])) + r * self.ln[3](self.hh_n(h)))
            h = u * h + (1 - u) * n
            outs.append(h)
        return torch.stack(outs), h


def _build(mode: str, provider: str, H: int, device: torch.device) -> nn.Module:
    from layernorm.nn import LayerNormGRU, LayerNormLSTM

    f = {"device": device, "dtype": torch.float32}
    if provider == "torch":
        return (nn.LSTM if mode == "LSTM" else nn.GRU)(H, H, **f)
    if provider == "naive":
        return (NaiveLNLSTM if mode == "LSTM" else NaiveLNGRU)(H, H, **f)
    backend = "reference" if provider == "reference" else None
    return (LayerNormLSTM if mode == "LSTM" else LayerNormGRU)(H, H, backend=backend, **f)


def saved_tensor_bytes(fn: Callable[[], object], exclude: Sequence[Tensor] = ()) -> int:
    """Bytes autograd saves for backward while running ``fn()``: distinct storages, ``exclude`` not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(t: Tensor):
        try:
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in skip and ptr != 0:
                seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse, functorch)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@contextlib.contextmanager
def _impl_env(provider: str):
    """``layernorm-torch-ops``: LAYERNORM_RNN_IMPL=torch while it is measured, restored afterwards."""
    if provider != "layernorm-torch-ops":
        yield
        return
    old = os.environ.get(_IMPL_ENV)
    os.environ[_IMPL_ENV] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ[_IMPL_ENV]
        else:
            os.environ[_IMPL_ENV] = old


def _recurrence_impl(device: torch.device) -> str:
    """Name of the implementation the ``layernorm`` provider's recurrence runs for float32 on ``device``."""
    from layernorm.nn import rnn_fast

    impl = rnn_fast._pick_impl(None, torch.empty(0, device=device))
    return {"_TorchImpl": "torch", "_TritonImpl": "triton"}.get(getattr(impl, "__name__", ""), "cpp")


def _recurrence_gemm(impl: Optional[str]) -> Optional[str]:
    """GEMM library of the C++ recurrence for float32 ("onednn" or "mkl"); None for other implementations."""
    if impl != "cpp":
        return None
    from layernorm.nn import rnn_fast

    return rnn_fast._load_ext().gemm_library()


def _with_env(provider: str, fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with _impl_env(provider):
            return fn()
    return call


def _measure_shape(mode: str, providers: Sequence[str], H: int, B: int, T: int, device: torch.device,
                   cfg: TimerConfig) -> List[dict]:
    """One row per provider for one shape. The providers' calls are interleaved (see
    :func:`time_interleaved`), forward first, then forward+backward."""
    fwd, fwd_bwd, rows = {}, {}, {}
    for provider in providers:
        with _impl_env(provider):
            torch.manual_seed(0)
            model = _build(mode, provider, H, device)
        x = torch.randn(T, B, H, device=device)
        xg = x.clone().requires_grad_(True)
        params = list(model.parameters())

        def f(model=model, x=x):
            with torch.no_grad():
                return model(x)

        def fb(model=model, xg=xg):
            out = model(xg)[0]
            out.sum().backward()
            model.zero_grad(set_to_none=True)
            xg.grad = None

        fwd[provider], fwd_bwd[provider] = _with_env(provider, f), _with_env(provider, fb)
        row = {"mode": mode, "provider": provider, "H": H, "B": B, "T": T}
        with _impl_env(provider):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                fb()
                torch.cuda.synchronize(device)
                row["memory_bytes"] = torch.cuda.max_memory_allocated(device) - base
                row["memory_kind"] = "cuda peak allocated during fwd+bwd above baseline"
            else:
                row["memory_bytes"] = saved_tensor_bytes(lambda: model(xg)[0], exclude=params)
                row["memory_kind"] = "bytes saved for backward by one forward (distinct storages, no parameters)"
        rows[provider] = row
    for key, fns in (("fwd_ms", fwd), ("fwd_bwd_ms", fwd_bwd)):
        for provider, timing in time_interleaved(fns, device, cfg).items():
            rows[provider][key] = timing.median_ms
            rows[provider][key.replace("_ms", "_min_ms")] = timing.min_ms
    return [rows[p] for p in providers]


def _add_ratios(rows: List[dict]) -> None:
    base = {(r["mode"], r["H"], r["B"]): r for r in rows if r["provider"] == "torch"}
    for r in rows:
        b = base.get((r["mode"], r["H"], r["B"]))
        for k in ("fwd", "fwd_bwd"):
            r[f"{k}_ratio"] = (r[f"{k}_ms"] / b[f"{k}_ms"]) if b and b[f"{k}_ms"] > 0 else None


def _print_table(rows: List[dict], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but keep the numbers visible without it
        for r in rows:
            print(r)
        return
    table = Table(title=title)
    for col in ("cell", "H", "B", "provider", "fwd ms", "x torch", "fwd+bwd ms", "x torch", "memory MiB"):
        table.add_column(col, justify="left" if col in ("cell", "provider") else "right")
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in rows:
        table.add_row(
            r["mode"], str(r["H"]), str(r["B"]), r["provider"], f"{r['fwd_ms']:.2f}", ratio(r["fwd_ratio"]),
            f"{r['fwd_bwd_ms']:.2f}", ratio(r["fwd_bwd_ratio"]), f"{r['memory_bytes'] / 2**20:.1f}",
        )
    console = Console()
    console.width = max(console.width, 110)  # keep provider names whole in narrow terminals
    console.print(table)


def main(argv: Optional[Sequence[str]] = None, *, allow_reexec: bool = False) -> int:
    """Run the benchmark; ``argv`` None means ``sys.argv[1:]``. Returns the exit status.

    ``allow_reexec`` (only from the real command line): on CPU, re-execute once with glibc's malloc
    thresholds set (:mod:`layernorm.bench._malloc`), so that no provider's time includes fresh pages."""
    p = argparse.ArgumentParser(prog="layernorm bench --rnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (< 30 s on CPU)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON result")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--providers", default=None,
                   help=f"comma list from {list(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--gpu-case", action="store_true",
                   help="only T=256, B=64, I=H=512 (default providers: " + ",".join(GPU_CASE_PROVIDERS) + ")")
    p.add_argument("--modes", default="LSTM,GRU", help="comma list from LSTM,GRU")
    p.add_argument("--sizes", default=None, help="comma list of H (= input size) to run instead of the default")
    p.add_argument("--batches", default=None, help="comma list of batch sizes to run instead of the default")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) first (1 gives stabler numbers on a shared machine)")
    p.add_argument("--no-reexec", action="store_true",
                   help="CPU: do not re-execute with glibc malloc thresholds set (see layernorm.bench._malloc)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if allow_reexec:
        maybe_reexec(["bench", "--rnn", *argv], args.device, args.no_reexec)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available")
    if args.quick and args.gpu_case:
        p.error("--quick and --gpu-case exclude each other")
    default_providers = GPU_CASE_PROVIDERS if args.gpu_case else DEFAULT_PROVIDERS
    providers = [s.strip() for s in (args.providers or ",".join(default_providers)).split(",") if s.strip()]
    modes = [s.strip().upper() for s in args.modes.split(",") if s.strip()]
    bad = [x for x in providers if x not in PROVIDERS] + [m for m in modes if m not in ("LSTM", "GRU")]
    if bad:
        p.error(f"unknown providers/modes {bad}; providers: {list(PROVIDERS)}, modes: LSTM, GRU")
    T = 100
    if args.quick:
        T, sizes, batches = 25, [64], [1, 16]
        cfg = TimerConfig(warmup=1, min_reps=3, max_reps=10, budget_s=0.05)
    elif args.gpu_case:
        T, sizes, batches = 256, [512], [64]
        cfg = TimerConfig(warmup=2, min_reps=5, max_reps=30, budget_s=1.0)
    else:
        sizes, batches = [256, 512], [1, 32, 128]
        cfg = TimerConfig(warmup=2, min_reps=5, max_reps=30, budget_s=1.0)
    try:
        if args.sizes:
            sizes = [int(v) for v in args.sizes.split(",")]
        if args.batches:
            batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        p.error(f"--sizes/--batches must be comma lists of ints, got {args.sizes!r} / {args.batches!r}")

    from layernorm.nn.rnn import recurrence_backend

    fast_module = recurrence_backend(None).__name__
    fast_impl = _recurrence_impl(device) if fast_module.endswith("rnn_fast") else None
    t0 = time.perf_counter()
    rows: List[dict] = []
    for mode in modes:
        for H in sizes:
            for B in batches:
                rows.extend(_measure_shape(mode, providers, H, B, T, device, cfg))
    _add_ratios(rows)
    elapsed = time.perf_counter() - t0
    _print_table(rows, f"LN-RNN benchmark, {device.type}, T={T}, float32 ({elapsed:.1f} s); x torch = time / nn.{modes[0] if len(modes) == 1 else 'LSTM|GRU'}'s")

    custom = bool(args.sizes or args.batches) or providers != list(default_providers) or modes != ["LSTM", "GRU"]
    result = {
        "benchmark": "rnn",
        "quick": bool(args.quick),
        "gpu_case": bool(args.gpu_case),
        "custom_selection": custom,
        "device": device.type,
        "machine": describe_machine(),
        "timing": {**timing_method(device, cfg),
                   "order": "providers of a shape interleaved call by call, rotating (bench._timing.time_interleaved)",
                   "clock": "time.perf_counter per call" + (" after torch.cuda.synchronize" if device.type == "cuda" else "")},
        "recurrence_module": fast_module,
        "recurrence_impl": fast_impl,
        "recurrence_gemm": _recurrence_gemm(fast_impl),
        "malloc": malloc_state(device),
        "dtype": "float32",
        "T": T,
        "elapsed_s": round(elapsed, 2),
        "results": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    # quick, GPU-case and custom runs get their own file so they never overwrite a full run's rnn-<device>.json
    kind = "-quick" if args.quick else "-gpu-case" if args.gpu_case else ""
    name = f"rnn-{device.type}{kind}{'-custom' if custom else ''}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
