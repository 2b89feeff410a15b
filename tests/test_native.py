"""The C++ extension: its CPU kernels against the reference on awkward shapes and numerics, bitwise
determinism across runs and thread counts, the cache of large outputs, fork safety, and the build
that happens once per environment (key, cache folders, announcement, failure and fallback)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import layernorm
from layernorm.backends import reference
from layernorm.native import loader

from tolerances import assert_close

pytestmark = pytest.mark.skipif(layernorm.ops.NATIVE is None, reason="the C++ extension is not built here")

FWD = torch.ops.layernorm.norm_forward
BWD = torch.ops.layernorm.norm_backward


def _inputs(M, N, dtype, residual, has_w, has_b, seed=0, wdtype=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, N, generator=g) * 3 + 1).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    wdt = wdtype or dtype
    w = (torch.randn(N, generator=g) + 1).to(wdt) if has_w else None
    b = torch.randn(N, generator=g).to(wdt) if has_b else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    dz = torch.randn(M, N, generator=g).to(dtype) if residual else None
    return x, r, w, b, dy, dz


def _check_against_reference(M, N, dtype, residual, rms, has_w=True, has_b=True, eps=1e-5, wdtype=None):
    x, r, w, b, dy, dz = _inputs(M, N, dtype, residual, has_w, has_b and not rms, wdtype=wdtype)
    got = FWD(x, r, [N], w, b, eps, rms, 0.0, False)
    exp = reference.forward(x, r, w, b, eps, rms)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, e in zip(("y", "z", "mean", "rstd"), got, exp):
        if e is None:
            assert a.numel() == 0, name
        else:
            assert_close(a, e, "fwd", dtype=dtype if name in ("y", "z") else stat, msg=lambda m, n=name: f"{n}: {m}")
    z = exp[1] if residual else x
    mask = [True, w is not None, b is not None]
    got = BWD(dy, dz, z, exp[2] if exp[2] is not None else torch.empty(0), exp[3], [N], w, b, rms, 0.0, False, mask)
    ref = reference.backward(dy, dz, z, w, b, exp[2], exp[3], rms)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, ref):
        if e is None:
            assert a.numel() == 0, name
        else:
            assert a.dtype == e.dtype, name
            assert_close(a, e, "bwd", dtype=dtype, msg=lambda m, n=name: f"{n}: {m}")


# Widths around every vector and block boundary of the kernels: lanes (8 floats, 4 doubles), the
# 4-way unroll (32), the summation block (512 floats), a 65537-column row.
WIDTHS = [1, 2, 7, 8, 9, 13, 31, 32, 33, 511, 512, 513, 1000, 4097]


@pytest.mark.parametrize("N", WIDTHS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_matches_reference_fp32(N, rms, residual):
    _check_against_reference(37, N, torch.float32, residual, rms)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N", [3, 8, 33, 1000])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_matches_reference_other_dtypes(dtype, N, rms):
    _check_against_reference(9, N, dtype, True, rms)


def test_low_precision_with_float32_parameters():
    _check_against_reference(5, 300, torch.bfloat16, True, False, wdtype=torch.float32)
    _check_against_reference(5, 300, torch.float16, False, True, wdtype=torch.float32)


@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_weight_bias_none(has_w, has_b, rms):
    _check_against_reference(9, 257, torch.float32, True, rms, has_w, has_b)


def test_wide_row_65537():
    _check_against_reference(2, 65537, torch.float32, True, False)


def test_many_rows_several_chunks():
    # dweight/dbias are summed over chunks of rows: more rows than one chunk, not a multiple of it
    _check_against_reference(1000, 300, torch.float32, False, False)


# ---- numerics -------------------------------------------------------------------------------------


def test_catastrophic_cancellation():
    # E[x^2] - E[x]^2 gives garbage (or NaN) here (onnxruntime #28463); two-pass gives the exact answer
    x = torch.tensor([[40000.0, 40001.0, 40002.0, 40003.0]])
    y, _, mean, rstd = FWD(x, None, [4], None, None, 0.0, False, 0.0, False)
    torch.testing.assert_close(mean, torch.tensor([40001.5]))
    torch.testing.assert_close(rstd, torch.tensor([1.25]).rsqrt())
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_huge_rows_do_not_overflow(rms):
    # |x| ~ 1e20: squares overflow float32; torch returns zeros, the reference rescales, so do we
    base = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
    x = base * 1e20
    y, _, _, rstd = FWD(x, None, [512], None, None, 1e-5, rms, 0.0, False)
    assert torch.isfinite(y).all() and (rstd > 0).all()
    assert_close(y, reference.forward(x, None, None, None, 1e-5, rms)[0], "fwd")
    assert_close(y, FWD(base, None, [512], None, None, 0.0, rms, 0.0, False)[0], "fwd")


def test_constant_rows_give_bias():
    x = torch.full((4, 100), 3.25)
    b = torch.linspace(-1, 1, 100)
    y = FWD(x, None, [100], torch.randn(100), b, 1e-5, False, 0.0, False)[0]
    assert torch.equal(y, b.expand(4, 100))
    # fp16 zeros with eps 1e-12 stay finite (pytorch #41527 is NaN in torch's fp16 backward)
    z16 = torch.zeros(2, 64, dtype=torch.float16, requires_grad=True)
    layernorm.layer_norm(z16, (64,), eps=1e-12).sum().backward()
    assert torch.isfinite(z16.grad).all()


def test_nan_inf_stay_in_their_row():
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y, _, mean, rstd = FWD(x, None, [64], None, None, 1e-5, False, 0.0, False)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).all()
    dx = BWD(torch.randn(4, 64), None, x, mean, rstd, [64], None, None, False, 0.0, False, [True, False, False])[0]
    assert torch.isfinite(dx[0]).all() and torch.isfinite(dx[3]).all()


# ---- determinism ------------------------------------------------------------------------------------


def _fwd_bwd(M, N, seed=3, dtype=torch.float32):
    x, r, w, b, dy, dz = _inputs(M, N, dtype, True, True, True, seed)
    y, z, mean, rstd = FWD(x, r, [N], w, b, 1e-5, False, 0.0, False)
    return (y, z, mean, rstd) + tuple(BWD(dy, dz, z, mean, rstd, [N], w, b, False, 0.0, False, [True, True, True]))


@pytest.mark.parametrize("shape", [(515, 300), (4000, 96), (8, 70001)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(shape, dtype):
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2, 1):
            torch.set_num_threads(n)
            runs.append(_fwd_bwd(*shape, dtype=dtype))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for name, a, b in zip(("y", "z", "mean", "rstd", "dx", "dweight", "dbias"), runs[0], other):
            assert torch.equal(a, b), name


# ---- large outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_streamed_outputs_have_the_bits_of_small_ones(dtype, rms):
    # Outputs of 32 MiB and more are written with streaming stores; every row must keep the bits it
    # has when computed in a small tensor (plain stores), in every storage dtype.
    N = 1024
    M = (32 << 20) // (N * dtype.itemsize) + 3
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(M, N, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.randn(N, generator=g) + 1).to(dtype)
    b = None if rms else torch.randn(N, generator=g).to(dtype)
    big = FWD(x, None, [N], w, b, 1e-5, rms, 0.0, False)[0]
    for rows in (slice(0, 7), slice(M // 2, M // 2 + 5), slice(M - 4, M)):
        small = FWD(x[rows].clone(), None, [N], w, b, 1e-5, rms, 0.0, False)[0]
        assert torch.equal(big[rows], small), rows
    del big
    layernorm.ops.NATIVE.release_output_cache()


def test_large_outputs_are_reused_not_refaulted():
    native = layernorm.ops.NATIVE
    native.release_output_cache()
    stats = native.output_cache_stats()
    rows = stats["min_bytes"] // (4 * 1024) + 1  # one output just above the threshold
    x = torch.randn(rows, 1024)
    y = layernorm.layer_norm(x, (1024,))
    ptr = y.data_ptr()
    del y
    after_free = native.output_cache_stats()
    assert after_free["cached_blocks"] == 1 and after_free["cached_bytes"] >= rows * 1024 * 4
    y2 = layernorm.layer_norm(x, (1024,))
    assert y2.data_ptr() == ptr, "the freed block was not reused"
    assert native.output_cache_stats()["cached_blocks"] == 0
    torch.testing.assert_close(y2, torch.nn.functional.layer_norm(x, (1024,)))
    # torch's semantics for the storage: resizable, and a small output is torch's own allocation
    y2.resize_(rows * 2, 1024)
    y2[rows:].fill_(1.0)
    assert layernorm.layer_norm(torch.randn(3, 8), (8,)).untyped_storage().resizable()
    del y2
    native.release_output_cache()
    assert native.output_cache_stats()["cached_bytes"] == 0


def test_cache_is_capped():
    stats = layernorm.ops.NATIVE.output_cache_stats()
    assert stats["cap_bytes"] <= 1 << 30


# ---- processes -----------------------------------------------------------------------------------------


def _python(code, env=None, timeout=600):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), timeout=timeout)
    return out


def test_forked_child_still_works():
    # a fork-started worker (a DataLoader's) after the kernels ran in the parent, threads as torch sets them
    out = _python(
        """
        import os, torch, layernorm
        x = torch.randn(512, 256)
        layernorm.layer_norm(x, (256,))
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)
            y = layernorm.layer_norm(x, (256,))
            ok = torch.allclose(y, torch.nn.functional.layer_norm(x, (256,)), atol=1e-5)
            os._exit(0 if ok else 3)
        print("CHILD", os.waitpid(pid, 0)[1])
        """
    )
    assert out.returncode == 0, out.stderr
    assert "CHILD 0" in out.stdout, out.stdout + out.stderr


def test_a_new_process_loads_without_building():
    """The build of this environment is found and loaded as it is: no announcement, no file rewritten."""
    library = loader._library(loader.build_folder())
    before = {p: p.stat().st_mtime_ns for p in library.parent.iterdir()}
    out = _python(
        """
        import torch
        import layernorm
        layernorm.layer_norm(torch.randn(1, 768), (768,))
        print(layernorm.ops.NATIVE is not None)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]
    assert "building" not in out.stderr
    assert {p: p.stat().st_mtime_ns for p in library.parent.iterdir()} == before


