"""``layernorm bench --rnn``: the layer-normalized LSTM/GRU against ``nn.LSTM``/``nn.GRU``, side by side.

Three cases, each timed with the providers of a shape interleaved call by call in one process (so a
drifting load hits them alike); ``ratio`` is a provider's median over ``nn.LSTM``/``nn.GRU``'s median
in the same shape, the speed to aim at (not the same maths: no normalization).

``layers`` (``results``)
    One layer, T = 100, batch B in {1, 32, 128}, input = hidden = H in {256, 512}, float32: forward
    under ``no_grad`` (inference) and forward+backward (loss = output.sum()). Providers:
    ``layernorm`` (:class:`layernorm.LayerNormLSTM` / ``LayerNormGRU``, default backend),
    ``layernorm-torch-ops`` (``backend="torch"``, opt-in), ``reference`` (``backend="reference"``:
    the Python loop with autograd), ``naive`` (``nn.Linear`` + ``nn.LayerNorm`` called step by step,
    :class:`NaiveLNLSTM`) and ``torch``. Memory: CUDA peak allocated during forward+backward; CPU
    bytes autograd saves for backward in one forward (distinct storages, no parameters).
``charlm``
    A whole character-level language-model training step, B = 32, T = 100: embedding (vocabulary
    128, width 64) -> 1-layer LSTM, H = 512 -> linear -> cross-entropy -> Adam step, with
    ``LayerNormLSTM`` (``layernorm``) or ``nn.LSTM`` (``torch``) as the LSTM.
``long``
    One long sequence, T = 5000, B = 1, H = 256: inference and forward+backward time, and the
    training memory, ``layernorm`` against ``torch``.

``--processes N`` runs the cases in N fresh processes one after the other and reports each one's
numbers and, per shape, the median and the range of the ratio across them: on a shared VM
``nn.LSTM`` itself runs in a fast or a slow mode from process to process (docs/rnn_fast.md).

``--quick`` (T = 25, H = 64, B in {1, 16}, few repeats, only ``layers``) writes
``rnn-<device>-quick.json`` so it never overwrites a full run's ``rnn-<device>.json``. Uses only
the package's public names.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ._malloc import malloc_state, maybe_reexec
from ._machine import describe_machine
from ._timing import gc_paused, rotating_rounds

__all__ = ["main", "NaiveLNLSTM", "NaiveLNGRU", "saved_tensor_bytes"]

PROVIDERS = ("layernorm", "layernorm-torch-ops", "reference", "naive", "torch")
DEFAULT_PROVIDERS = ("layernorm", "reference", "naive", "torch")
GPU_CASE_PROVIDERS = ("layernorm", "layernorm-torch-ops", "torch")
CASES = ("layers", "charlm", "long")


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
    from layernorm import LayerNormGRU, LayerNormLSTM

    f = {"device": device, "dtype": torch.float32}
    if provider == "torch":
        return (nn.LSTM if mode == "LSTM" else nn.GRU)(H, H, **f)
    if provider == "naive":
        return (NaiveLNLSTM if mode == "LSTM" else NaiveLNGRU)(H, H, **f)
    backend = {"reference": "reference", "layernorm-torch-ops": "torch"}.get(provider)
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


# ---------------------------------------------------------------- timing


def _interleaved(fns: Dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 2,
                 budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """ms of each call: one call of every provider per round, the order rotating; gc off while timing.

    ``reps`` rounds, fewer when ``budget_s`` (per provider) runs out first (at least 5)."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with gc_paused():
        slowest = 0.0
        for fn in fns.values():
            sync()
            t0 = time.perf_counter()
            for _ in range(warmup):
                fn()
            sync()
            slowest = max(slowest, (time.perf_counter() - t0) / max(warmup, 1))
        if budget_s is not None and slowest > 0:
            reps = int(min(reps, max(5, budget_s / slowest)))
        return rotating_rounds(fns, reps, sync)


def _summary(ms: List[float]) -> dict:
    """median, min and the 10th/90th percentiles (the spread) of a list of ms."""
    s = sorted(ms)
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
    return {"median_ms": statistics.median(s), "min_ms": s[0], "p10_ms": q(0.1), "p90_ms": q(0.9), "reps": len(s)}


# ---------------------------------------------------------------- the cases


def _layer_shape(mode, providers, H, B, T, device, reps, budget_s) -> List[dict]:
    fwd, fwd_bwd, rows = {}, {}, {}
    for provider in providers:
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

        fwd[provider], fwd_bwd[provider] = f, fb
        row = {"mode": mode, "provider": provider, "H": H, "B": B, "T": T}
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
    for key, fns in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for provider, ms in _interleaved(fns, device, reps, budget_s=budget_s).items():
            for k, v in _summary(ms).items():
                rows[provider][f"{key}_{k}"] = v
    return [rows[p] for p in providers]


