"""Small tensors and whole models: what a call costs where per-call overhead dominates.

Two measurements, each ours against torch side by side, interleaved call for call:

``calls``
    One LayerNorm / RMSNorm of (rows, 768) fp32, rows 1, 8 and 128: the functional
    (``layernorm.layer_norm`` vs ``torch.nn.functional.layer_norm``) and the module
    (``layernorm.LayerNorm`` vs ``torch.nn.LayerNorm``), forward under ``no_grad`` with the default
    threads, and forward+backward with one thread.
``model``
    A GPT-2-small-shaped pre-norm decoder stack (d = 768, 12 heads, MLP 3072, causal attention,
    final LayerNorm), inference under ``no_grad``, batch 1, 1 and 64 tokens: the model as built
    (torch's ``nn.LayerNorm``) against a copy after :func:`layernorm.patch`.

Timing: a sample is ``inner`` consecutive calls timed together (``inner`` chosen so a sample takes
about a millisecond: a single 2-microsecond call is below the timer's resolution); providers take
turns sample by sample in rotating order, so load drifts hit both; the result is the median per
call, with the interquartile spread of the samples.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["run_calls", "run_model", "run_startup", "GPTStack"]

WIDTH = 768


def _interleaved_per_call(fns: Dict[str, Callable[[], object]], samples: int, target_s: float = 1e-3) -> Dict[str, dict]:
    """Median seconds per call of each fn, sampled in turns (see the module docstring)."""
    names = list(fns)
    inner = {}
    for k in names:
        fns[k]()  # warm-up: first-call costs (allocator, caches) stay out of the samples
        n, elapsed = 1, 0.0
        while elapsed < target_s / 4 and n < 1 << 16:
            t0 = time.perf_counter()
            for _ in range(n):
                fns[k]()
            elapsed = time.perf_counter() - t0
            n *= 2
        inner[k] = max(1, int(n / 2 * target_s / max(elapsed, 1e-9)))
    inner_all = max(1, min(inner.values()))  # the same number of calls per sample for every provider
    times: Dict[str, List[float]] = {k: [] for k in names}
    gc_was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(samples):
            for j in range(len(names)):
                k = names[(r + j) % len(names)]
                f = fns[k]
                t0 = time.perf_counter()
                for _ in range(inner_all):
                    f()
                times[k].append((time.perf_counter() - t0) / inner_all)
    finally:
        if gc_was:
            gc.enable()
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        med = statistics.median(v)
        out[k] = {"us": med * 1e6, "spread": (q[2] - q[0]) / med, "samples": len(v), "calls_per_sample": inner_all}
    return out


def run_calls(quick: bool = False, rows=(1, 8, 128)) -> List[dict]:
    """Per-call times of ours vs torch (see the module docstring); one row per (case, rows)."""
    import layernorm

    samples = 15 if quick else 61
    results = []
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    for m in rows:
        x = torch.randn(m, WIDTH, generator=g)
        dy = torch.randn(m, WIDTH, generator=g)
        ln_t = nn.LayerNorm(WIDTH)
        ln_o = layernorm.LayerNorm(WIDTH)
        rms_t = nn.RMSNorm(WIDTH, eps=1e-6)
        rms_o = layernorm.RMSNorm(WIDTH, eps=1e-6)
        w, b = ln_t.weight.detach(), ln_t.bias.detach()
        xg = x.clone().requires_grad_(True)

        def grad_step(f):
            def call():
                f().backward(dy)
            return call

        cases = {
            "layer_norm functional fwd (no_grad)": (
                lambda: F.layer_norm(x, (WIDTH,), w, b), lambda: layernorm.layer_norm(x, (WIDTH,), w, b), False),
            "LayerNorm module fwd (no_grad)": (lambda: ln_t(x), lambda: ln_o(x), False),
            "rms_norm functional fwd (no_grad)": (
                lambda: F.rms_norm(x, (WIDTH,), w, 1e-6), lambda: layernorm.rms_norm(x, (WIDTH,), w, 1e-6), False),
            "RMSNorm module fwd (no_grad)": (lambda: rms_t(x), lambda: rms_o(x), False),
            "layer_norm functional fwd+bwd (1 thread)": (
                grad_step(lambda: F.layer_norm(xg, (WIDTH,), ln_t.weight, ln_t.bias)),
                grad_step(lambda: layernorm.layer_norm(xg, (WIDTH,), ln_o.weight, ln_o.bias)), True),
            "LayerNorm module fwd+bwd (1 thread)": (grad_step(lambda: ln_t(xg)), grad_step(lambda: ln_o(xg)), True),
        }
        for name, (torch_fn, ours_fn, one_thread) in cases.items():
            try:
                torch.set_num_threads(1 if one_thread else threads)
                if one_thread:
                    r = _interleaved_per_call({"torch": torch_fn, "ours": ours_fn}, samples)
                else:
                    with torch.no_grad():
                        r = _interleaved_per_call({"torch": torch_fn, "ours": ours_fn}, samples)
            finally:
                torch.set_num_threads(threads)
            results.append({
                "case": name, "rows": m, "cols": WIDTH, "threads": 1 if one_thread else threads,
                "torch_us": r["torch"]["us"], "ours_us": r["ours"]["us"],
                "ratio_ours_over_torch": r["ours"]["us"] / r["torch"]["us"],
                "spread_torch": r["torch"]["spread"], "spread_ours": r["ours"]["spread"],
                "samples": r["ours"]["samples"], "calls_per_sample": r["ours"]["calls_per_sample"],
            })
    return results


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPTStack(nn.Module):
    """GPT-2-small-shaped pre-norm decoder layers (no embeddings, no head): LayerNorm's real context."""

    def __init__(self, d: int = WIDTH, heads: int = 12, layers: int = 6):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


