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


def _args(mode, T, B, H, P, options, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0, offset=0.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
                                           + offset).to(dtype).requires_grad_(True)
    G = (4 if mode == "lstm" else 3) * H
    R = P or H
    masks = torch.Generator().manual_seed(seed + 1)
    mask = lambda p, *s: (torch.rand(*s, generator=masks) < p).to(dtype)  # noqa: E731
    lengths = torch.tensor([T - (b % 3) for b in range(B)]) if options else None
    kw = dict(recurrent_mask=mask(0.7, B, R) / 0.7 if options else None,
              zoneout_h=mask(0.2, T, B, R) if options else None)
    common = [r(T, B, G), lengths, r(B, R, scale=0.5)]
    if mode == "lstm":
        args = common + [r(B, H, scale=0.5), r(G, R, scale=R ** -0.5), r(G, scale=0.2, offset=1), r(G, scale=0.3),
                         r(G, scale=0.2, offset=1), r(H, scale=0.2, offset=1), r(H, scale=0.3)]
        kw.update(w_hr=r(R, H, scale=H ** -0.5) if P else None, zoneout_c=mask(0.3, T, B, H) if options else None)
    else:
        args = common + [r(G, H, scale=H ** -0.5), r(G, scale=0.2, offset=1), r(G, scale=0.3), r(G, scale=0.3),
                         r(G, scale=0.2, offset=1)]
    return args, kw


def _run(mode, args, kw, backend):
    fn = rnn.lstm_recurrence if mode == "lstm" else rnn.gru_recurrence
    res = fn(*args, **kw, backend=backend)
    g = torch.Generator().manual_seed(9)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)).sum() for x in res)
    leaves = [a for a in list(args) + list(kw.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    return list(res) + list(torch.autograd.grad(loss, leaves))


def _to(args, kw, dtype):
    conv = lambda a: a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731,E501
    return [conv(a) for a in args], {k: conv(v) for k, v in kw.items()}


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
    args, kw = _args(mode, 5, B, H, P, options, torch.float32)
    got = _run(mode, args, kw, "cpp")
    torch32 = _run(mode, args, kw, "torch")
    a64, k64 = _to(args, kw, torch.float64)
    truth = _run(mode, a64, k64, "reference")
    for k, (x, y, t) in enumerate(zip(got, torch32, truth)):
        assert_flash_rule(x, y, t, kind="fwd" if k < 3 else "bwd", dtype=torch.float32, name=f"output {k}")


def test_float32_results_do_not_depend_much_on_the_thread_count():
    args, kw = _args("lstm", 6, 9, 40, 0, True, torch.float32)
    outs = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        outs.append(_run("lstm", args, kw, "cpp"))
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
    args, kw = _args("lstm", 4, 6, 16, 0, False, torch.float32)
    with_dnn = _run("lstm", args, kw, "cpp")
    assert EXT.gemm_library() == "onednn" or not torch.backends.mkldnn.is_available()
    with torch.backends.mkldnn.flags(enabled=False):
        assert EXT.gemm_library() == "aten"
        without = _run("lstm", args, kw, "cpp")
    for k, (x, y) in enumerate(zip(without, with_dnn)):
        assert_close(x, y, kind="fwd" if k < 3 else "bwd", msg=f"output {k}")
    assert rnn.native_gemm_library() == EXT.gemm_library()