def test_import_does_not_load_the_compiler_stack():
    """`import layernorm` stays cheap: nothing imports torch._dynamo (about a second) or triton."""
    out = _python(
        """
        import sys
        import layernorm
        print(sorted(m for m in ("torch._dynamo", "triton", "transformers") if m in sys.modules))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- the build -------------------------------------------------------------------------------------------


def test_build_key_covers_what_the_binary_depends_on(monkeypatch):
    key = loader.build_key()
    assert loader.build_key() == key and len(key) == 16
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_torch = loader.build_key()
    monkeypatch.undo()
    monkeypatch.setattr(loader, "arch_flags", lambda: ("generic", []))
    other_isa = loader.build_key()
    assert len({key, other_torch, other_isa}) == 3


def test_environments_get_their_own_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERNORM_CACHE_DIR", str(tmp_path))
    mine = loader.build_folder()
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    theirs = loader.build_folder()
    assert mine.parent == theirs.parent == tmp_path and mine != theirs


def test_without_a_compiler_one_warning_and_torch_kernels(tmp_path):
    """No compiler: no crash, one warning naming the fix, the functional API runs on torch's kernels,
    and nothing is left pretending to be a build."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    out = _python(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import layernorm
            x = torch.randn(4, 16, requires_grad=True)
            y = layernorm.layer_norm(x, (16,))
            y.sum().backward()
            ok = torch.allclose(y, torch.nn.functional.layer_norm(x, (16,)))
        msgs = [str(w.message) for w in caught if "C++ extension" in str(w.message)]
        print(layernorm.ops.NATIVE is None, ok, len(msgs), layernorm.backends.choose_backend(x.device, x.dtype))
        print(msgs[0] if msgs else "")
        """,
        env={"LAYERNORM_CACHE_DIR": str(tmp_path / "cache"), "PATH": str(empty_bin), "CXX": "no-such-compiler"},
    )
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "True True 1 torch"
    assert "layernorm build" in message and "compiler" in message
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_a_failed_build_is_remembered_and_retried_on_request(tmp_path):
    """A compiler that fails: the build announces itself, fails once, is not retried by the next
    process, and `layernorm build --force` retries it (failing again here, with exit status 2)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    cxx = fake / "c++"
    cxx.write_text("#!/bin/sh\necho 'simulated compiler failure' >&2\nexit 1\n")
    cxx.chmod(0o755)
    env = {"LAYERNORM_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(cxx), "PATH": f"{fake}:{os.environ['PATH']}"}
    code = "import warnings; warnings.simplefilter('ignore'); import layernorm; print(layernorm.ops.NATIVE is None)"
    first = _python(code, env)
    assert first.returncode == 0 and first.stdout.strip() == "True", first.stderr
    assert "layernorm: building its C++ extension" in first.stderr  # announced, once, before compiling
    markers = list((tmp_path / "cache").rglob("build-failed.txt"))
    assert len(markers) == 1
    second = _python(code, env)
    assert second.stdout.strip() == "True" and "building" not in second.stderr
    retry = subprocess.run([sys.executable, "-m", "layernorm.cli", "build", "--force"], capture_output=True,
                           text=True, env=dict(os.environ, **env), timeout=600)
    assert retry.returncode == 2 and "could not be built" in retry.stderr
    assert "building its C++ extension" in retry.stderr