def run_model(quick: bool = False, tokens=(1, 64), layers: int = 6) -> List[dict]:
    """Inference of :class:`GPTStack`, unpatched vs patched, batch 1 (see the module docstring)."""
    import layernorm

    torch.manual_seed(0)
    base = GPTStack(layers=layers).eval()
    patched = layernorm.patch(copy.deepcopy(base))
    n_norms = sum(isinstance(m, layernorm.LayerNorm) for m in patched.modules())
    samples = 11 if quick else 41
    results = []
    for t in tokens:
        x = torch.randn(1, t, WIDTH)
        with torch.no_grad():
            err = (patched(x) - base(x)).abs().max().item()
            r = _interleaved_per_call({"torch": lambda: base(x), "ours": lambda: patched(x)}, samples, target_s=0.02)
        results.append({
            "model": f"GPTStack({layers} pre-norm layers, d={WIDTH}, 12 heads) inference, batch 1",
            "tokens": t, "norm_layers_patched": n_norms, "threads": torch.get_num_threads(),
            "unpatched_ms": r["torch"]["us"] / 1e3, "patched_ms": r["ours"]["us"] / 1e3,
            "ratio_patched_over_unpatched": r["ours"]["us"] / r["torch"]["us"],
            "spread_unpatched": r["torch"]["spread"], "spread_patched": r["ours"]["spread"],
            "samples": r["ours"]["samples"], "max_abs_diff_output": err,
        })
    return results


_STARTUP_SCRIPT = """
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import layernorm
t2 = time.perf_counter()
layernorm.layer_norm(torch.randn(1, 768), (768,))
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, layernorm.ops.NATIVE is not None)
"""


def run_startup(runs: int = 5) -> dict:
    """Import and first-call times of fresh processes (the extension is built before the first one)."""
    import subprocess
    import sys

    from ..native import build, build_folder

    build()  # the one-time build is not what this measures
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", _STARTUP_SCRIPT], capture_output=True, text=True, check=True)
        torch_s, layernorm_s, call_s, native = out.stdout.split()
        samples.append((float(torch_s), float(layernorm_s), float(call_s), native == "True"))
    med = lambda i: statistics.median(s[i] for s in samples)  # noqa: E731
    return {
        "runs": runs, "import_torch_s": med(0), "import_layernorm_s": med(1), "first_call_s": med(2),
        "layernorm_total_s": med(1) + med(2), "native_loaded": all(s[3] for s in samples),
        "build_folder": str(build_folder()),
    }
