"""One rank of the data-parallel checks of tests/test_patch_dist.py (gloo, CPU).

Run by torchrun (``torchrun --nproc_per_node 2 tests/_dist_patch_worker.py --mode fsdp2 ...``) or by the
test through ``torch.multiprocessing`` (``run_rank``). Each rank trains on its half of the batch; rank 0
writes the losses averaged over ranks (what the whole batch's loss is) as JSON. ``train_single`` is the
one-process reference on the whole batch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

import layernorm

STEPS = 5
BATCH = 4  # split in two halves of equal token counts: the mean of the ranks' means is the whole mean


def build(model_name: str, backend: Optional[str], fuse: bool = False) -> nn.Module:
    """The model, patched unless ``backend == "unpatched"``."""
    if model_name == "mlp":  # the Linear -> LayerNorm -> Linear
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))
    else:
        from layernorm.bench.models import build_model, perturb_norms

        model = perturb_norms(build_model(model_name, "tiny"), seed=1).train()
    if backend != "unpatched":
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            layernorm.patch(model, backend=None if backend == "auto" else backend, strict=True, fuse_residual=fuse)
    return model


def batch(model_name: str):
    gen = torch.Generator().manual_seed(1)
    if model_name == "mlp":
        return {"x": torch.randn(BATCH, 16, generator=gen), "y": torch.randn(BATCH, 8, generator=gen)}
    ids = torch.randint(3, 96, (BATCH, 16), generator=gen)
    return {"input_ids": ids, "labels": ids}


def loss_of(model: nn.Module, model_name: str, data: dict) -> torch.Tensor:
    if model_name == "mlp":
        return nn.functional.mse_loss(model(data["x"]), data["y"])
    return model(**data).loss


def _half(data: dict, rank: int, world: int) -> dict:
    n = BATCH // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in data.items()}


def train_single(model_name: str, backend: Optional[str], fuse: bool = False) -> List[float]:
    model = build(model_name, backend, fuse)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = batch(model_name)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, model_name, data)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_rank(mode: str, model_name: str, backend: Optional[str], fuse: bool = False) -> List[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(model_name, backend, fuse)
    if mode == "ddp":
        model = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in getattr(getattr(model, "model", None), "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = _half(batch(model_name), rank, world)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, model_name, data)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def run_rank(rank: int, world: int, port: int, mode: str, model_name: str, backend: str, fuse: bool, out: str) -> None:
    """Entry point of a process started by torch.multiprocessing (spawn)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _exit_now(main(["--mode", mode, "--model", model_name, "--backend", backend, "--out", out] + (["--fuse"] if fuse else [])))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    p.add_argument("--model", default="llama")
    p.add_argument("--backend", default="auto", help='"auto", a backend name, or "unpatched"')
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        result = {"losses": train_rank(a.mode, a.model, a.backend, a.fuse)}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
        result = {"error": f"{type(exc).__name__}: {exc}"}
    if rank == 0 or "error" in result:
        with open(a.out if rank == 0 else f"{a.out}.rank{rank}", "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
    return 0


def _exit_now(code: int) -> None:
    # torch 2.13's gloo teardown at interpreter exit aborts now and then ("terminate called without an
    # active exception", unpatched models too): the result is written, so skip the static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
