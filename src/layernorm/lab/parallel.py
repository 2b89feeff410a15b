"""The parallel experiment: real data-parallel training with ``torch.distributed``.

Two processes (or however many ``torchrun`` starts) train the same MLP with
``DistributedDataParallel``; each gets half of every global batch. For each normalization
(LayerNorm, BatchNorm, SyncBatchNorm) we measure, per seed:

- the largest |difference| between DDP's averaged gradient and the gradient of *one process on the
  whole global batch* (the thing data parallelism is meant to reproduce), at the first step, and of
  the parameters after all steps;
- every collective call and its payload bytes per training step, split into forward and backward:
  DDP's gradient all-reduces are counted by a communication hook on its buckets; everything else
  (SyncBatchNorm's all_gather / all_reduce, DDP's buffer broadcast) by wrapping the
  ``torch.distributed`` functions for the duration of the run;

SyncBatchNorm: on GPUs (nccl) torch's ``nn.SyncBatchNorm``; on CPU processes, which torch's refuses,
:class:`CPUSyncBatchNorm1d` (same maths, one all-reduce per forward and one per backward).
- the wall time per step (reported apart from results.json: timings are not reproducible).

Run by the lab itself (``torch.multiprocessing`` with gloo, rendezvous through a file in a temporary
directory), or stand-alone::

    torchrun --nproc_per_node=2 -m layernorm.lab.parallel --out parallel.json
    # on GPUs the backend is nccl and each rank uses cuda:LOCAL_RANK

Teardown (lab-spawned workers): rank 0 writes its JSON atomically, every rank passes a barrier, and
then leaves with ``os._exit`` -- no destructor runs, because the DDP Reducer's destructor can join
gloo's worker thread while holding the GIL and deadlock. A worker that raises writes its traceback to
a file and exits with 1; the parent raises it, and gives up (terminating the workers) after a deadline.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["VARIANTS", "run_spawn", "worker", "main"]

VARIANTS = ("ln", "bn", "syncbn")
# Default wall-clock limit for the lab's spawned run (seconds); LAYERNORM_LAB_DDP_TIMEOUT overrides it.
DEFAULT_TIMEOUT_S = 900.0
# DDP wrappers of finished variants are kept alive (not destroyed mid-run: see "Teardown" above);
# lab-spawned workers leave with os._exit, under torchrun ``main`` clears this after the last barrier.
_RETAINED: List[nn.Module] = []
# The torch.distributed entry points a norm layer or DDP could call; all are counted when present.
_WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast",
            "_broadcast_coalesced", "reduce_scatter_tensor", "all_to_all_single", "reduce", "gather")


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class CollectiveCounter:
    """Counts collective calls and the bytes each rank contributes, per phase ("forward"/"backward")."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: Dict[str, Dict[str, List[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
        self._orig: Dict[str, object] = {}

    def add(self, name: str, nbytes: int) -> None:
        c = self.counts[self.phase][name]
        c[0] += 1
        c[1] += nbytes

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
                self.add(_name, _nbytes(payload))
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


def _to_sync(model: nn.Module, backend: str) -> nn.Module:
    if backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm1d):
            new = CPUSyncBatchNorm1d(child.num_features, child.eps, child.momentum)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            _to_sync(child, backend)
    return model


def _make_model(variant: str, in_features: int, classes: int, seed: int, backend: str) -> nn.Module:
    from .models import MLP

    torch.manual_seed(seed)
    model = MLP(in_features, classes, "ln" if variant == "ln" else "bn")
    if variant == "syncbn":
        model = _to_sync(model, backend)
    return model


def _reference(variant: str, model: nn.Module) -> nn.Module:
    """One process, whole batch: SyncBatchNorm's single-process equivalent is plain BatchNorm."""
    ref = copy.deepcopy(model)
    if variant == "syncbn":
        from .models import MLP

        plain = MLP(ref.body[0].in_features, ref.head.out_features, "bn")
        plain.load_state_dict(ref.state_dict())
        ref = plain
    return ref


