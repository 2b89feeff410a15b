"""The distributed experiment with 2 real gloo processes."""
import pytest

pytest.importorskip("sklearn")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

from layernorm.lab.parallel import CollectiveCounter, run_spawn  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_ddp_ln_bn_syncbn():
    out = run_spawn({"seeds": [0], "steps": 2, "global_batch": 64, "data_path": None}, world=2)
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
