"""The ``layernorm`` command and the norm benchmark: runs, writes a valid result file, and never times
a wrong provider."""
import csv
import json
import sys

import pytest
import torch

from layernorm import cli
from layernorm.bench import norm as bench
from layernorm.bench._providers import OPS, Provider, _eager_fn

pytestmark = pytest.mark.timeout(120)

# small enough for a loaded 2-core machine; still every op path, both dtypes of the check
TINY = ["--dtype", "float32", "--cols", "256", "--rows", "128", "--warmup", "1", "--repeats", "2", "--budget", "0.001"]


def _args(*extra):
    args = bench.build_parser().parse_args(["--no-save", "--quiet", "--device", "cpu", *TINY, *extra])
    args._argv = []
    return args


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    cpu = d["backends"]["cpu"]
    assert {"reference", "torch"} <= set(cpu["available"])
    assert cpu["auto"]["float32"] in cpu["available"]
    assert d["machine"]["cpu_model"] and d["machine"]["torch_threads"] >= 1
    assert d["machine"]["versions"]["torch"] == torch.__version__


def test_info_table_and_usage(capsys):
    assert cli.main(["info"]) == 0
    assert "backends" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize("argv,module", [(["bench", "--rnn"], "layernorm.bench.rnn"), (["lab"], "layernorm.lab.cli")])
