"""What is particular to the C++ recurrence (native/csrc/rnn.cpp), beyond the contract tests.

The time loop runs in one OpenMP region whose work split depends on the batch and the thread count
(rows per thread for B >= 2 threads, else columns per thread with barriers), and its float32 step
GEMM is oneDNN's BRGEMM (or BLAS, the A/B alternative). Every split, thread count and GEMM kernel is
held here in float32 to the float64 reference with flash-attn's rule (at most twice the error of the
torch-ops implementation in float32, plus the table's atol); the large GEMMs (input projection, its
backward) through the extension equal torch.matmul; and the oneDNN switch.
"""
from __future__ import annotations

import pytest
import torch

from layernorm import rnn
from layernorm.rnn import dispatch

from _rnn_cases import cast, recurrence_args, run_recurrence
from tolerances import assert_close, assert_flash_rule

EXT = dispatch.native()
pytestmark = pytest.mark.skipif(EXT is None, reason="the C++ extension is not built here")


@pytest.fixture(autouse=True)
def _restore():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if EXT is not None:
        EXT._set_step_gemm("brgemm")


SPLITS = [  # (threads, B): B >= 2 * threads splits rows, smaller B splits columns with barriers
    (1, 1), (1, 5), (2, 1), (2, 3), (2, 4), (2, 33), (3, 2), (3, 7),
]


@pytest.mark.parametrize("step_gemm", ["brgemm", "blas"])
@pytest.mark.parametrize("threads,B", SPLITS)
@pytest.mark.parametrize("mode,H,P,options", [("lstm", 24, 0, False), ("lstm", 20, 7, True), ("gru", 24, 0, False),
                                              ("gru", 19, 0, True)])
def test_float32_every_split_against_float64(step_gemm, threads, B, mode, H, P, options):
    EXT._set_step_gemm(step_gemm)
    torch.set_num_threads(threads)
    args, kw = recurrence_args(mode, 5, B, H, P, options, torch.float32)
    got = run_recurrence(mode, args, kw, "cpp")
    torch32 = run_recurrence(mode, args, kw, "torch")
    a64, k64 = cast(args, kw, torch.float64)
    truth = run_recurrence(mode, a64, k64, "reference")
    for k, (x, y, t) in enumerate(zip(got, torch32, truth)):
        assert_flash_rule(x, y, t, kind="fwd" if k < 3 else "bwd", dtype=torch.float32, name=f"output {k}")


def test_float32_results_do_not_depend_much_on_the_thread_count():
    args, kw = recurrence_args("lstm", 6, 9, 40, 0, True, torch.float32)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(run_recurrence("lstm", args, kw, "cpp"))
    for other in outs[1:]:
        for k, (x, y) in enumerate(zip(other, outs[0])):
            assert_close(x, y, kind="fwd" if k < 3 else "bwd", msg=f"output {k}")


def test_step_gemm_switch_is_checked():
    with pytest.raises(RuntimeError, match="step GEMM must be 'brgemm' or 'blas'"):
        EXT._set_step_gemm("mkl")


@pytest.mark.parametrize("T,B,I,N", [(1, 1, 1, 4), (3, 7, 13, 20), (5, 2, 64, 96)])
def test_input_projection_matches_matmul(T, B, I, N):
    from layernorm.rnn.impl_cpp import linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, I, generator=g, requires_grad=True)
    w = torch.randn(N, I, generator=g, requires_grad=True)
    dy = torch.randn(T, B, N, generator=g)
    y = linear(x, w)
    y_ref = torch.matmul(x, w.t())
    assert_close(y, y_ref)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = torch.autograd.grad(y_ref, (x, w), dy)
    assert_close(gx, rx, kind="bwd")
    assert_close(gw, rw, kind="bwd")


@pytest.mark.filterwarnings("ignore:TF32 acceleration:UserWarning")
def test_without_onednn_the_large_gemms_use_aten():
    args, kw = recurrence_args("lstm", 4, 6, 16, 0, False, torch.float32)
    with_dnn = run_recurrence("lstm", args, kw, "cpp")
    assert EXT.gemm_library() == "onednn" or not torch.backends.mkldnn.is_available()
    with torch.backends.mkldnn.flags(enabled=False):
        assert EXT.gemm_library() == "aten"
        without = run_recurrence("lstm", args, kw, "cpp")
    for k, (x, y) in enumerate(zip(without, with_dnn)):
        assert_close(x, y, kind="fwd" if k < 3 else "bwd", msg=f"output {k}")
    assert rnn.native_gemm_library() == EXT.gemm_library()
