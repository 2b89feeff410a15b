"""Fast tests of the lab: verdict rules, data loaders, schema, determinism, resume, CLI."""
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from layernorm.lab import cli, runner, stats  # noqa: E402
from layernorm.lab.data import adding_problem, load_images  # noqa: E402
from layernorm.lab.schema import validate  # noqa: E402

S, NS, INC = stats.SUPPORTED, stats.NOT_SUPPORTED, stats.INCONCLUSIVE


# ------------------------------------------------------------------ verdict logic on synthetic numbers
def test_effect_supported():
    r = stats.decide_effect([2.1, 3.0, 2.4, 2.8, 1.9], min_effect=1.0)
    assert r["verdict"] == S
    lo, hi = r["difference"]["ci95_t"]
    assert 1.5 < lo < 2.44 < hi < 3.1


def test_effect_not_supported_when_reversed_or_negligible():
    assert stats.decide_effect([-1.0, -2.0, -1.5, -0.5, -1.2], 1.0)["verdict"] == NS
    # a real but smaller-than-claimed effect: interval above 0 but wholly below min_effect
    assert stats.decide_effect([0.20, 0.22, 0.19, 0.21, 0.20], 1.0)["verdict"] == NS


def test_effect_inconclusive_when_noisy_or_single_seed():
    assert stats.decide_effect([5.0, -4.0, 6.0, -3.0, 0.5], 1.0)["verdict"] == INC
    assert stats.decide_effect([3.0], 1.0)["verdict"] == INC  # one seed: no interval


def test_no_worse_rule():
    assert stats.decide_no_worse([0.1, -0.3, 0.2, 0.0, -0.1], margin=2.0)["verdict"] == S
    assert stats.decide_no_worse([-5.0, -6.0, -5.5, -4.8, -5.2], margin=2.0)["verdict"] == NS
    assert stats.decide_no_worse([-2.0, 0.5, -4.5, 1.0, -3.0], margin=2.0)["verdict"] == INC


def test_checks_and_combine():
    assert stats.decide_checks({"a": True, "b": True})["verdict"] == S
    assert stats.decide_checks({"a": True, "b": False})["verdict"] == NS
    assert stats.combine([S, S]) == S
    assert stats.combine([S, INC]) == INC
    assert stats.combine([INC, NS, S]) == NS
    with pytest.raises(ValueError, match="unknown verdict"):
        stats.combine(["maybe"])
    with pytest.raises(ValueError, match="min_effect"):
        stats.decide_effect([1.0, 2.0], -1)


def test_t_interval_matches_scipy_and_degenerate_cases():
    from scipy import stats as ss

    v = [1.0, 2.0, 4.0, 3.5]
    lo, hi = stats.t_interval(v)
    ref = ss.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=ss.sem(v))
    assert np.allclose([lo, hi], ref)
    assert stats.t_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]
    assert stats.bootstrap_interval(v) == stats.bootstrap_interval(v)  # seeded


# ------------------------------------------------------------------ data
def test_npz_nhwc_and_idx_loaders(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "cifar.npz"
    np.savez(p, x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, (20, 1)),
             x_test=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 6))
    d = load_images(str(p))
    assert d.x_train.shape == (20, 3, 32, 32) and d.y_train.shape == (20,) and float(d.x_train.max()) <= 1.0

    def idx(path, arr):
        with gzip.open(path, "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape))
            f.write(arr.astype(np.uint8).tobytes())

    m = tmp_path / "mnist"
    m.mkdir()
    idx(m / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    idx(m / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 12))
    idx(m / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (4, 28, 28)))
    idx(m / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 4))
    d = load_images(str(m))
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    with pytest.raises(ValueError, match="x_train"):
        np.savez(tmp_path / "bad.npz", x=np.zeros(3))
        load_images(str(tmp_path / "bad.npz"))


def test_adding_problem_targets():
    x, lens, y = adding_problem(50, (4, 9), torch.Generator().manual_seed(0))
    assert x.shape[0] == 50 and lens.min() >= 4 and lens.max() <= 9
    assert torch.all(x[..., 1].sum(1) == 2)
    assert torch.allclose((x[..., 0] * x[..., 1]).sum(1), y)
    assert torch.all(x[torch.arange(x.shape[1])[None, :].expand(50, -1) >= lens[:, None]] == 0)


# ------------------------------------------------------------------ runner: schema, determinism, resume
CHEAP = ["what-ln-computes", "train-test"]


def _run(out, workers=1, only=CHEAP, **kw):
    return runner.run_lab(out=str(out), run="t", only=only, seeds=2, quick=True, workers=workers, progress=False, **kw)


