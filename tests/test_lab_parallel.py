"""The distributed experiment with 2 real gloo processes."""
import os
import socket
import tempfile
import time

import pytest

pytest.importorskip("mlxtend")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from layernorm.lab.ddp import CollectiveCounter, _init_method, run_spawn  # noqa: E402
from layernorm.lab.experiments.parallel import worker  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_ddp_ln_bn_syncbn():
    out = run_spawn(worker, {"seeds": [0], "steps": 2, "global_batch": 64, "data": "mnist"}, world=2)
    v = out["variants"]
    assert out["world_size"] == 2 and out["backend"] == "gloo"
    ln, bn, sbn = (v[k]["seeds"][0] for k in ("ln", "bn", "syncbn"))
    # LN: DDP reproduces whole-batch training, with only DDP's gradient all-reduce
    assert ln["grad_max_diff_step1"] <= 1e-5 and ln["param_max_diff_final"] <= 1e-5
    assert v["ln"]["extra_calls_per_step"] == 0
    assert set(v["ln"]["collectives_per_step"]["backward"]) == {"ddp_grad_allreduce"}
    # BN: per-process statistics change the gradient
    assert bn["grad_max_diff_step1"] > 1e-3
    # SyncBN: exact again, at the price of collectives in every forward
    assert sbn["grad_max_diff_step1"] <= 1e-5
    assert v["syncbn"]["forward_calls_per_step"] > 0
    assert v["syncbn"]["bytes_per_step"] > v["ln"]["bytes_per_step"]
    assert set(out["timings_s_per_step"]) == {"ln", "bn", "syncbn"}


_TINY = {"seeds": [0], "steps": 1, "global_batch": 64, "data": "mnist"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_rendezvous_uses_a_file_not_a_tcp_port(monkeypatch, tmp_path):
    assert _init_method("/x").startswith("file://")
    # a TCP (env://) rendezvous would try this unroutable address and fail or hang
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_bind = socket.socket.bind

    def no_tcp_bind(self, addr):  # the parent must not pick a port either
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"the parent bound a TCP port: {addr}")
        return real_bind(self, addr)

    monkeypatch.setattr(socket.socket, "bind", no_tcp_bind)
    out = run_spawn(worker, _TINY, world=2, timeout=240)
    assert out["world_size"] == 2 and set(out["variants"]) == {"ln", "bn", "syncbn"}
    assert os.listdir(tmp_path) == []  # the rendezvous file's temporary directory is gone


@pytest.mark.timeout(300)
def test_ddp_worker_exception_is_raised_in_the_parent(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t0 = time.monotonic()
    # rank 1 raises after the rendezvous, while rank 0 goes on into DDP's first collective
    with pytest.raises(RuntimeError, match=r"(?s)experiment 'parallel'.*rank 1.*injected failure in rank 1"):
        run_spawn(worker, _TINY, world=2, timeout=240, _fault="raise:1")
    assert time.monotonic() - t0 < 240
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(300)
def test_ddp_hang_is_stopped_by_the_timeout(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"experiment 'parallel'.*within 10 s.*terminated"):
        run_spawn(worker, _TINY, world=2, timeout=10, _fault="hang:1")
    assert time.monotonic() - t0 < 10 + 30  # the deadline, plus terminating the workers
    assert os.listdir(tmp_path) == []


def test_counter_counts_and_restores():
    import torch.distributed as d

    orig = d.all_reduce
    c = CollectiveCounter()
    with c.installed():
        assert d.all_reduce is not orig
    assert d.all_reduce is orig
    c.phase = "forward"
    c.add("x", 8)
    c.add("x", 4)
    assert c.snapshot() == {"forward": {"x": {"calls": 2, "bytes": 12}}}