def worker(rank: int, world: int, cfg: Dict, backend: str, out_path: Optional[str]) -> Optional[Dict]:
    """One rank of the experiment; rank 0 returns (and writes to ``out_path``) the measurements."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .jobs import get_data, setup_worker

    setup_worker(1)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    use_cuda = backend == "nccl"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    d = get_data(cfg.get("data_path"))
    x_all = d.x_train.flatten(1)
    y_all = d.y_train
    gbatch, steps = int(cfg["global_batch"]), int(cfg["steps"])
    if gbatch % world:
        raise ValueError(f"global_batch={gbatch} must be divisible by the world size {world}")
    shard = gbatch // world
    counter = CollectiveCounter()
    results: Dict[str, Dict] = {}
    timings: Dict[str, List[float]] = defaultdict(list)
    with counter.installed():
        for seed in cfg["seeds"]:
            for variant in VARIANTS:
                model = _make_model(variant, x_all.shape[1], d.num_classes, seed, backend).to(device)
                ref = _reference(variant, model).to(device) if rank == 0 else None
                ddp = DDP(model)

                def hook(state, bucket, _c=counter):
                    buf = bucket.buffer()
                    _c.add("ddp_grad_allreduce", _nbytes(buf))
                    buf.div_(world)
                    fut = _c.original("all_reduce")(buf, async_op=True).get_future()
                    return fut.then(lambda f: f.value()[0])

                ddp.register_comm_hook(None, hook)
                opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
                ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05) if ref is not None else None
                gen = torch.Generator().manual_seed(seed * 7919 + 5)
                per_step: List[Dict] = []
                grad_diff = None
                for step in range(steps):
                    idx = torch.randperm(len(x_all), generator=gen)[:gbatch]
                    xb, yb = x_all[idx].to(device), y_all[idx].to(device)
                    mine = slice(rank * shard, (rank + 1) * shard)
                    counter.reset()
                    if use_cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    counter.phase = "forward"
                    loss = F.cross_entropy(ddp(xb[mine]), yb[mine])
                    counter.phase = "backward"
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    counter.phase = "step"
                    opt.step()
                    if use_cuda:
                        torch.cuda.synchronize()
                    timings[variant].append(time.perf_counter() - t0)
                    per_step.append(counter.snapshot())
                    counter.phase = "reference"
                    if ref is not None:
                        ref_opt.zero_grad(set_to_none=True)
                        F.cross_entropy(ref(xb), yb).backward()
                        if step == 0:
                            grad_diff = max(float((p.grad - q.grad).abs().max())
                                            for p, q in zip(model.parameters(), ref.parameters()))
                        ref_opt.step()
                if ref is not None:
                    param_diff = max(float((p.detach() - q.detach()).abs().max())
                                     for p, q in zip(model.parameters(), ref.parameters()))
                    steady = per_step[-1]
                    constant = all(s == steady for s in per_step[1:])
                    results.setdefault(variant, {"seeds": []})["seeds"].append({
                        "seed": seed, "grad_max_diff_step1": grad_diff, "param_max_diff_final": param_diff,
                        "collectives_per_step": steady, "collectives_constant_after_step1": constant})
                _RETAINED.append(ddp)
                del ddp
    dist.barrier()
    if rank != 0:
        return None
    for variant, r in results.items():
        per = r["seeds"][0]["collectives_per_step"]
        r["collectives_per_step"] = per
        r["calls_per_step"] = sum(v["calls"] for ph in per.values() for v in ph.values())
        r["bytes_per_step"] = sum(v["bytes"] for ph in per.values() for v in ph.values())
        r["extra_calls_per_step"] = sum(v["calls"] for ph in per.values() for k, v in ph.items()
                                        if k != "ddp_grad_allreduce")
        r["extra_bytes_per_step"] = sum(v["bytes"] for ph in per.values() for k, v in ph.items()
                                        if k != "ddp_grad_allreduce")
        r["forward_calls_per_step"] = sum(v["calls"] for v in per.get("forward", {}).values())
    out = {"world_size": world, "backend": backend, "device": str(device), "global_batch": gbatch,
           "steps": steps, "variants": results,
           "timings_s_per_step": {v: statistics.median(t[1:] or t) for v, t in timings.items()}}
    if out_path:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
        os.replace(tmp, out_path)
    return out


def _spawn_entry(rank: int, world: int, cfg: Dict, tmp: str, fault: Optional[str]) -> None:
    """One lab-spawned rank. Never returns: leaves with ``os._exit`` (0 after the final barrier, 1 on error).

    ``fault`` is a test-only hook: ``"raise:R"`` makes rank R raise, ``"hang:R"`` makes it sleep,
    right after the rendezvous.
    """
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
        worker(rank, world, cfg, "gloo", os.path.join(tmp, "parallel.json") if rank == 0 else None)
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


def run_spawn(cfg: Dict, world: int = 2, timeout: Optional[float] = None, *, _fault: Optional[str] = None) -> Dict:
    """Start ``world`` gloo processes on this machine and return rank 0's result.

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
        ctx = mp.start_processes(_spawn_entry, args=(world, cfg, tmp, _fault), nprocs=world, join=False,
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


def main(argv=None) -> int:
    """Entry point under ``torchrun``: reads RANK/WORLD_SIZE/LOCAL_RANK from the environment."""
    p = argparse.ArgumentParser(prog="python -m layernorm.lab.parallel",
                                description="Data-parallel LN vs BN vs SyncBN experiment (run under torchrun).")
    p.add_argument("--out", default="parallel.json", help="where rank 0 writes its JSON (default: parallel.json)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--data", default=None, help="local MNIST/CIFAR copy (see `layernorm lab --help`)")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl when CUDA is available)")
    a = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("run me under torchrun (RANK/WORLD_SIZE unset); `layernorm lab --only parallel` spawns its own")
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cfg = {"seeds": list(range(a.seeds)), "steps": a.steps, "global_batch": a.global_batch, "data_path": a.data}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Under torchrun: no os._exit (torchrun reports exit codes and errors itself); clean exit after a barrier.
    try:
        out = worker(rank, world, cfg, backend, a.out if rank == 0 else None)
        if out is not None:
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seeds"}
                              for k, v in out["variants"].items()}, indent=1))
        dist.barrier()
        _RETAINED.clear()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
