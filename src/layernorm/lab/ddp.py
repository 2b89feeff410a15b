"""Data-parallel machinery for the lab: spawning gloo ranks, counting collectives, SyncBatchNorm on CPU.

The ``parallel`` experiment (``experiments/parallel.py``) holds the model, the training job and the
criteria; this module runs a rank function in ``world`` local processes and measures communication:

- :func:`run_spawn` starts the ranks with ``torch.multiprocessing`` (gloo, rendezvous through a file in
  a temporary directory: no TCP port), returns rank 0's result, raises a rank's error in the parent, and
  terminates the ranks after a deadline (``LAYERNORM_LAB_DDP_TIMEOUT``, default 900 s);
- :class:`CollectiveCounter` counts every collective call and its payload bytes per phase by wrapping
  the ``torch.distributed`` functions while installed;
- :class:`CPUSyncBatchNorm1d`: torch's ``nn.SyncBatchNorm`` refuses CPU tensors, this does the same
  maths with one all-reduce per forward and one per backward.

Teardown (lab-spawned ranks): rank 0 writes its JSON atomically, every rank passes a barrier, and then
leaves with ``os._exit`` -- no destructor runs, because the DDP Reducer's destructor can join gloo's
worker thread while holding the GIL and deadlock. A rank that raises writes its traceback to a file and
exits with 1; the parent raises it. Every rank dies with its parent (``pool.die_with_parent``), so a
killed lab leaves no rank behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["VARIANTS", "run_spawn", "nbytes", "CollectiveCounter", "CPUSyncBatchNorm1d", "to_sync", "RETAINED"]

VARIANTS = ("ln", "bn", "syncbn")
# Default wall-clock limit for the lab's spawned run (seconds); LAYERNORM_LAB_DDP_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 900.0
# DDP wrappers of finished variants are kept alive (not destroyed mid-run: see "Teardown" above);
# lab-spawned workers leave with os._exit, under torchrun ``main`` clears this after the last barrier.
RETAINED: List[nn.Module] = []
# The torch.distributed entry points a norm layer or DDP could call; all are counted when present.
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
            "_broadcast_coalesced", "reduce_scatter_tensor", "all_to_all_single", "reduce", "gather")


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    return 0


class CollectiveCounter:
    """Counts collective calls and the bytes each rank contributes, per phase ("forward"/"backward")."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._orig: Dict[str, object] = {}

    def add(self, name: str, size: int) -> None:
        c = self.counts[self.phase][name]
        c[0] += 1
        c[1] += size

    def reset(self) -> None:
        self.counts.clear()

    def snapshot(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        return {ph: {k: {"calls": v[0], "bytes": v[1]} for k, v in sorted(d.items())}
                for ph, d in sorted(self.counts.items())}

    def original(self, name: str):
        return self._orig.get(name, getattr(dist, name))

    @contextlib.contextmanager
    def installed(self):
        for name in _WRAPPED:
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._orig[name] = fn

            def wrapper(*args, _fn=fn, _name=name, **kwargs):
                # payload: the tensor this rank sends (first tensor argument after any output list)
                if _name == "_broadcast_coalesced":
                    payload = args[1] if len(args) > 1 else kwargs.get("tensors")
                elif _name in ("all_gather",):
                    payload = args[1] if len(args) > 1 else kwargs.get("tensor")
                elif _name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
                                "all_to_all_single"):
                    payload = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("input"))
                else:
                    payload = args[0] if args else kwargs.get("tensor")
                self.add(_name, nbytes(payload))
                return _fn(*args, **kwargs)

            setattr(dist, name, wrapper)
        try:
            yield self
        finally:
            for name, fn in self._orig.items():
                setattr(dist, name, fn)
            self._orig.clear()