class _CharLM(nn.Module):
    def __init__(self, rnn: nn.Module, vocab: int, emb: int, hidden: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = rnn
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.emb(tokens))[0])


def _charlm(device, reps, budget_s, B=32, T=100, vocab=128, emb=64, H=512) -> List[dict]:
    """Whole training steps of the same char-LM with LayerNormLSTM and with nn.LSTM as its LSTM."""
    from layernorm import LayerNormLSTM

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    steps, rows = {}, {}
    for provider, cls in (("layernorm", LayerNormLSTM), ("torch", nn.LSTM)):
        torch.manual_seed(0)
        model = _CharLM(cls(emb, H, batch_first=True, device=device), vocab, emb, H).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
            loss.backward()
            opt.step()

        steps[provider] = step
        rows[provider] = {"case": "charlm", "provider": provider, "B": B, "T": T, "vocab": vocab, "embedding": emb,
                          "H": H, "optimizer": "Adam"}
    for provider, ms in _interleaved(steps, device, reps, budget_s=budget_s).items():
        rows[provider].update({f"step_{k}": v for k, v in _summary(ms).items()})
    return list(rows.values())


def _long(device, reps, budget_s, T=5000, B=1, H=256) -> List[dict]:
    """One long sequence: inference and training time, training memory."""
    from layernorm import LayerNormLSTM

    rows, fwd, fwd_bwd = {}, {}, {}
    for provider, cls in (("layernorm", LayerNormLSTM), ("torch", nn.LSTM)):
        torch.manual_seed(0)
        model = cls(H, H, device=device)
        x = torch.randn(T, B, H, device=device)
        xg = x.clone().requires_grad_(True)

        def f(model=model, x=x):
            with torch.no_grad():
                return model(x)

        def fb(model=model, xg=xg):
            model(xg)[0].sum().backward()
            model.zero_grad(set_to_none=True)
            xg.grad = None

        fwd[provider], fwd_bwd[provider] = f, fb
        rows[provider] = {"case": "long", "provider": provider, "T": T, "B": B, "H": H,
                          "memory_bytes": saved_tensor_bytes(lambda: model(xg)[0], exclude=list(model.parameters())),
                          "memory_kind": "bytes saved for backward by one forward (distinct storages, no parameters)"}
    for key, fns in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for provider, ms in _interleaved(fns, device, reps, budget_s=budget_s).items():
            rows[provider].update({f"{key}_{k}": v for k, v in _summary(ms).items()})
    return list(rows.values())


def _add_ratios(rows: List[dict], keys: Sequence[str], group: Sequence[str]) -> None:
    base = {tuple(r.get(g) for g in group): r for r in rows if r["provider"] == "torch"}
    for r in rows:
        b = base.get(tuple(r.get(g) for g in group))
        for k in keys:
            ok = b is not None and b.get(f"{k}_median_ms", 0) > 0
            r[f"{k}_ratio"] = r[f"{k}_median_ms"] / b[f"{k}_median_ms"] if ok else None


# ---------------------------------------------------------------- output