def test_missing_subcommand_is_one_clear_line(monkeypatch, capsys, argv, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not available" in err and "Traceback" not in err


def test_bench_quick_writes_valid_json(tmp_path, capsys):
    argv = ["bench", "--quick", "--device", "cpu", "--op", "layer_norm,add_rms_norm", *TINY,
            "--out", str(tmp_path), "--tag", "t", "--plot"]
    assert cli.main(argv) == 0
    doc = json.loads((tmp_path / "norm-cpu-t.json").read_text())
    assert doc["schema"] == bench.SCHEMA and doc["device"] == "cpu"
    m = doc["machine"]
    for key in ("platform", "cpu_model", "cpu_count", "torch_threads", "versions", "env", "native", "load_average"):
        assert key in m
    assert "MALLOC_MMAP_THRESHOLD_" in m["env"]
    # in-process calls never re-exec; the file says how the malloc settings came about
    assert doc["settings"]["malloc"]["how"]
    assert doc["settings"]["bytes_moved"] and doc["settings"]["timing"]["clock"]
    assert doc["copy"] and all(c["gbps"] > 0 for c in doc["copy"])
    assert doc["providers"]["eager"]["available"]
    if doc["device"] == "cuda" and doc["providers"]["ours"]["available"]:  # the launch table in use is recorded
        assert doc["settings"]["triton_table"]["source"] == "built-in"
    assert not doc["providers"]["compile"]["available"]  # skipped by --quick on CPU
    res = doc["results"]
    assert {r["op"] for r in res} == {"layer_norm", "add_rms_norm"}
    assert {r["mode"] for r in res} == {"fwd", "bwd", "fwd+bwd"}
    numel_bytes = 128 * 256 * 4
    for r in res:
        assert set(bench.CSV_FIELDS) <= set(r)
        if r["provider"] == "eager":
            assert r["status"] == "ok" and r["speedup_vs_eager"] == pytest.approx(1.0)
        if r["status"] == "ok":
            add = OPS[r["op"]][1]
            assert r["bytes"] == bench._TENSORS_MOVED[(r["mode"], add)] * numel_bytes
            assert r["ms"] > 0 and r["copy_ms"] > 0
            assert r["frac_copy"] == pytest.approx(r["copy_ms"] / r["ms"])
            assert r["max_err"]["y"] <= r["tol"]["y"]
    assert any(s["provider"] == "ours" and s["n_ok"] for s in doc["summary"])
    rows = list(csv.DictReader(open(tmp_path / "norm-cpu-t.csv")))
    assert len(rows) == len(res)
    assert (tmp_path / "norm-cpu-t.png").stat().st_size > 1000


def _wrong_forward(op, device):
    eager = _eager_fn(op)

    def fn(x, r, w, b):
        y, *rest = eager(x, r, w, b)
        return (y * 1.5, *rest)
    return fn


class _DoubleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _wrong_backward(op, device):
    eager = _eager_fn(op)

    def fn(x, r, w, b):
        y, *rest = eager(x, r, w, b)
        return (_DoubleGrad.apply(y), *rest)
    return fn


def _raises(op, device):
    raise RuntimeError("boom")


def test_wrong_providers_are_rejected_not_timed():
    extra = [Provider("wrong-fwd", _wrong_forward), Provider("wrong-bwd", _wrong_backward),
             Provider("broken", _raises)]
    doc = bench.run(_args("--op", "layer_norm", "--providers", "eager,wrong-fwd,wrong-bwd,broken"),
                    extra_providers=extra)
    by = {}
    for r in doc["results"]:
        by.setdefault(r["provider"], []).append(r)
    assert all(r["status"] == "ok" for r in by["eager"])
    for name in ("wrong-fwd", "wrong-bwd"):
        assert all(r["status"] == "incorrect" and r["ms"] is None for r in by[name]), by[name]
    assert by["wrong-fwd"][0]["max_err"]["y"] > 0.3
    assert by["wrong-bwd"][0]["max_err"]["y"] < 1e-6 and by["wrong-bwd"][0]["max_err"]["dx"] > 0.5
    assert all(r["status"] == "error" and "boom" in r["error"] for r in by["broken"])
    s = [x for x in doc["summary"] if x["provider"] == "wrong-fwd"]
    assert len(s) == 3 and all(x["n_incorrect"] == 1 and x["geomean_speedup_vs_eager"] is None for x in s)


def test_checkpoint_after_each_case():
    seen = []
    doc = bench.run(_args("--op", "rms_norm", "--mode", "fwd", "--cols", "64,128", "--providers", "eager"),
                    checkpoint=lambda d: seen.append(len(d["results"])))
    assert seen == [1, 2] and len(doc["results"]) == 2


def test_wrong_provider_hook_forward_only_mode():
    bench.EXTRA_PROVIDERS.append(Provider("wrong-fwd", _wrong_forward))
    try:
        doc = bench.run(_args("--op", "rms_norm", "--mode", "fwd", "--providers", "eager,ours,wrong-fwd"))
    finally:
        bench.EXTRA_PROVIDERS.clear()
    st = {r["provider"]: r["status"] for r in doc["results"]}
    assert st == {"eager": "ok", "ours": "ok", "wrong-fwd": "incorrect"}


def test_default_grids():
    for dt in (torch.float32, torch.bfloat16):
        grid = bench.default_grid(torch.device("cpu"), dt, quick=False)
        elt = torch.empty((), dtype=dt).element_size()
        assert {c for _, c in grid} == set(bench.CPU_COLS)
        sizes = [r * c * elt for r, c in grid]
        # in the caches, under glibc's largest mmap threshold, and beyond it (fresh pages every call)
        assert min(sizes) >= 3.5e6 and any(s < 32 * 2**20 for s in sizes) and max(sizes) >= 64e6
    cuda = bench.default_grid(torch.device("cuda"), torch.float32, quick=False)
    assert [c for _, c in cuda] == list(bench.CUDA_COLS) and all(r * c == 2**27 for r, c in cuda)


def test_block_runs_and_compares():
    args = _args("--block", "--no-grid", "--block-rows", "64", "--block-hidden", "64", "--quick")
    doc = bench.run(args)
    (blk,) = doc["block"]
    assert blk["torch_ms"] > 0 and blk["ours_ms"] > 0 and blk["max_rel_err_output"] < 1e-4
    assert doc["results"] == []


def test_calls_model_startup_and_noise_are_recorded():
    doc = bench.run(_args("--calls", "--model", "--startup", "--no-grid", "--quick"))
    cases = {(r["case"], r["rows"]) for r in doc["calls"]}
    assert ("LayerNorm module fwd (no_grad)", 1) in cases and ("layer_norm functional fwd+bwd (1 thread)", 128) in cases
    for r in doc["calls"]:
        assert r["torch_us"] > 0 and r["ours_us"] > 0 and r["spread_ours"] >= 0
    assert {m["tokens"] for m in doc["model"]} == {1, 64}
    for m in doc["model"]:
        assert m["norm_layers_patched"] == 13 and m["max_abs_diff_output"] < 1e-4
    assert doc["startup"]["native_loaded"] and doc["startup"]["first_call_s"] < 1.0
    noise = doc["noise"]
    assert set(noise) >= {"load_average_start", "load_average_end", "warnings", "trustworthy", "limits"}
    assert noise["trustworthy"] == (not noise["warnings"])


def test_noise_warnings():
    doc = {"noise": {"load_average_start": [3.0, 2.0, 1.0]}, "copy": [{"spread": 0.5}],
           "results": [{"frac_copy": 2.0, "spread": 0.4, "provider": "ours", "op": "layer_norm", "mode": "fwd"}]}
    noise = bench.assess_noise(doc)
    assert not noise["trustworthy"] and len(noise["warnings"]) == 3
    quiet = bench.assess_noise({"noise": {"load_average_start": [0.1, 0.1, 0.1]}, "copy": [{"spread": 0.02}],
                                "results": [{"frac_copy": 0.9, "spread": 0.03}]})
    assert quiet["trustworthy"]


def test_rnn_bench_quick_writes_valid_json(tmp_path):
    from layernorm.bench import rnn as rnn_bench

    argv = ["--quick", "--device", "cpu", "--modes", "LSTM", "--providers", "layernorm,torch", "--out", str(tmp_path)]
    assert rnn_bench.main(argv) == 0
    doc = json.loads((tmp_path / "rnn-cpu-quick-custom.json").read_text())
    assert doc["benchmark"] == "rnn" and doc["device"] == "cpu" and doc["quick"]
    assert doc["malloc"]["how"].startswith("absent")  # in-process: not re-executed
    if doc["recurrence_impl"] == "cpp":
        assert doc["recurrence_gemm"] in ("onednn", "mkl")
    else:
        assert doc["recurrence_gemm"] is None
    rows = doc["results"]
    assert {r["provider"] for r in rows} == {"layernorm", "torch"}
    assert {r["B"] for r in rows} == {1, 16}


class _Exec(Exception):
    pass


def _capture_execve(monkeypatch):
    from layernorm.bench import _malloc

    calls = []

    def fake_execve(path, args, env):
        calls.append((path, args, env))
        raise _Exec

    monkeypatch.setattr(_malloc.os, "execve", fake_execve)
    for k in (*_malloc.MALLOC_ADVICE, _malloc._REEXEC_MARK):
        monkeypatch.delenv(k, raising=False)
    return _malloc, calls


@pytest.mark.parametrize("argv", [["bench", "--quick"], ["bench", "--rnn", "--quick"]])
def test_cpu_bench_reexecutes_once_with_malloc_advice(monkeypatch, argv):
    _malloc, calls = _capture_execve(monkeypatch)
    with pytest.raises(_Exec):
        _malloc.maybe_reexec(argv, "cpu", disabled=False)
    path, args, env = calls[0]
    assert args[1:] == ["-m", "layernorm.cli", *argv]
    assert env[_malloc._REEXEC_MARK] == "1"
    for k, v in _malloc.MALLOC_ADVICE.items():
        assert env[k] == v


def test_no_reexec_when_disabled_done_set_or_cuda(monkeypatch):
    _malloc, calls = _capture_execve(monkeypatch)
    _malloc.maybe_reexec(["bench"], "cpu", disabled=True)
    _malloc.maybe_reexec(["bench"], "cuda", disabled=False)
    monkeypatch.setenv(_malloc._REEXEC_MARK, "1")
    _malloc.maybe_reexec(["bench"], "cpu", disabled=False)
    monkeypatch.delenv(_malloc._REEXEC_MARK)
    for k, v in _malloc.MALLOC_ADVICE.items():
        monkeypatch.setenv(k, v)
    _malloc.maybe_reexec(["bench"], "cpu", disabled=False)
    assert calls == []
    assert _malloc.malloc_state("cpu")["how"] == "inherited from the environment"
