"""A patched model trains past one process: DDP and FSDP2 (fully_shard), 2 gloo processes on CPU,
started by torch.multiprocessing and by torchrun, give the losses of one process on the whole batch.

FSDP2 frees each unsharded parameter after use by resizing its storage to 0 ("reshard"). An op that
makes a parameter's storage non-resizable breaks that (an earlier numba backend did, through
``Tensor.numpy()``): ``test_ops_leave_storage_resizable`` checks every CPU backend in three lines, and the
FSDP2 runs use the automatic backend as well as ``backend="torch"``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import layernorm

import _dist_patch_worker as worker
from tolerances import assert_close

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="needs torch.distributed with gloo"),
]


def _storage_frozen_by(backend) -> bool:
    """True when the op leaves its weight's storage non-resizable (the FSDP2 reshard failure)."""
    x = torch.randn(3, 8)
    w = torch.ones(8, requires_grad=True)
    layernorm.rms_norm(x, (8,), w, 1e-6, backend=backend).sum().backward()
    try:
        w.untyped_storage().resize_(0)
    except RuntimeError:
        return True
    return False


@pytest.mark.parametrize("backend", [b for b in layernorm.available_backends("cpu") if b != "triton"])
def test_ops_leave_storage_resizable(backend):
    # the minimal reproduction of the FSDP2 reshard failure the numba backend caused (Tensor.numpy()
    # made parameter storage non-resizable): every backend must leave storages as torch does
    assert not _storage_frozen_by(backend)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode, model_name, backend, tmp_path, fuse=False):
    out = str(tmp_path / f"{mode}-{model_name}-{backend}.json")
    mp.start_processes(worker.run_rank, args=(2, _free_port(), mode, model_name, backend, fuse, out),
                       nprocs=2, join=True, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def _check(result, model_name, backend, fuse=False):
    assert "error" not in result, result["error"]
    expected = worker.train_single(model_name, "unpatched")
    single_patched = worker.train_single(model_name, backend, fuse)
    assert_close(torch.tensor(single_patched), torch.tensor(expected), "bwd")
    assert_close(torch.tensor(result["losses"]), torch.tensor(expected), "bwd")
    assert expected[-1] < expected[0]


def test_ddp_two_processes(tmp_path):
    _check(_spawn("ddp", "llama", "auto", tmp_path), "llama", "auto")


@pytest.mark.parametrize("model_name", ["mlp", "llama"])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_fsdp2_two_processes(model_name, backend, tmp_path):
    _check(_spawn("fsdp2", model_name, backend, tmp_path), model_name, backend)


def test_torchrun_fsdp2_with_fused_residual(tmp_path):
    out = tmp_path / "torchrun.json"
    script = os.path.join(os.path.dirname(__file__), "_dist_patch_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), script, "--mode", "fsdp2", "--model", "llama", "--backend", "torch", "--fuse",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        _check(json.load(f), "llama", "torch", fuse=True)