def _print_tables(doc: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is a dependency, but keep the numbers visible without it
        print(json.dumps(doc, indent=1))
        return
    console = Console()
    console.width = max(console.width, 120)
    ratio = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    spread = lambda r, k: f"{r[k + '_median_ms']:.2f} [{r[k + '_p10_ms']:.2f}, {r[k + '_p90_ms']:.2f}]"  # noqa: E731
    if doc.get("results"):
        t = Table(title=f"one layer, T={doc['T']}, float32: median ms [p10, p90]; x torch = ratio of medians")
        for col in ("cell", "H", "B", "provider", "fwd ms", "x torch", "fwd+bwd ms", "x torch", "memory MiB"):
            t.add_column(col, justify="left" if col in ("cell", "provider") else "right")
        for r in doc["results"]:
            t.add_row(r["mode"], str(r["H"]), str(r["B"]), r["provider"], spread(r, "fwd"), ratio(r["fwd_ratio"]),
                      spread(r, "fwd_bwd"), ratio(r["fwd_bwd_ratio"]), f"{r['memory_bytes'] / 2**20:.1f}")
        console.print(t)
    if doc.get("charlm"):
        t = Table(title="char-LM training step (embedding 64 -> LSTM H=512 -> linear -> cross-entropy -> Adam), B=32, T=100")
        for col in ("provider", "step ms", "x torch"):
            t.add_column(col)
        for r in doc["charlm"]:
            t.add_row(r["provider"], spread(r, "step"), ratio(r["step_ratio"]))
        console.print(t)
    if doc.get("long"):
        t = Table(title="one long sequence: T=5000, B=1, H=256")
        for col in ("provider", "fwd ms", "x torch", "fwd+bwd ms", "x torch", "memory MiB"):
            t.add_column(col)
        for r in doc["long"]:
            t.add_row(r["provider"], spread(r, "fwd"), ratio(r["fwd_ratio"]), spread(r, "fwd_bwd"),
                      ratio(r["fwd_bwd_ratio"]), f"{r['memory_bytes'] / 2**20:.1f}")
        console.print(t)


def _print_spread(spread: dict, n: int) -> None:
    """One line per shape and provider: the ratio to torch in each process, their median and range."""
    print(f"ratio to torch across {n} processes: median [min, max] (each process)")
    for section, rows in spread.items():
        for r in rows:
            shape = " ".join(f"{g}={r[g]}" for g in ("mode", "H", "B") if g in r)
            for k in ("fwd", "fwd_bwd", "step"):
                if f"{k}_ratio_median" in r:
                    each = ", ".join(f"{v:.2f}" for v in r[f"{k}_ratios"] if v is not None)
                    print(f"  {section:8s} {shape:18s} {r['provider']:20s} {k:8s} {r[f'{k}_ratio_median']:.3f} "
                          f"[{r[f'{k}_ratio_min']:.3f}, {r[f'{k}_ratio_max']:.3f}]  ({each})")


def _across_processes(runs: List[dict]) -> dict:
    """Per shape and provider: every process's ratio, their median, min and max."""
    out: Dict[str, list] = {}
    for section, keys, group in (("results", ("fwd", "fwd_bwd"), ("mode", "H", "B")),
                                 ("charlm", ("step",), ()), ("long", ("fwd", "fwd_bwd"), ())):
        table: Dict[tuple, dict] = {}
        for run in runs:
            for r in run.get(section) or []:
                if r["provider"] == "torch":
                    continue
                key = tuple(r.get(g) for g in group) + (r["provider"],)
                entry = table.setdefault(key, {**{g: r.get(g) for g in group}, "provider": r["provider"]})
                for k in keys:
                    entry.setdefault(f"{k}_ratios", []).append(r.get(f"{k}_ratio"))
                    entry.setdefault(f"{k}_ms", []).append(r.get(f"{k}_median_ms"))
        for entry in table.values():
            for k in keys:
                vals = [v for v in entry[f"{k}_ratios"] if v is not None]
                if vals:
                    entry[f"{k}_ratio_median"] = statistics.median(vals)
                    entry[f"{k}_ratio_min"], entry[f"{k}_ratio_max"] = min(vals), max(vals)
        out[section] = list(table.values())
    return out


def _run_cases(args, device: torch.device) -> dict:
    providers = [s.strip() for s in (args.providers or ",".join(
        GPU_CASE_PROVIDERS if args.gpu_case else DEFAULT_PROVIDERS)).split(",") if s.strip()]
    modes = [s.strip().upper() for s in args.modes.split(",") if s.strip()]
    cases = [s.strip() for s in (args.cases or ("layers" if args.quick or args.gpu_case else ",".join(CASES))).split(",")
             if s.strip()]
    T = 100
    if args.quick:
        T, sizes, batches, reps, budget = 25, [64], [1, 16], 10, 0.05
    elif args.gpu_case:
        T, sizes, batches, reps, budget = 256, [512], [64], 30, 1.0
    else:
        sizes, batches, reps, budget = [256, 512], [1, 32, 128], 30, 1.5
    if args.sizes:
        sizes = [int(v) for v in args.sizes.split(",")]
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.reps:
        reps = args.reps
    doc: dict = {"T": T, "cases": cases, "providers": providers, "modes": modes}
    t0 = time.perf_counter()
    if "layers" in cases:
        rows: List[dict] = []
        for mode in modes:
            for H in sizes:
                for B in batches:
                    rows.extend(_layer_shape(mode, providers, H, B, T, device, reps, budget))
        _add_ratios(rows, ("fwd", "fwd_bwd"), ("mode", "H", "B"))
        doc["results"] = rows
    if "charlm" in cases:
        doc["charlm"] = _charlm(device, reps, budget * 2)
        _add_ratios(doc["charlm"], ("step",), ())
    if "long" in cases:
        doc["long"] = _long(device, max(5, reps // 3), budget * 4)
        _add_ratios(doc["long"], ("fwd", "fwd_bwd"), ())
    doc["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return doc


def main(argv: Optional[Sequence[str]] = None, *, allow_reexec: bool = False) -> int:
    """Run the benchmark; ``argv`` None means ``sys.argv[1:]``. Returns the exit status.

    ``allow_reexec`` (only from the real command line): on CPU, re-execute once with glibc's malloc
    thresholds set (:mod:`layernorm.bench._malloc`), so that no provider's time includes fresh pages."""
    p = argparse.ArgumentParser(prog="layernorm bench --rnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats, layers only (< 30 s on CPU)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON result")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cases", default=None, help=f"comma list from {list(CASES)} (default: all; --quick: layers)")
    p.add_argument("--providers", default=None,
                   help=f"layers case: comma list from {list(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})")
    p.add_argument("--gpu-case", action="store_true",
                   help="only T=256, B=64, I=H=512 (default providers: " + ",".join(GPU_CASE_PROVIDERS) + ")")
    p.add_argument("--modes", default="LSTM,GRU", help="layers case: comma list from LSTM,GRU")
    p.add_argument("--sizes", default=None, help="layers case: comma list of H (= input size)")
    p.add_argument("--batches", default=None, help="layers case: comma list of batch sizes")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per shape (default 30; fewer if slow)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the cases in N fresh processes and report the spread across them")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    p.add_argument("--no-reexec", action="store_true",
                   help="CPU: do not re-execute with glibc malloc thresholds set (see layernorm.bench._malloc)")
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # a --processes child writes here
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
    bad = [x for x in (args.providers or "").split(",") if x and x not in PROVIDERS]
    bad += [m for m in args.modes.upper().split(",") if m and m not in ("LSTM", "GRU")]
    bad += [c for c in (args.cases or "").split(",") if c and c not in CASES]
    if bad:
        p.error(f"unknown providers/modes/cases {bad}; providers: {list(PROVIDERS)}, modes: LSTM, GRU, "
                f"cases: {list(CASES)}")
    try:
        [int(v) for v in (args.sizes or "0").split(",") + (args.batches or "0").split(",")]
    except ValueError:
        p.error(f"--sizes/--batches must be comma lists of ints, got {args.sizes!r} / {args.batches!r}")

    if args.child_json:
        doc = _run_cases(args, device)
        with open(args.child_json, "w") as f:
            json.dump(doc, f)
        return 0

    from layernorm import rnn

    backend = rnn.resolved_backend(None, device, torch.float32)
    runs = []
    if args.processes > 1:
        child, skip = [], False
        for a in argv:  # the children run the same cases, one process each
            if skip:
                skip = False
            elif a == "--processes":
                skip = True
            elif not a.startswith("--processes="):
                child.append(a)
        for k in range(args.processes):
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "run.json")
                cmd = [sys.executable, "-m", "layernorm.cli", "bench", "--rnn", *child, "--no-reexec",
                       "--child-json", path]
                subprocess.run(cmd, check=True)
                with open(path) as f:
                    runs.append(json.load(f))
            print(f"process {k + 1}/{args.processes} done", flush=True)
        doc = dict(runs[-1])
        doc["per_process"] = runs
        doc["across_processes"] = _across_processes(runs)
    else:
        doc = _run_cases(args, device)
    _print_tables(doc)
    if args.processes > 1:
        _print_spread(doc["across_processes"], args.processes)

    custom = (bool(args.sizes or args.batches or args.cases or args.reps) or args.modes.upper() != "LSTM,GRU"
              or (args.providers is not None and not args.gpu_case))
    result = {
        "benchmark": "rnn",
        "quick": bool(args.quick),
        "gpu_case": bool(args.gpu_case),
        "custom_selection": custom,
        "argv": argv,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "machine": describe_machine(),
        "timing": {"clock": "time.perf_counter per call" + (" after torch.cuda.synchronize" if device.type == "cuda"
                                                           else "; gc disabled while timing"),
                   "order": "providers of a shape interleaved call by call, rotating",
                   "statistic": "median of the calls; p10/p90 and min recorded; ratio = median / torch's median"},
        "recurrence_impl": backend,
        "recurrence_gemm": rnn.native_gemm_library() if backend == "cpp" else None,
        "malloc": malloc_state(device),
        "dtype": "float32",
        "processes": args.processes,
        **doc,
    }
    os.makedirs(args.out, exist_ok=True)
    kind = "-quick" if args.quick else "-gpu-case" if args.gpu_case else ""
    name = f"rnn-{device.type}{kind}{'-custom' if custom else ''}.json"
    path = os.path.join(args.out, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
