"""glibc malloc settings for CPU benchmarks, shared by ``layernorm bench`` and ``layernorm bench --rnn``.

glibc mmaps every allocation at or above its mmap threshold fresh, and returns freed memory above its
trim threshold to the OS, so a benchmark that allocates large tensors per call would time page faults
and the kernel zeroing fresh pages, not the operation. The CPU benchmarks therefore re-execute
themselves once with the thresholds below set (unless both are already set, or ``--no-reexec``), and
record in their JSON which settings they ran with. 32 MiB is the largest mmap threshold glibc accepts
on 64-bit, so tensors under 32 MiB are reused from the heap; larger ones are still mmapped per call.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

import torch

MALLOC_ADVICE = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(4 * 2**30)}
_REEXEC_MARK = "LAYERNORM_BENCH_REEXEC"


def malloc_state(device) -> dict:
    """What the JSON records: the values in effect and how they got there."""
    state = {k: os.environ.get(k) for k in MALLOC_ADVICE}
    if os.environ.get(_REEXEC_MARK) == "1":
        how = "set by the CLI (re-executed itself with them)"
    elif all(state.values()):
        how = "inherited from the environment"
    elif torch.device(device).type != "cpu":
        how = "not needed (CUDA)"
    else:
        how = ("absent: not re-executed (in-process call or --no-reexec); large CPU allocations may be "
               "mmapped fresh per call")
    return {"values": state, "how": how, "advice": MALLOC_ADVICE}


def maybe_reexec(cli_args: List[str], device: Optional[str], disabled: bool) -> None:
    """CPU: re-execute ``python -m layernorm.cli <cli_args>`` with the malloc advice set, once.

    Nothing happens when ``disabled``, when already re-executed, when both settings are already in the
    environment, or when the run is on CUDA (``device`` "cuda", or None/"auto" with CUDA present)."""
    if disabled or os.environ.get(_REEXEC_MARK) == "1" or all(os.environ.get(k) for k in MALLOC_ADVICE):
        return
    if device == "cuda" or (device in (None, "auto") and torch.cuda.is_available()):
        return
    env = dict(os.environ)
    for k, v in MALLOC_ADVICE.items():
        env.setdefault(k, v)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "layernorm.cli", *cli_args], env)
