"""Data-parallel training: does LayerNorm need no extra communication, unlike BatchNorm?

Two processes (gloo, on this machine) train the same MLP with ``DistributedDataParallel``, each on half
of every global batch of 64 MNIST images. For LayerNorm, BatchNorm and SyncBatchNorm, per seed:

- the largest |difference| between DDP's averaged gradient and the gradient of one process on the
  whole global batch (what data parallelism is meant to reproduce), at the first step, and of the
  parameters after all steps;
- every collective call and its payload bytes per step, by phase (forward / backward): DDP's gradient
  all-reduces through a communication hook, everything else by wrapping ``torch.distributed``
  (``ddp.CollectiveCounter``); the wall time per step (timings.json only: not reproducible).

The same module runs under ``torchrun`` (one process per GPU with nccl, gloo without CUDA)::

    torchrun --nproc_per_node=2 -m layernorm.lab.experiments.parallel --out parallel.json

Criteria (fixed before the run): LN's gradient equal within :data:`DDP_TOL` with DDP's gradient
all-reduce as the only collective; BN's off by more than :data:`DEPENDENCE_TOL`; SyncBatchNorm exact
again but with collectives in every forward.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..data import display_name, load_images
from ..ddp import RETAINED, VARIANTS, CollectiveCounter, nbytes, run_spawn, to_sync
from ..experiment import Context, claim
from ..figures import COLORS, NORM_NAMES, pyplot, savefig
from ..models import MLP
from ..pool import Job
from ..stats import decide_checks
from ..training import setup_worker

NAME = "parallel"
TITLE = "Data-parallel training (2 processes, DDP)"

# ---- criteria (fixed before the run) ----
DDP_TOL = 1e-5          # DDP gradient equal to the single-process gradient (fp32 sum-order noise)
DEPENDENCE_TOL = 1e-3   # "differs": max |difference| must exceed this
CRITERIA = {"ddp_tol": DDP_TOL, "dependence_tol": DEPENDENCE_TOL}

FULL = {"world_size": 2, "backend": "gloo", "global_batch": 64, "steps": 5}
QUICK = {**FULL, "steps": 3}


def _make_model(variant: str, in_features: int, classes: int, seed: int, backend: str) -> nn.Module:
    torch.manual_seed(seed)
    model = MLP(in_features, classes, "ln" if variant == "ln" else "bn")
    if variant == "syncbn":
        model = to_sync(model, backend)
    return model


def _reference(variant: str, model: nn.Module) -> nn.Module:
    """One process, whole batch: SyncBatchNorm's single-process equivalent is plain BatchNorm."""
    ref = copy.deepcopy(model)
    if variant == "syncbn":
        plain = MLP(ref.body[0].in_features, ref.head.out_features, "bn")
        plain.load_state_dict(ref.state_dict())
        ref = plain
    return ref


def worker(rank: int, world: int, cfg: Dict, backend: str, out_path: Optional[str]) -> Optional[Dict]:
    """One rank of the experiment; rank 0 returns (and writes to ``out_path``) the measurements."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    setup_worker(1)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    use_cuda = backend == "nccl"
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    d = load_images(cfg.get("data", "mnist"))
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
                    _c.add("ddp_grad_allreduce", nbytes(buf))
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
                RETAINED.append(ddp)
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

def job(cfg: Dict) -> Dict:
    """The whole DDP experiment: spawns the ranks, returns rank 0's measurements and the wall time."""
    t0 = time.perf_counter()
    out = run_spawn(worker, cfg, world=cfg["world_size"])
    out["spawn_total_s"] = time.perf_counter() - t0
    return out


def plan(ctx: Context) -> List[Job]:
    cfg = {**(QUICK if ctx.quick else FULL), "seeds": ctx.seeds, "data": ctx.data}
    # two processes for ~(2 s start-up + 0.3 s per seed and step): counted twice, they occupy two cores
    return [Job(NAME, 0, job, {"cfg": cfg}, 2 * (8 + 0.3 * len(ctx.seeds) * cfg["steps"]))]