class CPUSyncBatchNorm1d(nn.BatchNorm1d):
    """SyncBatchNorm for CPU processes (torch's refuses CPU tensors, and DDP refuses it on CPU).

    It does what ``nn.SyncBatchNorm`` does: in training, one all-reduce per forward of the per-rank
    (sum, sum of squares, count) gives the global batch mean/variance; the differentiable all-reduce
    (``torch.distributed.nn.functional.all_reduce``) adds one all-reduce of their gradients in backward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        stats = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), x.shape[0])])
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # sum over ranks; its backward all-reduces the gradient
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * n / (n - 1))
            self.num_batches_tracked.add_(1)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def to_sync(model: nn.Module, backend: str) -> nn.Module:
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm1d):
            new = CPUSyncBatchNorm1d(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            to_sync(child, backend)
    return model


def _spawn_entry(rank: int, world: int, target: Callable, cfg: Dict, tmp: str, fault: Optional[str],
                 parent_pid: int) -> None:
    """One lab-spawned rank. Never returns: leaves with ``os._exit`` (0 after the final barrier, 1 on error).

    ``fault`` is a test-only hook: ``"raise:R"`` makes rank R raise, ``"hang:R"`` makes it sleep,
    right after the rendezvous.
    """
    from .pool import die_with_parent

    die_with_parent(parent_pid)
    code = 1
    try:
        dist.init_process_group("gloo", init_method=_init_method(tmp), rank=rank, world_size=world)
        if fault:
            kind, _, which = fault.partition(":")
            if int(which) == rank:
                if kind == "raise":
                    raise RuntimeError(f"injected failure in rank {rank} (test hook fault={fault!r})")
                if kind == "hang":
                    while True:
                        time.sleep(60)
        target(rank, world, cfg, "gloo", os.path.join(tmp, "parallel.json") if rank == 0 else None)
        dist.barrier()  # rank 0's JSON is on disk; nobody needs a peer any more
        code = 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            err = os.path.join(tmp, f"rank{rank}.error")
            with open(err + ".tmp", "w") as f:
                f.write(traceback.format_exc())
            os.replace(err + ".tmp", err)
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)  # no interpreter teardown: no destructor can deadlock (see the module docstring)


def _init_method(tmp: str) -> str:
    """The rendezvous of a lab-spawned run: a file in its temporary directory (no TCP port to collide on)."""
    return "file://" + os.path.join(tmp, "rendezvous.store")


def _timeout_from_env() -> float:
    v = os.environ.get("LAYERNORM_LAB_DDP_TIMEOUT")
    return float(v) if v else DEFAULT_TIMEOUT_S


def _stop(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    t_end = time.monotonic() + 5
    for p in processes:
        p.join(max(0.0, t_end - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join()


def _worker_errors(tmp: str, world: int) -> str:
    """The tracebacks the ranks wrote, the first written (most likely the cause) first."""
    found = []
    for r in range(world):
        path = os.path.join(tmp, f"rank{r}.error")
        if os.path.exists(path):
            with open(path) as f:
                found.append((os.stat(path).st_mtime_ns, r, f.read()))
    return "".join(f"\n--- rank {r} ---\n{tb}" for _, r, tb in sorted(found))


def run_spawn(target: Callable, cfg: Dict, world: int = 2, timeout: Optional[float] = None, *,
              _fault: Optional[str] = None) -> Dict:
    """Run ``target(rank, world, cfg, "gloo", out_path)`` in ``world`` gloo processes; return rank 0's result.

    ``target`` must be a module-level function; rank 0 writes its result as JSON to ``out_path``.

    The ranks meet through a file in a temporary directory (removed afterwards). A rank that raises
    makes this raise ``RuntimeError`` with its traceback; if the run is not over after ``timeout``
    seconds (default: ``$LAYERNORM_LAB_DDP_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`), the workers are
    terminated and ``TimeoutError`` is raised. ``_fault`` is a test-only hook (see ``_spawn_entry``).
    """
    import torch.multiprocessing as mp
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

    timeout = _timeout_from_env() if timeout is None else float(timeout)
    what = f"layernorm lab: experiment 'parallel' (DDP, {world} gloo processes)"
    with tempfile.TemporaryDirectory(prefix="layernorm-lab-ddp-") as tmp:
        out_path = os.path.join(tmp, "parallel.json")
        deadline = time.monotonic() + timeout
        ctx = mp.start_processes(_spawn_entry, args=(world, target, cfg, tmp, _fault, os.getpid()), nprocs=world,
                                 join=False,
                                 start_method="spawn")
        try:
            while not ctx.join(timeout=max(0.0, deadline - time.monotonic()), grace_period=2):
                if time.monotonic() >= deadline:
                    _stop(ctx.processes)
                    raise TimeoutError(f"{what} did not finish within {timeout:g} s; its workers were "
                                       f"terminated (set LAYERNORM_LAB_DDP_TIMEOUT=<seconds> to allow longer)")
        except (ProcessExitedException, ProcessRaisedException) as e:
            _stop(ctx.processes)
            errors = _worker_errors(tmp, world)
            raise RuntimeError(f"{what} failed: {e}" + (errors or " (no traceback: the worker died)")) from None
        finally:
            _stop(ctx.processes)  # on any exit path (KeyboardInterrupt included) no worker outlives us
        if not os.path.exists(out_path):
            raise RuntimeError(f"{what}: the workers exited without rank 0's result")
        with open(out_path) as f:
            return json.load(f)
