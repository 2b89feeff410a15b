"""Benchmarks behind ``layernorm bench``.

- :mod:`layernorm.bench.norm`: LayerNorm / RMSNorm (and fused residual-add) providers against a
  memory-copy baseline; ``layernorm bench [--quick] [--plot] [--block]``.
- :mod:`layernorm.bench.rnn`: the layer-normalized recurrent layers; ``layernorm bench --rnn``.

Shared helpers: :func:`~layernorm.bench._machine.describe_machine` (the ``machine`` block of every
result file) and :func:`~layernorm.bench._timing.time_fn` (median timer, CUDA events + L2 flush).
Nothing here is imported by ``import layernorm``.
"""
from ._machine import describe_machine
from ._timing import TimerConfig, Timing, time_fn

__all__ = ["describe_machine", "time_fn", "TimerConfig", "Timing"]