def analyze(ctx: Context, results: List[Dict]) -> Dict:
    cfg = QUICK if ctx.quick else FULL
    out = results[0]
    v = out["variants"]
    gd = {k: max(s["grad_max_diff_step1"] for s in v[k]["seeds"]) for k in v}
    pdiff = {k: max(s["param_max_diff_final"] for s in v[k]["seeds"]) for k in v}
    comm = {k: {kk: v[k][kk] for kk in ("calls_per_step", "bytes_per_step", "extra_calls_per_step",
                                         "extra_bytes_per_step", "forward_calls_per_step", "collectives_per_step")}
            for k in v}
    constant = all(s["collectives_constant_after_step1"] for k in v for s in v[k]["seeds"])
    ln_only_ddp = v["ln"]["extra_calls_per_step"] == 0 and set(
        n for ph in v["ln"]["collectives_per_step"].values() for n in ph) == {"ddp_grad_allreduce"}
    claims = [claim(
        "ln-no-extra-communication", NAME, "LN needs no extra communication in parallel training",
        "with layer normalization parallelization is no longer a problem because when you're using batch "
        "normalization then you would need to have extra communication and synchronization between the different "
        "computers to be able to parallelize correctly whereas with layer normalization ... you do not need to have "
        "that extra layer of communication",
        f"Real DDP, 2 processes (gloo), global batch {cfg['global_batch']} split 32/32. (a) LN: DDP's averaged "
        f"gradient equals one process's on the whole batch, max |diff| <= {DDP_TOL}, and the only collectives are "
        f"DDP's gradient all-reduces; (b) BN: max |diff| > {DEPENDENCE_TOL} (per-process statistics change the "
        f"gradient); (c) SyncBatchNorm: max |diff| <= {DDP_TOL} but > 0 collectives in every forward.",
        {"ln_exact_without_extra_collectives": decide_checks(
            {f"LN max |DDP grad - 1-process grad| {gd['ln']:.2g} <= {DDP_TOL}": gd["ln"] <= DDP_TOL,
             f"LN extra collectives per step {v['ln']['extra_calls_per_step']} == 0 (only DDP's all-reduce)":
                 ln_only_ddp}),
         "bn_needs_sync": decide_checks(
             {f"BN max |DDP grad - 1-process grad| {gd['bn']:.2g} > {DEPENDENCE_TOL}": gd["bn"] > DEPENDENCE_TOL}),
         "syncbn_exact_with_extra_collectives": decide_checks(
             {f"SyncBN max |DDP grad - 1-process grad| {gd['syncbn']:.2g} <= {DDP_TOL}": gd["syncbn"] <= DDP_TOL,
              f"SyncBN forward collectives per step {v['syncbn']['forward_calls_per_step']} > 0":
                  v["syncbn"]["forward_calls_per_step"] > 0})},
        {"grad_max_abs_diff_step1": gd, "param_max_abs_diff_final": pdiff, "collectives_per_step": comm,
         "collectives_constant_over_steps": constant, "seeds": ctx.seeds},
        note="Timings per step are in timings.json (not reproducible). BN's DDP also broadcasts its running "
             "statistics from rank 0 every forward (broadcast_buffers=True, DDP's default).",
        scope=f"MLP on {display_name(ctx.data)}, DDP with 2 CPU processes (gloo), global batch {cfg['global_batch']}")]
    fig = _figure(ctx, gd, comm)
    rows = [{"variant": k, "seed": s["seed"], "grad_max_diff_step1": s["grad_max_diff_step1"],
             "param_max_diff_final": s["param_max_diff_final"], "calls_per_step": v[k]["calls_per_step"],
             "bytes_per_step": v[k]["bytes_per_step"]} for k in v for s in v[k]["seeds"]]
    return {"config": {**cfg, "seeds": ctx.seeds, "data": ctx.data},
            "summary": {"grad_max_abs_diff_step1": gd, "collectives_per_step": comm},
            "claims": claims, "metrics": rows, "figures": [fig],
            "timings": {"spawn_total_s": out["spawn_total_s"], "s_per_step": out["timings_s_per_step"]}}


def _figure(ctx, gd, comm) -> str:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ks = ["ln", "bn", "syncbn"]
    labels = [NORM_NAMES[k] for k in ks]
    ax.bar(labels, [max(gd[k], 1e-12) for k in ks], color=[COLORS[k] for k in ks])
    ax.axhline(DDP_TOL, ls="--", color="black", lw=1, label=f"tolerance {DDP_TOL}")
    ax.set_yscale("log")
    ax.set_ylabel("max |DDP grad - 1-process grad| (log; 1e-12 = 0)")
    ax.set_title("Does DDP reproduce whole-batch training?", fontsize=10)
    ax.legend(fontsize=8)
    ddp_calls = [comm[k]["calls_per_step"] - comm[k]["extra_calls_per_step"] for k in ks]
    extra = [comm[k]["extra_calls_per_step"] for k in ks]
    ax2.bar(labels, ddp_calls, color=[COLORS[k] for k in ks], alpha=0.45, label="DDP gradient all-reduce")
    ax2.bar(labels, extra, bottom=ddp_calls, color=[COLORS[k] for k in ks], hatch="//", edgecolor="black",
            label="extra: norm statistics / buffer broadcast")
    for i, k in enumerate(ks):
        ax2.text(i, comm[k]["calls_per_step"] + 0.1, f"{comm[k]['bytes_per_step']} B", ha="center", fontsize=8)
    ax2.set_ylabel("collective calls per training step (axis from 0)")
    ax2.set_title("Communication per step (2 processes)", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return savefig(fig, ctx.fig_dir, "parallel.png")


def main(argv=None) -> int:
    """Entry point under ``torchrun``: reads RANK/WORLD_SIZE/LOCAL_RANK from the environment."""
    p = argparse.ArgumentParser(prog="python -m layernorm.lab.experiments.parallel",
                                description="Data-parallel LN vs BN vs SyncBN experiment (run under torchrun).")
    p.add_argument("--out", default="parallel.json", help="where rank 0 writes its JSON (default: parallel.json)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--data", default="mnist", help="mnist (default), digits, or a local MNIST/CIFAR copy "
                                                  "(see `layernorm lab --help`)")
    p.add_argument("--backend", default=None, help="gloo or nccl (default: nccl when CUDA is available)")
    a = p.parse_args(argv)
    if "RANK" not in os.environ:
        p.error("run me under torchrun (RANK/WORLD_SIZE unset); `layernorm lab --only parallel` spawns its own")
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    cfg = {"seeds": list(range(a.seeds)), "steps": a.steps, "global_batch": a.global_batch, "data": a.data}
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Under torchrun: no os._exit (torchrun reports exit codes and errors itself); clean exit after a barrier.
    try:
        out = worker(rank, world, cfg, backend, a.out if rank == 0 else None)
        if out is not None:
            print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "seeds"}
                              for k, v in out["variants"].items()}, indent=1))
        dist.barrier()
        RETAINED.clear()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
