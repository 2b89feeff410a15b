"""Timers: median of repeats, CPU wall clock or CUDA events with the L2 cache flushed before each repeat.

Method (recorded in every result file by :func:`timing_method`):

- CPU: ``warmup`` calls, then ``reps`` calls each timed alone with :func:`time.perf_counter`; the
  garbage collector is off while timing. ``reps`` is chosen so the repeats take about ``budget_s``
  (between ``min_reps`` and ``max_reps``), from the time of the warm-up calls.
- CUDA: the same loop, each call between two ``torch.cuda.Event`` s; before each call a buffer
  twice the L2 size is zeroed so every call reads its inputs from HBM (what a model step sees).
- :func:`time_interleaved` (the RNN bench): several providers, one call of each per round in
  rotating order, each call timed with :func:`time.perf_counter` (after ``torch.cuda.synchronize``
  on CUDA; no L2 flush: these calls run for milliseconds).
The reported time is the median; the minimum and the quartiles are kept too (``Timing.spread``, the
interquartile range over the median, says how noisy the repeats were).
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

__all__ = ["TimerConfig", "Timing", "time_fn", "time_interleaved", "timing_method"]


@dataclass
class TimerConfig:
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 0.4


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int
    p25_ms: float = float("nan")
    p75_ms: float = float("nan")

    @property
    def spread(self) -> float:
        """Interquartile range over the median: ~0.01-0.05 on a quiet machine, more under load."""
        return (self.p75_ms - self.p25_ms) / self.median_ms if self.median_ms > 0 else float("nan")


def _summary(times_ms: List[float]) -> Timing:
    q = statistics.quantiles(times_ms, n=4) if len(times_ms) >= 2 else [times_ms[0]] * 3
    return Timing(statistics.median(times_ms), min(times_ms), len(times_ms), q[0], q[2])


_FLUSH: dict = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _FLUSH:
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        _FLUSH[key] = torch.empty(max(2 * l2, 128 * 2**20), dtype=torch.int8, device=device)
    return _FLUSH[key]


def _reps(per_call_s: float, cfg: TimerConfig) -> int:
    if per_call_s <= 0:
        return cfg.max_reps
    return int(min(cfg.max_reps, max(cfg.min_reps, cfg.budget_s / per_call_s)))


def time_fn(fn: Callable[[], object], device: torch.device, cfg: Optional[TimerConfig] = None) -> Timing:
    """Median time of ``fn()`` in milliseconds on ``device`` (see the module docstring for the method)."""
    cfg = cfg or TimerConfig()
    if device.type == "cuda":
        return _time_cuda(fn, device, cfg)
    return _time_cpu(fn, cfg)


def _time_cpu(fn, cfg: TimerConfig) -> Timing:
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, cfg.warmup)):
            fn()
        per_call = (time.perf_counter() - t0) / max(1, cfg.warmup)
        times = []
        for _ in range(_reps(per_call, cfg)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return _summary([t * 1e3 for t in times])


def _time_cuda(fn, device: torch.device, cfg: TimerConfig) -> Timing:
    flush = _l2_flush_buffer(device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(max(1, cfg.warmup)):
        fn()
    torch.cuda.synchronize(device)
    per_call = (time.perf_counter() - t0) / max(1, cfg.warmup)
    n = _reps(per_call, cfg)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


@contextlib.contextmanager
def gc_paused():
    """The garbage collector off (after one collection) while timing: a collection inside a timed call
    would land on whichever provider happened to trigger it."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def rotating_rounds(fns: Dict[str, Callable[[], object]], reps: int,
                    sync: Callable[[], None]) -> Dict[str, List[float]]:
    """ms of each call over ``reps`` rounds: one call of every provider per round, the order rotating
    from round to round, so a load that drifts over seconds reaches every provider alike."""
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(reps):
        for j in range(len(names)):
            k = names[(r + j) % len(names)]
            sync()
            t0 = time.perf_counter()
            fns[k]()
            sync()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: Dict[str, Callable[[], object]], device: torch.device,
                     cfg: Optional[TimerConfig] = None) -> Dict[str, Timing]:
    """Median time of each ``fns[k]()``, the providers timed in turn within every repeat.

    On a shared machine the load drifts over seconds; timing one provider's repeats after the
    other's puts that drift into the ratio. Taking one call of each provider per round (the order
    rotating from round to round) exposes all of them to the same drift. ``reps`` comes from the
    slowest provider's warm-up time, so every provider gets the same number of repeats.
    """
    cfg = cfg or TimerConfig()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with gc_paused():
        per_call = {}
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(max(1, cfg.warmup)):
                fn()
            sync()
            per_call[k] = (time.perf_counter() - t0) / max(1, cfg.warmup)
        n = _reps(sum(per_call.values()) / len(fns), cfg)  # the budget of one provider, as time_fn
        times = rotating_rounds(fns, n, sync)
    return {k: _summary(v) for k, v in times.items()}


def timing_method(device: torch.device, cfg: TimerConfig) -> dict:
    if device.type == "cuda":
        clock = "torch.cuda.Event pairs around each call; L2 flushed (zero_ of a 2xL2 buffer) before each call"
    else:
        clock = "time.perf_counter around each call; gc disabled while timing"
    return {
        "clock": clock,
        "statistic": "median of reps (min and quartiles also recorded; spread = IQR / median)",
        "warmup": cfg.warmup,
        "reps": f"budget_s/time_per_call clamped to [{cfg.min_reps}, {cfg.max_reps}]",
        "budget_s": cfg.budget_s,
    }
