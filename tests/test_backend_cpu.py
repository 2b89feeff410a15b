"""Tests specific to the ``cpu`` (numba) backend: agreement with the reference on awkward shapes,
edge numerics, bitwise determinism across runs and numba thread counts, the on-disk compile cache,
and the threading configuration that keeps torch's own thread pool fast."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

numba = pytest.importorskip("numba")

from layernorm.backends import cpu, reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::numba.NumbaPerformanceWarning")

TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(M, N, dtype, residual, has_w, has_b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, N, generator=g) * 3 + 1).to(dtype)
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    wdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    w = (torch.randn(N, generator=g) + 1).to(wdt) if has_w else None
    b = torch.randn(N, generator=g).to(wdt) if has_b else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    dz = torch.randn(M, N, generator=g).to(dtype) if residual else None
    return x, r, w, b, dy, dz


def _close(a, b, dtype, **kw):
    assert (a is None) == (b is None)
    if a is not None:
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **(kw or TOL.get(dtype, {})))


def _check_against_reference(M, N, dtype, residual, rms, has_w, has_b, eps=1e-5, bwd_tol=None):
    x, r, w, b, dy, dz = _inputs(M, N, dtype, residual, has_w, has_b)
    got = cpu.forward(x, r, w, b, eps, rms)
    exp = reference.forward(x, r, w, b, eps, rms)
    for a, e in zip(got, exp):
        _close(a, e, dtype)
    z = exp[1] if residual else x
    got = cpu.backward(dy, dz, z, w, b, exp[2], exp[3], rms)
    ref = reference.backward(dy, dz, z, w, b, exp[2], exp[3], rms)
    for a, e in zip(got, ref):
        _close(a, e, dtype, **(bwd_tol or {}))


@pytest.mark.parametrize("N", [1, 2, 13, 31, 1000, 4097])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_reference_fp32(N, rms, residual):
    # dweight sums over rows in a different order than the reference: allow for it.
    _check_against_reference(37, N, torch.float32, residual, rms, True, True, bwd_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("has_w,has_b", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("rms", [False, True])
def test_weight_bias_none(has_w, has_b, rms):
    _check_against_reference(9, 257, torch.float32, True, rms, has_w, has_b, bwd_tol=dict(rtol=1e-4, atol=1e-4))


def test_wide_row_65537():
    _check_against_reference(2, 65537, torch.float32, True, False, True, True, bwd_tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("rms", [False, True])
def test_float64(rms):
    _check_against_reference(11, 1000, torch.float64, True, rms, True, True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_upcasts(dtype):
    # Computed in float32 from the same rounded z as the reference, so they agree to the output rounding.
    _check_against_reference(5, 300, dtype, True, False, True, True)


def test_many_rows_chunks():
    # More rows than partial chunks, M not a multiple of the chunk size.
    _check_against_reference(1000, 64, torch.float32, False, False, True, True, bwd_tol=dict(rtol=1e-4, atol=1e-4))


def test_empty():
    x = torch.empty(0, 8)
    y, z, mean, rstd = cpu.forward(x, None, None, None, 1e-5, False)
    assert y.shape == (0, 8) and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = cpu.backward(x, None, x, torch.ones(8), torch.zeros(8), mean, rstd, False)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


# ---------------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------------


def test_catastrophic_cancellation():
    # E[x^2] - E[x]^2 gives garbage (or NaN) here; two-pass gives the exact answer.
    x = torch.tensor([[40000.0, 40001.0, 40002.0, 40003.0]])
    y, _, mean, rstd = cpu.forward(x, None, None, None, 0.0, False)
    torch.testing.assert_close(mean, torch.tensor([40001.5]))
    torch.testing.assert_close(rstd, torch.tensor([1.25]).rsqrt())
    assert torch.isfinite(y).all()


def test_huge_rows_do_not_overflow():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 512, generator=g)
    x = base * 1e20  # squares overflow float32
    y, _, _, rstd = cpu.forward(x, None, None, None, 1e-5, False)
    assert torch.isfinite(y).all() and (rstd > 0).all()
    y_small, _, _, _ = cpu.forward(base, None, None, None, 0.0, False)
    torch.testing.assert_close(y, y_small, rtol=1e-4, atol=1e-4)
    exp = reference.forward(x, None, None, None, 1e-5, False)
    torch.testing.assert_close(y, exp[0], rtol=1e-4, atol=1e-4)
    # RMSNorm too
    y, _, _, _ = cpu.forward(x, None, None, None, 1e-5, True)
    torch.testing.assert_close(y, reference.forward(x, None, None, None, 1e-5, True)[0], rtol=1e-4, atol=1e-4)


def test_constant_rows_give_bias():
    x = torch.full((4, 100), 3.25)
    b = torch.linspace(-1, 1, 100)
    y, _, _, _ = cpu.forward(x, None, torch.randn(100), b, 1e-5, False)
    assert torch.equal(y, b.expand(4, 100))
    y, _, _, _ = cpu.forward(torch.zeros(2, 100, dtype=torch.float64), None, None, None, 1e-12, False)
    assert torch.equal(y, torch.zeros(2, 100, dtype=torch.float64))


def test_nan_inf_stay_in_their_row():
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    y, _, _, _ = cpu.forward(x, None, None, None, 1e-5, False)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).all()
    dy = torch.randn(4, 64)
    _, _, mean, rstd = cpu.forward(x, None, None, None, 1e-5, False)
    dx, _, _ = cpu.backward(dy, None, x, None, None, mean, rstd, False)
    assert torch.isfinite(dx[0]).all() and torch.isfinite(dx[3]).all()


# ---------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------


def _bwd_once(seed=3, M=515, N=300):
    x, r, w, b, dy, dz = _inputs(M, N, torch.float32, True, True, True, seed)
    y, z, mean, rstd = cpu.forward(x, r, w, b, 1e-5, False)
    return (y, z, mean, rstd) + cpu.backward(dy, dz, z, w, b, mean, rstd, False)


def test_bitwise_deterministic_across_runs():
    a, b = _bwd_once(), _bwd_once()
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_bitwise_deterministic_across_thread_counts():
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba pool has a single thread")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # configure_threads follows torch's count
        one = _bwd_once()
        assert numba.get_num_threads() == 1
        torch.set_num_threads(2)
        two = _bwd_once()
        assert numba.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for u, v in zip(one, two):
        assert torch.equal(u, v)


def test_chunking_depends_on_rows_only():
    assert cpu.chunk_rows(1) == 1
    assert cpu.chunk_rows(64) == 16
    assert cpu.chunk_rows(1000) == 16
    assert cpu.chunk_rows(8192) == 128


# ---------------------------------------------------------------------------------------------------
# threading configuration (the mechanism that keeps torch's GEMMs fast next to our kernels)
# ---------------------------------------------------------------------------------------------------


def test_threading_layer_and_thread_count():
    cpu.forward(torch.randn(8, 32), None, None, None, 1e-5, False)  # launches the pool
    if os.environ.get("NUMBA_THREADING_LAYER"):
        pytest.skip("the user chose numba's threading layer")
    assert cpu.THREADING_LAYER in ("omp", "workqueue")
    assert numba.threading_layer() == cpu.THREADING_LAYER
    assert numba.get_num_threads() == min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


def test_numba_openmp_binds_to_torch_runtime():
    """With the omp layer, numba's OpenMP calls must resolve to torch's libgomp (one shared pool), not to
    the second libgomp that numba's omppool names."""
    if not sys.platform.startswith("linux"):
        pytest.skip("uses glibc's LD_DEBUG")
    code = textwrap.dedent(
        """
        import torch, numba
        from layernorm.backends import cpu
        cpu.forward(torch.randn(64, 64), None, None, None, 1e-5, False)
        print("LAYER", numba.threading_layer())
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    env["LD_DEBUG"] = "bindings"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    layer = out.stdout.split("LAYER")[-1].strip()
    if layer != "omp":
        pytest.skip(f"numba runs the {layer} layer here (no OpenMP)")
    lines = [l for l in out.stderr.splitlines() if "omppool" in l and "`GOMP_parallel'" in l]
    assert lines, "no binding of GOMP_parallel from numba's omppool seen"
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    assert all(torch_lib in l.split(" to ")[1] for l in lines), lines


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_still_works():
    # GNU OpenMP is not fork-safe; a child forked after our kernels ran falls back to the torch backend.
    code = textwrap.dedent(
        """
        import os, torch
        from layernorm.backends import cpu, reference
        x = torch.randn(16, 64)
        cpu.forward(x, None, None, None, 1e-5, False)
        pid = os.fork()
        if pid == 0:
            torch.set_num_threads(1)  # what DataLoader workers do: torch's OpenMP is not fork-safe either
            y = cpu.forward(x, None, None, None, 1e-5, False)[0]
            ok = torch.allclose(y, reference.forward(x, None, None, None, 1e-5, False)[0], atol=1e-5)
            os._exit(0 if ok else 3)
        print("CHILD", os.waitpid(pid, 0)[1])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "CHILD 0" in out.stdout, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------------
# on-disk compile cache
# ---------------------------------------------------------------------------------------------------


def test_second_process_uses_disk_cache(tmp_path):
    """A second process loads the compiled kernels instead of compiling them (< 1 s, with slack for a
    busy machine: compiling takes well over 5 s)."""
    code = textwrap.dedent(
        """
        import time, torch, numba
        from layernorm.backends import cpu
        x = torch.randn(64, 256); w = torch.randn(256)
        t = time.perf_counter()
        y, z, m, r = cpu.forward(x, None, w, w, 1e-5, False)
        cpu.backward(x, None, x, w, w, m, r, False)
        print(time.perf_counter() - t)
        """
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    assert any(tmp_path.rglob("*.nbi")), "numba wrote no cache index"
    cold, warm = runs
    assert warm < 3.0, f"first call in a warm-cache process took {warm:.2f} s (cold: {cold:.2f} s)"
    assert warm < cold / 2, f"warm {warm:.2f} s is not much faster than cold {cold:.2f} s"
