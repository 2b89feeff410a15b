"""The Triton backend's launch table: built-in rule, JSON overrides and their validation, and the
tuner (``layernorm bench --tune``) end to end.

Runs on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1; tests/conftest.py sets it when
there is no CUDA device), or on CUDA tensors where a GPU is visible and the interpreter is off.
"""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the first `import triton`

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from layernorm import backends, cli  # noqa: E402
from layernorm.backends import reference  # noqa: E402

tb = pytest.importorskip("layernorm.backends.triton")
from layernorm.bench import tune  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP else "cuda"
if INTERP and type(tb._fwd_fused).__name__ != "InterpretedFunction":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
if not INTERP and not torch.cuda.is_available():
    pytest.skip("no CUDA device and no TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _no_table_env(monkeypatch):
    monkeypatch.delenv(tb.TABLE_ENV, raising=False)
    yield
    tb.load_table.cache_clear()


def write(tmp_path, doc, name="table.json"):
    p = tmp_path / name
    p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return str(p)


# ------------------------------------------------------------------------------------ built-in rule
def test_builtin_rule_is_the_documented_table():
    L = tb.Launch
    assert tb.builtin_launch("fwd", 1024) == L("fused", 16, rows=4)
    assert tb.builtin_launch("fwd", 8192) == L("fused", 16, rows=1)
    assert tb.builtin_launch("fwd", 64) == L("fused", 16, rows=64)
    assert tb.builtin_launch("fwd", 16384) == L("wide", 16, block=4096)
    assert tb.builtin_launch("bwd", 1024) == L("fused", 8, rows=2, programs_per_sm=4)
    assert tb.builtin_launch("bwd", 4096) == L("fused", 16, rows=1, programs_per_sm=2)
    assert tb.builtin_launch("bwd", 8192) == L("wide", 16, block=4096, programs_per_sm=2)
    assert tb.BUILTIN.lookup("bwd", torch.bfloat16, 1024) == tb.builtin_launch("bwd", 1024)


def test_fused_tile_shrinks_with_few_rows():
    cfg = tb.Launch("fused", 16, rows=64)                # bucket 64: 64 x 64 tile, 16 warps
    assert tb._fused_tile(cfg, 1000) == (64, 16)
    assert tb._fused_tile(cfg, 5) == (8, 4)               # next_pow2(5) rows, warps scaled, >= 4
    assert tb._fused_tile(cfg, 20) == (32, 8)
    assert tb._fused_tile(tb.Launch("fused", 2, rows=8), 1) == (1, 2)   # never below min(4, warps)


# ------------------------------------------------------------------------------------- JSON tables
def test_partial_entries_take_the_rest_from_the_builtin_rule(tmp_path):
    doc = {"schema": tb.TABLE_SCHEMA, "device": "test",
           "fwd": {"1024": {"num_warps": 8}, "16384": {"kernel": "fused", "rows": 1, "num_warps": 32}},
           "bwd": {"8192": {"programs_per_sm": 4}},
           "dtypes": {"bfloat16": {"fwd": {"1024": {"rows": 2}}}}}
    t = tb.load_table(write(tmp_path, doc))
    assert t.lookup("fwd", torch.float32, 1024) == tb.Launch("fused", 8, rows=4)
    assert t.lookup("fwd", torch.bfloat16, 1024) == tb.Launch("fused", 16, rows=2)   # dtype section first
    assert t.lookup("fwd", "float32", 16384) == tb.Launch("fused", 32, rows=1)
    assert t.lookup("bwd", "float32", 8192) == tb.Launch("wide", 16, block=4096, programs_per_sm=4)
    assert t.lookup("fwd", "float32", 2048) == tb.builtin_launch("fwd", 2048)       # not listed
    assert t.info["device"] == "test"
    back = tb.table_from_dict(t.to_dict())
    assert back.entries == t.entries


@pytest.mark.parametrize("doc,where", [
    ({"fwd": {"1024": {"num_warps": 3}}}, "fwd['1024'].num_warps"),
    ({"fwd": {"1024": {"num_warps": 64}}}, "fwd['1024'].num_warps"),
    ({"fwd": {"1024": {"rows": 3}}}, "fwd['1024'].rows"),
    ({"fwd": {"4096": {"rows": 32}}}, "fwd['4096'].rows"),               # 32 * 4096 > 65536
    ({"fwd": {"1024": {"num_warps": "8"}}}, "fwd['1024'].num_warps"),
    ({"fwd": {"1024": {"num_warps": True}}}, "fwd['1024'].num_warps"),
    ({"fwd": {"1024": {"warps": 8}}}, "fwd['1024'].warps"),
    ({"fwd": {"1024": {"programs_per_sm": 2}}}, "fwd['1024'].programs_per_sm"),
    ({"fwd": {"1024": {"kernel": "split"}}}, "fwd['1024'].kernel"),
    ({"fwd": {"1024": {"kernel": "fused", "block": 2048}}}, "fwd['1024'].block"),
    ({"fwd": {"16384": {"rows": 2}}}, "fwd['16384'].rows"),               # wide: one row at a time
    ({"fwd": {"16384": {"block": 3000}}}, "fwd['16384'].block"),
    ({"bwd": {"1024": {"programs_per_sm": 0}}}, "bwd['1024'].programs_per_sm"),
    ({"fwd": {"1000": {"num_warps": 8}}}, "fwd['1000']"),
    ({"fwd": {"wide": {"num_warps": 8}}}, "fwd['wide']"),
    ({"fwd": [1, 2]}, "fwd"),
    ({"fwd": {"1024": 8}}, "fwd['1024']"),
    ({"fwds": {}}, "fwds"),
    ({"dtypes": {"int8": {}}}, "dtypes['int8']"),
    ({"dtypes": {"bfloat16": {"fwd": {"1024": {"rows": 0}}}}}, "dtypes['bfloat16'].fwd['1024'].rows"),
    ({"dtypes": {"bfloat16": {"forward": {}}}}, "dtypes['bfloat16'].forward"),
    ({"schema": "layernorm-triton-table/0"}, "schema"),
    ([], ""),
])
def test_bad_tables_name_the_file_and_the_key(tmp_path, doc, where):
    path = write(tmp_path, doc)
    with pytest.raises(tb.TableError) as exc:
        tb.load_table(path)
    msg = str(exc.value)
    assert msg.startswith(path + ":"), msg
    assert where in msg, msg


def test_unreadable_files(tmp_path):
    with pytest.raises(tb.TableError, match="not valid JSON"):
        tb.load_table(write(tmp_path, "{fwd: "))
    missing = str(tmp_path / "nope.json")
    with pytest.raises(tb.TableError, match="cannot read"):
        tb.load_table(missing)


def test_device_names_and_packaged_tables():
    assert tb.device_table_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tb.device_table_name("NVIDIA H200") == "nvidia-h200"
    assert tb._device_table("No Such GPU 9000") is tb.BUILTIN     # no file: the built-in rule
    # every table shipped with the package loads
    if os.path.isdir(tb.TABLES_DIR):
        for f in sorted(os.listdir(tb.TABLES_DIR)):
            if f.endswith(".json"):
                tb.load_table(os.path.join(tb.TABLES_DIR, f))


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's grid and meta-parameters."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(dict(grid=tuple(grid), **{k: v for k, v in kw.items() if k.isupper() or k == "num_warps"}))
            return self.kernel[grid](*args, **kw)
        return launch


def _inputs(M, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b, dy = (torch.randn(*s, generator=g).to(DEVICE) for s in ((M, N), (N,), (N,), (M, N)))
    return x, w, b, dy


def test_env_table_changes_the_launch_not_the_result(tmp_path, monkeypatch):
    log = []
    for name in ("_fwd_fused", "_fwd_wide", "_bwd_fused", "_bwd_wide_rows", "_bwd_wide_cols"):
        monkeypatch.setattr(tb, name, _Spy(getattr(tb, name), log))
    M, N = 37, 200                                           # bucket 256
    x, w, b, dy = _inputs(M, N)
    ref = reference.forward(x, None, w, b, 1e-5, False)
    rgrad = reference.backward(dy, None, x, w, b, ref[2], ref[3], False)

    tb.forward(x, None, w, b, 1e-5, False)                   # built-in: 16 rows x 256, 16 warps
    assert log[-1]["BLOCK_M"] == 16 and log[-1]["num_warps"] == 16 and log[-1]["grid"] == (3,)
    doc = {"fwd": {"256": {"rows": 2, "num_warps": 1}},
           "bwd": {"256": {"kernel": "wide", "block": 64, "num_warps": 2, "programs_per_sm": 1}}}
    monkeypatch.setenv(tb.TABLE_ENV, write(tmp_path, doc))
    log.clear()
    y, _, mean, rstd = tb.forward(x, None, w, b, 1e-5, False)
    assert log == [dict(grid=(19,), ACC=log[0]["ACC"], HAS_RES=False, HAS_W=True, HAS_B=True, RMS=False, ROUND=False,
                        BLOCK_M=2, BLOCK_N=256, num_warps=1)]
    torch.testing.assert_close(y, ref[0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(rstd, ref[3], rtol=2e-5, atol=2e-5)
    log.clear()
    grads = tb.backward(dy, None, x, w, b, mean, rstd, False)
    assert [e["BLOCK_N"] for e in log] == [64, 64] and all(e["num_warps"] == 2 for e in log)
    assert log[1]["grid"][0] == 4                             # 4 column blocks x row groups
    if DEVICE == "cpu":
        assert log[1]["grid"] == (4, 1)                       # ceil(4 "SMs" * 1 / 4 blocks) = 1 group
    for a, e in zip(grads, rgrad):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
    # the dtype section applies to its dtype only
    monkeypatch.setenv(tb.TABLE_ENV, write(tmp_path, {"dtypes": {"float64": {"fwd": {"256": {"rows": 4}}}}}, "t2.json"))
    log.clear()
    tb.forward(x, None, w, b, 1e-5, False)
    assert log[-1]["BLOCK_M"] == 16


def test_use_table_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(tb.TABLE_ENV, write(tmp_path, {"fwd": {"256": {"rows": 2}}}))
    x = torch.zeros(4, 200, device=DEVICE)
    assert tb.active_table(x).lookup("fwd", x.dtype, 256).rows == 2
    with tb.use_table({"fwd": {"256": {"rows": 8}}}) as t:
        assert tb.active_table(x) is t and t.lookup("fwd", x.dtype, 256).rows == 8
    assert tb.active_table(x).lookup("fwd", x.dtype, 256).rows == 2
    info = tb.table_info(x.device)
    assert info["source"].endswith("table.json") and info["entries"] == 1 and info["env"] == info["source"]
    monkeypatch.setenv(tb.TABLE_ENV, write(tmp_path, {"fwd": {"256": {"rows": 1000}}}, "bad.json"))
    with pytest.raises(tb.TableError, match=r"bad\.json: fwd\['256'\]\.rows"):
        tb.forward(x, None, None, None, 1e-5, False)


# --------------------------------------------------------------------------------------------- tuner
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("bucket", [1, 64, 1024, 4096, 8192, 16384, 131072])
def test_candidates_are_legal_and_start_with_the_builtin(direction, bucket):
    for limit in (1, 3, 12):
        cs = tune.candidates(direction, bucket, limit)
        assert cs[0] == tb.builtin_launch(direction, bucket)
        assert 1 <= len(cs) <= limit and len(set(cs)) == len(cs)
        for c in cs:
            tb._check_launch(direction, bucket, c, "candidate")
    kernels = {c.kernel for c in tune.candidates(direction, bucket, 12)}
    both = {"fwd": (8192, 16384), "bwd": (4096, 8192)}[direction]
    assert (kernels == {"fused", "wide"}) == (bucket in both)
    best = tb.builtin_launch("bwd", bucket)
    pv = tune.pps_variants(best, 3)
    assert len(pv) == 3 and all(p.programs_per_sm != best.programs_per_sm for p in pv)


def test_tune_needs_cuda_or_the_interpreter(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--tune", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "TRITON_INTERPRET=1" in err and "Traceback" not in err


def test_tune_quick_end_to_end(tmp_path, capsys, monkeypatch):
    """`layernorm bench --tune --quick` on tiny shapes writes a table the backend loads and uses."""
    out = tmp_path / "res"
    argv = ["bench", "--tune", "--quick", "--cols", "64,4100", "--rows", "5", "--max-candidates", "5",
            "--iters", "2", "--warmup", "1", "--out", str(out), "--tag", "t"]
    if not INTERP:
        argv += ["--device", "cuda"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "[8/8] float32 bwd 5x4100" in printed and "wrote" in printed
    timings = json.loads((out / "triton-tune-t.json").read_text())
    assert timings["schema"] == tune.SCHEMA and timings["complete"] and timings["stopped"] is None
    groups = timings["groups"]
    assert [(g["dtype"], g["direction"], g["width"]) for g in groups][:2] == [("bfloat16", "fwd", 64),
                                                                          ("bfloat16", "bwd", 64)]
    assert len(groups) == 8
    for g in groups:
        assert g["winner"] is not None and g["default_ms"] > 0
        assert 2 <= len(g["candidates"]) <= 5
        for c in g["candidates"]:
            assert c["error"] is None and c["ok"], c
    # both kernel families were tried at 4100 columns (bucket 8192), forward and backward
    for d in ("fwd", "bwd"):
        g = next(g for g in groups if g["width"] == 4100 and g["direction"] == d)
        assert {c["launch"]["kernel"] for c in g["candidates"]} == {"fused", "wide"}
    path = str(out / "triton-table-t.json")
    table = tb.load_table(path)
    assert {k[:2] for k in table.entries} == {(d, dt) for d in ("fwd", "bwd") for dt in ("bfloat16", "float32")}
    assert {k[2] for k in table.entries} == {64, 8192}
    # the written table drives the backend and results still match the reference
    monkeypatch.setenv(tb.TABLE_ENV, path)
    x, w, b, dy = _inputs(6, 4100, seed=3)
    y, _, mean, rstd = tb.forward(x, None, w, b, 1e-5, False)
    ref = reference.forward(x, None, w, b, 1e-5, False)
    torch.testing.assert_close(y, ref[0], rtol=2e-5, atol=2e-5)
    for a, e in zip(tb.backward(dy, None, x, w, b, mean, rstd, False),
                    reference.backward(dy, None, x, w, b, ref[2], ref[3], False)):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