def test_schema_and_determinism_across_workers(tmp_path):
    a = _run(tmp_path / "a", workers=1)
    b = _run(tmp_path / "b", workers=2)
    ra = open(os.path.join(a, "results.json"), "rb").read()
    rb = open(os.path.join(b, "results.json"), "rb").read()
    assert ra == rb  # same seeds -> byte-identical results.json, whatever the number of processes
    res = json.loads(ra)
    assert validate(res) == []
    ids = {c["id"] for c in res["claims"]}
    assert {"ln-per-sample", "ln-neuron-own-calculation", "ln-train-test-same"} <= ids
    verdicts = {c["id"]: c["verdict"] for c in res["claims"]}
    assert verdicts["ln-per-sample"] == S and verdicts["ln-train-test-same"] == S
    assert verdicts["ln-neuron-own-calculation"] == NS
    tt = res["experiments"]["train-test"]["summary"]["train_eval_max_abs_diff"]
    assert tt["ln"] == 0.0 and tt["bn"] > 1e-3
    for f in ("metrics.csv", "report.md", "report.html", "timings.json", "figures/what-ln-computes.png"):
        assert os.path.getsize(os.path.join(a, f)) > 0
    assert "experiment_s" not in ra.decode()  # timings stay out of results.json


def test_schema_rejects_bad_results():
    assert validate({"claims": []})
    bad = {"schema_version": 1, "tool": "x", "layernorm_version": "0", "torch_version": "2", "run": "r",
           "config": {"quick": True, "seeds": [0], "data": "d", "criteria": {}}, "verdict_counts": {},
           "claims": [{"id": "a", "experiment": "e", "claim": "c", "source": "s", "criterion": "k",
                       "verdict": "probably", "parts": {}, "evidence": {}}], "experiments": {}, "choose": []}
    errs = validate(bad)
    assert any("verdict" in e for e in errs)


def test_resume_skips_finished_and_survives_interruption(tmp_path, monkeypatch):
    from layernorm.lab import experiments

    def boom(ctx):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setitem(experiments.EXPERIMENTS, "train-test", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    run_dir = tmp_path / "t"
    assert (run_dir / "experiments" / "what-ln-computes.json").exists()
    assert not (run_dir / "experiments" / "train-test.json").exists()
    leftovers = [str(p) for p in run_dir.rglob("*.tmp*")]
    assert leftovers == []  # atomic writes: no half-written files
    monkeypatch.undo()
    first = (run_dir / "experiments" / "what-ln-computes.json").stat().st_mtime_ns
    calls = []
    orig = experiments.EXPERIMENTS["what-ln-computes"]
    monkeypatch.setitem(experiments.EXPERIMENTS, "what-ln-computes", lambda ctx: calls.append(1) or orig(ctx))
    _run(tmp_path)
    assert calls == []  # finished experiment skipped
    assert (run_dir / "experiments" / "what-ln-computes.json").stat().st_mtime_ns == first
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["experiments"]) == set(CHEAP) and validate(res) == []
    with pytest.raises(ValueError, match="other settings"):
        runner.run_lab(out=str(tmp_path), run="t", only=CHEAP, seeds=3, quick=True, workers=1, progress=False)


def test_cli(tmp_path, capsys):
    assert cli.main(["--only", "what-ln-computes", "--seeds", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "ln-per-sample" in capsys.readouterr().out
    assert (tmp_path / "full-1seeds-digits" / "results.json").exists()
    assert cli.main(["--only", "nope", "--out", str(tmp_path), "--no-progress"]) == 2
    assert cli.main(["--resume", "--only", "what-ln-computes", "--out", str(tmp_path), "--no-progress"]) == 0
    assert cli.main(["--resume", "--out", str(tmp_path / "empty"), "--no-progress"]) == 2


def test_recurrent_jobs_are_deterministic():
    from layernorm.lab import jobs

    jobs.setup_worker(1)
    kw = dict(seed=3, steps=4, batch=16, lr=5e-3, hidden=8, train_lengths=[3, 5], test_lengths=[5, 20], n_test=32)
    for kind in ("ln-lstm", "bn-lstm"):
        assert jobs.job_varlen(kind=kind, **kw) == jobs.job_varlen(kind=kind, **kw)
    kw = dict(seed=1, steps=4, batch=16, lr=3e-3, hidden=8, evals=2, target=0.9, data_path=None)
    assert jobs.job_rnn(kind="ln-gru", **kw) == jobs.job_rnn(kind="ln-gru", **kw)
