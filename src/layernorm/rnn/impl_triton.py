"""The ``"triton"`` implementation: per step one cuBLAS GEMM and ONE fused Triton kernel.

Same algorithm, arguments and saved tensors as :mod:`layernorm.rnn.impl_torch` (read it first; the
contract is :mod:`layernorm.rnn.contract`); only the per-step elementwise work moves into one kernel,
so a step costs one GEMM plus one launch instead of 22-28 (forward) and 55 (backward) launches of
torch ops (LSTM; docs/rnn_fast.md). The input LN of all steps runs before the loop (forward) and
after it (backward) in torch ops, as in ``impl_torch``.

Forward, per step ``t``: ``hw = (h_{t-1} ⊙ ρ) W_hhᵀ`` (``torch.mm``), then ``_lstm_fwd_step`` /
``_gru_fwd_step``: the LN of ``hw`` (LSTM over the row's 4H entries; GRU over the [r, u] block and
over the n block), its gain, ``+ x̂_t g_ih + b``, the gate non-linearities, the cell update, ``LN(c)``
(or ``tanh(c)``), zoneout, the length mask (rows past their length keep their state and output 0),
``out[t]``, the new state in place and, for training, the saved tensors. With a projection (LSTMP)
the kernel writes ``m = o ⊙ tanh(LN(c̃))``, and the host multiplies by ``W_hrᵀ`` and updates h.

Backward, per step in reverse: ``_lstm_bwd_step`` / ``_gru_bwd_step`` (the cell-LN backward with
``tanh(LN(c̃))`` recomputed, the gate gradients, the recurrent-LN backward ``dhw[t]``, the new carries),
then ``dh_mm = (dhw[t] W_hh) ⊙ ρ`` (``torch.mm``).

Batch sums (``ln_hh_weight``, ``ln_cell_*``, GRU ``b_hh^n``) accumulate into one (B, width) row per
batch row in the accumulation dtype; every element has one writer per step and the steps run in
order, so there are no atomics, and ``sum(0)`` after the loop makes two runs bitwise equal.

Layout: one program owns ``BLOCK_M`` batch rows; each gate block of a row is its own
``[BLOCK_M, BLOCK_H]`` register tile (``BLOCK_H = next_pow2(H)``). Statistics are an exact two-pass
in ``ACC`` (float32; float64 for float64). bfloat16/float16 compute in float32 and store in the input
dtype, except the carries that never meet a GEMM (``c``, ``dc``, ``direct``), which stay in ACC.
Rows much wider than H = 2048 spill registers (slow but correct).

Imported only when chosen (:mod:`layernorm.rnn.dispatch`): for CUDA tensors, or for CPU tensors
under ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .contract import GRUArgs, LSTMArgs, stats_dtype
from .impl_torch import TorchOps, _input_ln, _input_ln_backward

__all__ = ["TritonImpl"]

try:  # what a GPU's Triton raises when a kernel cannot be built for it
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources
    _COMPILE_ERRORS: tuple = (CompilationError, OutOfResources)
except ImportError:  # pragma: no cover - other Triton layouts
    _COMPILE_ERRORS = ()
_BROKEN: dict = {}  # method name -> the error that made it fall back, once per process

_ROW_TILE = 512   # elements per gate tile: rows per program = _ROW_TILE // next_pow2(H), at least 1


def _tile(B: int, H: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps). Wide rows get one row per program: a step is latency-bound,
    so more programs in flight beat fuller ones. About 4 elements of each gate tile per thread."""
    block_h = triton.next_power_of_2(H)
    block_m = max(1, min(_ROW_TILE // block_h, triton.next_power_of_2(max(B, 1))))
    return block_m, block_h, max(1, min(16, block_m * block_h // 128))


def _acc(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return tl.float32
    raise ValueError(f"backend='triton' supports float16, bfloat16, float32 and float64, but got {dtype}")


def _device_ctx(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# kernels. Offsets: `o1` addresses a (B, H) step slice, `oG` gate 0 of a (B, G*H) one (gate k: + k*H);
# `s1`, `sG` are the int64 starts of step t in (T, B, H) / (T, B, G*H) tensors; `st` the row of
# step t in a (T, B, n_stats) statistics tensor.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _ld(P, offs, mask, ACC: tl.constexpr):
    return tl.load(P + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # exp of -2|x| never overflows; the absolute error near 0 is one ulp of 1
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def _rows(t, B, H, LEN, HAS_LEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Row and column indices of this program, the (row, col) mask, `live` (the mask restricted to rows
    whose sequence is still running at step t) and `run_row` (per row: in range and running)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                # [BLOCK_M]
    cols = tl.arange(0, BLOCK_H)                                             # [BLOCK_H]
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < H)[None, :]
    if HAS_LEN:
        run_row = row_ok & (t < tl.load(LEN + rows, mask=row_ok, other=0))
    else:
        run_row = row_ok
    live = mask & run_row[:, None]
    return rows, cols, row_ok, mask, live, run_row


@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_step(
    HW, XB, G, WC, BC, HS, CST, ZH, ZC, LEN, OUT, M, HW_HAT, GATES, CS, STATS,
    t, B, H, eps,
    ACC: tl.constexpr, CELL_NORM: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr,
    ZONE_H: tl.constexpr, ZONE_C: tl.constexpr, PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live, run_row = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s4 = s1 * 4
    # LN of the recurrent pre-activation over the row's 4H entries, two-pass
    a_i = _ld(HW, o4, mask, ACC)
    a_f = _ld(HW, o4 + H, mask, ACC)
    a_g = _ld(HW, o4 + 2 * H, mask, ACC)
    a_o = _ld(HW, o4 + 3 * H, mask, ACC)
    mean1 = (tl.sum(a_i, 1) + tl.sum(a_f, 1) + tl.sum(a_g, 1) + tl.sum(a_o, 1)) / (4 * H)  # [BLOCK_M]
    a_i = tl.where(mask, a_i - mean1[:, None], 0.0)
    a_f = tl.where(mask, a_f - mean1[:, None], 0.0)
    a_g = tl.where(mask, a_g - mean1[:, None], 0.0)
    a_o = tl.where(mask, a_o - mean1[:, None], 0.0)
    var1 = (tl.sum(a_i * a_i, 1) + tl.sum(a_f * a_f, 1) + tl.sum(a_g * a_g, 1) + tl.sum(a_o * a_o, 1)) / (4 * H)
    rstd1 = tl.math.rsqrt(var1 + eps)                                        # [BLOCK_M]
    x_i = a_i * rstd1[:, None]
    x_f = a_f * rstd1[:, None]
    x_g = a_g * rstd1[:, None]
    x_o = a_o * rstd1[:, None]
    # gate pre-activations: x̂_ih g_ih + b (XB, precomputed for all steps) + x̂ g_hh, then the non-linearities
    i = _sigmoid(_ld(XB + s4, o4, mask, ACC) + x_i * _ld(G, cols, col_ok, ACC)[None, :])
    f = _sigmoid(_ld(XB + s4, o4 + H, mask, ACC) + x_f * _ld(G, cols + H, col_ok, ACC)[None, :])
    gg = _tanh(_ld(XB + s4, o4 + 2 * H, mask, ACC) + x_g * _ld(G, cols + 2 * H, col_ok, ACC)[None, :])
    o = _sigmoid(_ld(XB + s4, o4 + 3 * H, mask, ACC) + x_o * _ld(G, cols + 3 * H, col_ok, ACC)[None, :])
    # cell update and output
    c_old = _ld(CST, o1, mask, ACC)
    c_tilde = tl.where(mask, f * c_old + i * gg, 0.0)
    if CELL_NORM:
        mean2 = tl.sum(c_tilde, 1) / H
        d2 = tl.where(mask, c_tilde - mean2[:, None], 0.0)
        rstd2 = tl.math.rsqrt(tl.sum(d2 * d2, 1) / H + eps)
        tc = _tanh(_ld(BC, cols, col_ok, ACC)[None, :] + d2 * rstd2[:, None] * _ld(WC, cols, col_ok, ACC)[None, :])
    else:
        tc = _tanh(c_tilde)
    m = o * tc
    if ZONE_C:
        c_new = c_tilde + _ld(ZC + s1, o1, mask, ACC) * (c_old - c_tilde)
    else:
        c_new = c_tilde
    dt = OUT.dtype.element_ty
    tl.store(CST + o1, c_new, mask=live)
    if PROJ:  # the host projects m and updates h and out
        tl.store(M + o1, m.to(dt), mask=mask)
    else:
        h_new = m
        if ZONE_H:
            h_new = m + _ld(ZH + s1, o1, mask, ACC) * (_ld(HS, o1, mask, ACC) - m)
        tl.store(HS + o1, h_new.to(dt), mask=live)
        tl.store(OUT + s1 + o1, tl.where(live, h_new, 0.0).to(dt), mask=mask)
    if SAVE:
        tl.store(HW_HAT + s4 + o4, tl.where(live, x_i, 0.0).to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + H, tl.where(live, x_f, 0.0).to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + 2 * H, tl.where(live, x_g, 0.0).to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + 3 * H, tl.where(live, x_o, 0.0).to(dt), mask=mask)
        tl.store(GATES + s4 + o4, tl.where(live, i, 0.0).to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + H, tl.where(live, f, 0.0).to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + 2 * H, tl.where(live, gg, 0.0).to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + 3 * H, tl.where(live, o, 0.0).to(dt), mask=mask)
        tl.store(CS + s1 + o1, tl.where(live, c_new, c_old).to(dt), mask=mask)  # the state after step t
        st = (t.to(tl.int64) * B + rows) * 5
        sdt = STATS.dtype.element_ty
        tl.store(STATS + st, tl.where(run_row, rstd1, 0.0).to(sdt), mask=row_ok)
        if CELL_NORM:
            tl.store(STATS + st + 1, tl.where(run_row, mean2, 0.0).to(sdt), mask=row_ok)
            tl.store(STATS + st + 2, tl.where(run_row, rstd2, 0.0).to(sdt), mask=row_ok)


@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_step(
    DOUT, DH_MM, DIRECT, DC, DM, GATES, HW_HAT, CS, C0, STATS, G, WC, BC, ZH, ZC, LEN,
    DA, DHW, DG_ROWS, DWC_ROWS, DBC_ROWS, M_ALL,
    t, B, H,
    ACC: tl.constexpr, CELL_NORM: tl.constexpr, HAS_LEN: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    PROJ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live, run_row = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s4 = s1 * 4
    st = (t.to(tl.int64) * B + rows) * 5
    if PROJ:  # the host gives dm = (dL/dh̃_t) W_hr, zero on rows past their length
        dm = _ld(DM, o1, mask, ACC)
    else:
        dh = _ld(DIRECT, o1, mask, ACC) + _ld(DH_MM, o1, mask, ACC)          # dL/dh_t from the later steps
        dhv = _ld(DOUT + s1, o1, mask, ACC) + dh                             # ... and from out[t]
        if ZONE_H:
            zh = _ld(ZH + s1, o1, mask, ACC)
            dm = tl.where(live, dhv * (1.0 - zh), 0.0)
            tl.store(DIRECT + o1, tl.where(live, zh * dhv, dh), mask=mask)
        else:
            dm = tl.where(live, dhv, 0.0)
            tl.store(DIRECT + o1, tl.where(live, 0.0, dh), mask=mask)
    i = _ld(GATES + s4, o4, mask, ACC)
    f = _ld(GATES + s4, o4 + H, mask, ACC)
    gg = _ld(GATES + s4, o4 + 2 * H, mask, ACC)
    o = _ld(GATES + s4, o4 + 3 * H, mask, ACC)
    if t > 0:
        cp = _ld(CS + (s1 - B * H), o1, mask, ACC)
    else:
        cp = _ld(C0, o1, mask, ACC)
    if ZONE_C:
        c_tilde = f * cp + i * gg
    else:
        c_tilde = _ld(CS + s1, o1, mask, ACC)
    # cell LN backward (tanh(LN(c̃)) recomputed from the saved statistics)
    if CELL_NORM:
        wc = _ld(WC, cols, col_ok, ACC)[None, :]
        rstd2 = _ld(STATS + 2, st, row_ok, ACC)[:, None]
        chat = tl.where(mask, (c_tilde - _ld(STATS + 1, st, row_ok, ACC)[:, None]) * rstd2, 0.0)
        tc = _tanh(_ld(BC, cols, col_ok, ACC)[None, :] + chat * wc)
        dpre = dm * o * (1.0 - tc * tc)
        tl.store(DWC_ROWS + o1, _ld(DWC_ROWS, o1, mask, ACC) + dpre * chat, mask=mask)
        tl.store(DBC_ROWS + o1, _ld(DBC_ROWS, o1, mask, ACC) + dpre, mask=mask)
        dy = dpre * wc
        m1 = tl.sum(dy, 1) / H
        m2 = tl.sum(dy * chat, 1) / H
        dc_ln = rstd2 * (dy - m1[:, None] - chat * m2[:, None])
    else:
        tc = _tanh(c_tilde)
        dc_ln = dm * o * (1.0 - tc * tc)
    if PROJ:
        tl.store(M_ALL + s1 + o1, (o * tc).to(M_ALL.dtype.element_ty), mask=mask)
    dc = _ld(DC, o1, mask, ACC)
    if ZONE_C:
        zc = _ld(ZC + s1, o1, mask, ACC)
        dcv = dc_ln + tl.where(live, dc * (1.0 - zc), 0.0)
        tl.store(DC + o1, tl.where(live, dcv * f + zc * dc, dc), mask=mask)
    else:
        dcv = dc_ln + tl.where(live, dc, 0.0)
        tl.store(DC + o1, tl.where(live, dcv * f, dc), mask=mask)
    # gate pre-activation gradients dA; zero for rows past their length
    dA_i = tl.where(live, dcv * gg * i * (1.0 - i), 0.0)
    dA_f = tl.where(live, dcv * cp * f * (1.0 - f), 0.0)
    dA_g = tl.where(live, dcv * i * (1.0 - gg * gg), 0.0)
    dA_o = tl.where(live, dm * tc * o * (1.0 - o), 0.0)
    dt = DA.dtype.element_ty
    tl.store(DA + s4 + o4, dA_i.to(dt), mask=mask)
    tl.store(DA + s4 + o4 + H, dA_f.to(dt), mask=mask)
    tl.store(DA + s4 + o4 + 2 * H, dA_g.to(dt), mask=mask)
    tl.store(DA + s4 + o4 + 3 * H, dA_o.to(dt), mask=mask)
    # recurrent LN backward over 4H: dhw = rstd (dy - mean(dy) - x̂ mean(dy x̂)), dy = dA g
    x_i = _ld(HW_HAT + s4, o4, mask, ACC)
    x_f = _ld(HW_HAT + s4, o4 + H, mask, ACC)
    x_g = _ld(HW_HAT + s4, o4 + 2 * H, mask, ACC)
    x_o = _ld(HW_HAT + s4, o4 + 3 * H, mask, ACC)
    tl.store(DG_ROWS + o4, _ld(DG_ROWS, o4, mask, ACC) + dA_i * x_i, mask=mask)
    tl.store(DG_ROWS + o4 + H, _ld(DG_ROWS, o4 + H, mask, ACC) + dA_f * x_f, mask=mask)
    tl.store(DG_ROWS + o4 + 2 * H, _ld(DG_ROWS, o4 + 2 * H, mask, ACC) + dA_g * x_g, mask=mask)
    tl.store(DG_ROWS + o4 + 3 * H, _ld(DG_ROWS, o4 + 3 * H, mask, ACC) + dA_o * x_o, mask=mask)
    dy_i = dA_i * _ld(G, cols, col_ok, ACC)[None, :]
    dy_f = dA_f * _ld(G, cols + H, col_ok, ACC)[None, :]
    dy_g = dA_g * _ld(G, cols + 2 * H, col_ok, ACC)[None, :]
    dy_o = dA_o * _ld(G, cols + 3 * H, col_ok, ACC)[None, :]
    m1 = ((tl.sum(dy_i, 1) + tl.sum(dy_f, 1) + tl.sum(dy_g, 1) + tl.sum(dy_o, 1)) / (4 * H))[:, None]
    m2 = ((tl.sum(dy_i * x_i, 1) + tl.sum(dy_f * x_f, 1) + tl.sum(dy_g * x_g, 1)
           + tl.sum(dy_o * x_o, 1)) / (4 * H))[:, None]
    rstd1 = _ld(STATS, st, row_ok, ACC)[:, None]
    tl.store(DHW + s4 + o4, (rstd1 * (dy_i - m1 - x_i * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + H, (rstd1 * (dy_f - m1 - x_f * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + 2 * H, (rstd1 * (dy_g - m1 - x_g * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + 3 * H, (rstd1 * (dy_o - m1 - x_o * m2)).to(dt), mask=mask)


@triton.jit(do_not_specialize=["t"])
def _gru_fwd_step(
    HW, XB, G, BN, HS, ZH, LEN, OUT, HW_HAT, GATES, STATS,
    t, B, H, eps,
    ACC: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr, ZONE_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live, run_row = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o3 = rows[:, None] * (3 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s3 = s1 * 3
    # two LNs: over the [r, u] block (2H) and over the n block (H)
    a_r = _ld(HW, o3, mask, ACC)
    a_u = _ld(HW, o3 + H, mask, ACC)
    a_n = _ld(HW, o3 + 2 * H, mask, ACC)
    mean_a = (tl.sum(a_r, 1) + tl.sum(a_u, 1)) / (2 * H)
    a_r = tl.where(mask, a_r - mean_a[:, None], 0.0)
    a_u = tl.where(mask, a_u - mean_a[:, None], 0.0)
    rstd_a = tl.math.rsqrt((tl.sum(a_r * a_r, 1) + tl.sum(a_u * a_u, 1)) / (2 * H) + eps)
    mean_b = tl.sum(a_n, 1) / H
    a_n = tl.where(mask, a_n - mean_b[:, None], 0.0)
    rstd_b = tl.math.rsqrt(tl.sum(a_n * a_n, 1) / H + eps)
    x_r = a_r * rstd_a[:, None]
    x_u = a_u * rstd_a[:, None]
    x_n = a_n * rstd_b[:, None]
    # XB = x̂_ih g_ih + b_ih (+ b_hh on r, u); BN = b_hh^n, which sits inside r * (.)
    r = _sigmoid(_ld(XB + s3, o3, mask, ACC) + x_r * _ld(G, cols, col_ok, ACC)[None, :])
    u = _sigmoid(_ld(XB + s3, o3 + H, mask, ACC) + x_u * _ld(G, cols + H, col_ok, ACC)[None, :])
    hn = _ld(BN, cols, col_ok, ACC)[None, :] + x_n * _ld(G, cols + 2 * H, col_ok, ACC)[None, :]
    n = _tanh(_ld(XB + s3, o3 + 2 * H, mask, ACC) + r * hn)
    h_old = _ld(HS, o1, mask, ACC)
    h_new = n + u * (h_old - n)                                              # u h + (1 - u) n
    if ZONE_H:
        h_new = h_new + _ld(ZH + s1, o1, mask, ACC) * (h_old - h_new)
    dt = OUT.dtype.element_ty
    tl.store(HS + o1, h_new.to(dt), mask=live)
    tl.store(OUT + s1 + o1, tl.where(live, h_new, 0.0).to(dt), mask=mask)
    if SAVE:
        tl.store(HW_HAT + s3 + o3, tl.where(live, x_r, 0.0).to(dt), mask=mask)
        tl.store(HW_HAT + s3 + o3 + H, tl.where(live, x_u, 0.0).to(dt), mask=mask)
        tl.store(HW_HAT + s3 + o3 + 2 * H, tl.where(live, x_n, 0.0).to(dt), mask=mask)
        tl.store(GATES + s3 + o3, tl.where(live, r, 0.0).to(dt), mask=mask)
        tl.store(GATES + s3 + o3 + H, tl.where(live, u, 0.0).to(dt), mask=mask)
        tl.store(GATES + s3 + o3 + 2 * H, tl.where(live, n, 0.0).to(dt), mask=mask)
        st = (t.to(tl.int64) * B + rows) * 6
        sdt = STATS.dtype.element_ty
        tl.store(STATS + st, tl.where(run_row, rstd_a, 0.0).to(sdt), mask=row_ok)
        tl.store(STATS + st + 1, tl.where(run_row, rstd_b, 0.0).to(sdt), mask=row_ok)


@triton.jit(do_not_specialize=["t"])
def _gru_bwd_step(
    DOUT, DH_MM, DIRECT, GATES, HW_HAT, STATS, OUT, H0, G, BN, ZH, LEN,
    DA, DHW, DG_ROWS, DBN_ROWS,
    t, B, H,
    ACC: tl.constexpr, HAS_LEN: tl.constexpr, ZONE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live, run_row = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o3 = rows[:, None] * (3 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s3 = s1 * 3
    st = (t.to(tl.int64) * B + rows) * 6
    dh = _ld(DIRECT, o1, mask, ACC) + _ld(DH_MM, o1, mask, ACC)
    dhv = _ld(DOUT + s1, o1, mask, ACC) + dh
    if ZONE_H:
        zh = _ld(ZH + s1, o1, mask, ACC)
        dht = tl.where(live, dhv * (1.0 - zh), 0.0)                          # dL/dh̃_t
    else:
        dht = tl.where(live, dhv, 0.0)
    r = _ld(GATES + s3, o3, mask, ACC)
    u = _ld(GATES + s3, o3 + H, mask, ACC)
    n = _ld(GATES + s3, o3 + 2 * H, mask, ACC)
    x_r = _ld(HW_HAT + s3, o3, mask, ACC)
    x_u = _ld(HW_HAT + s3, o3 + H, mask, ACC)
    x_n = _ld(HW_HAT + s3, o3 + 2 * H, mask, ACC)
    # h_{t-1} is out[t-1] while the row is running (the only case where it matters), h0 at t = 0
    if t > 0:
        hp = _ld(OUT + (s1 - B * H), o1, mask, ACC)
    else:
        hp = _ld(H0, o1, mask, ACC)
    g_n = _ld(G, cols + 2 * H, col_ok, ACC)[None, :]
    dnp = dht * (1.0 - u) * (1.0 - n * n)                                    # d of n's pre-activation
    hn = _ld(BN, cols, col_ok, ACC)[None, :] + x_n * g_n
    dhn = dnp * r                                                            # d of LN(h W^n) g^n + b_hh^n
    dx_r = dnp * hn * r * (1.0 - r)
    dx_u = dht * (hp - n) * u * (1.0 - u)
    dt = DA.dtype.element_ty
    tl.store(DA + s3 + o3, dx_r.to(dt), mask=mask)
    tl.store(DA + s3 + o3 + H, dx_u.to(dt), mask=mask)
    tl.store(DA + s3 + o3 + 2 * H, dnp.to(dt), mask=mask)
    tl.store(DBN_ROWS + o1, _ld(DBN_ROWS, o1, mask, ACC) + dhn, mask=mask)
    tl.store(DG_ROWS + o3, _ld(DG_ROWS, o3, mask, ACC) + dx_r * x_r, mask=mask)
    tl.store(DG_ROWS + o3 + H, _ld(DG_ROWS, o3 + H, mask, ACC) + dx_u * x_u, mask=mask)
    tl.store(DG_ROWS + o3 + 2 * H, _ld(DG_ROWS, o3 + 2 * H, mask, ACC) + dhn * x_n, mask=mask)
    # the two LN backwards, rstd (dy - mean(dy) - x̂ mean(dy x̂)) per block
    dy_r = dx_r * _ld(G, cols, col_ok, ACC)[None, :]
    dy_u = dx_u * _ld(G, cols + H, col_ok, ACC)[None, :]
    dy_n = dhn * g_n
    m1 = ((tl.sum(dy_r, 1) + tl.sum(dy_u, 1)) / (2 * H))[:, None]
    m2 = ((tl.sum(dy_r * x_r, 1) + tl.sum(dy_u * x_u, 1)) / (2 * H))[:, None]
    rstd_a = _ld(STATS, st, row_ok, ACC)[:, None]
    tl.store(DHW + s3 + o3, (rstd_a * (dy_r - m1 - x_r * m2)).to(dt), mask=mask)
    tl.store(DHW + s3 + o3 + H, (rstd_a * (dy_u - m1 - x_u * m2)).to(dt), mask=mask)
    m1 = (tl.sum(dy_n, 1) / H)[:, None]
    m2 = (tl.sum(dy_n * x_n, 1) / H)[:, None]
    rstd_b = _ld(STATS + 1, st, row_ok, ACC)[:, None]
    tl.store(DHW + s3 + o3 + 2 * H, (rstd_b * (dy_n - m1 - x_n * m2)).to(dt), mask=mask)
    # `direct`: the part of dL/dh_{t-1} that bypasses the GEMM; rows past their length pass dh on unchanged
    if ZONE_H:
        tl.store(DIRECT + o1, tl.where(live, dht * u + zh * dhv, dh), mask=mask)
    else:
        tl.store(DIRECT + o1, tl.where(live, dht * u, dh), mask=mask)


# ------------------------------------------------------------------------------------------------
# host code
# ------------------------------------------------------------------------------------------------


def _or_torch_ops(fn):
    """Run a ``TritonImpl`` method; if Triton cannot build its step kernel on this GPU (compile error,
    too many registers or too much shared memory), warn once and use ``TorchOps``' method from then
    on. Both implementations take and save the same tensors (the contract), so a forward and a
    backward may come from different ones."""
    name = fn.__name__
    fallback = getattr(TorchOps, name)

    @functools.wraps(fn)
    def run(*args):
        if name in _BROKEN:
            return fallback(*args)
        try:
            return fn(*args)
        except _COMPILE_ERRORS as exc:
            _BROKEN[name] = exc
            warnings.warn(
                f"layernorm.rnn: the Triton step kernel of {name} could not be built on this device "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                f"using the torch-ops implementation instead (backend='torch' silences this)",
                RuntimeWarning,
                stacklevel=3,
            )
            return fallback(*args)

    return staticmethod(run)


def _lens(lengths, device):
    return lengths.to(device) if lengths is not None else None


class TritonImpl:
    """The contract's four methods with one fused Triton kernel per step (see the module docstring)."""

    name = "triton"

    @_or_torch_ops
    def lstm_forward(a: LSTMArgs, save: bool):
        xw = a.xw
        T, B, H4 = xw.shape
        if B == 0:
            return TorchOps.lstm_forward(a, save)
        H, R = H4 // 4, a.h0.shape[1]
        acc, carry = _acc(xw.dtype), stats_dtype(xw.dtype)
        cell_norm, proj = a.ln_cell_weight is not None, a.w_hr is not None
        x_hat, (mean_ih, rstd_ih) = _input_ln(xw, [H4], a.eps, carry)
        xb = x_hat * a.ln_ih_weight if a.bias is None else torch.addcmul(a.bias, x_hat, a.ln_ih_weight)
        out = xw.new_empty(T, B, R)
        h = a.h0.clone()                                       # (B, R) state, updated in place per step
        c = a.c0.to(carry, copy=True)                          # (B, H) the cell carry stays in ACC
        hw = xw.new_empty(B, H4)                               # (B, 4H) the step's GEMM
        m = xw.new_empty(B, H) if proj else None               # (B, H) LSTMP: o tanh(LN(c̃)) before W_hr
        hw_hat = gates = cs = stats = None
        if save:
            hw_hat, gates, cs = xw.new_empty(T, B, H4), xw.new_empty(T, B, H4), xw.new_empty(T, B, H)
            stats = xw.new_zeros(T, B, 5, dtype=carry)
        lens = _lens(a.lengths, xw.device)
        run = None if lens is None else (torch.arange(T, device=xw.device).unsqueeze(1) < lens).unsqueeze(-1)
        wt = a.w_hh.t()                                        # (R, 4H)
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(xw):
            for t in range(T):
                torch.mm(h if a.recurrent_mask is None else h * a.recurrent_mask, wt, out=hw)
                _lstm_fwd_step[grid](
                    hw, xb, a.ln_hh_weight, a.ln_cell_weight, a.ln_cell_bias, h, c, a.zoneout_h, a.zoneout_c, lens,
                    out, m, hw_hat, gates, cs, stats,
                    t, B, H, a.eps,
                    ACC=acc, CELL_NORM=cell_norm, HAS_LEN=lens is not None, SAVE=save,
                    ZONE_H=a.zoneout_h is not None and not proj, ZONE_C=a.zoneout_c is not None, PROJ=proj,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
                if proj:
                    h_new = m @ a.w_hr.t()                     # (B, R)
                    if a.zoneout_h is not None:
                        h_new = h_new + a.zoneout_h[t] * (h - h_new)
                    if run is None:
                        h.copy_(h_new)
                        out[t] = h_new
                    else:
                        h.copy_(torch.where(run[t], h_new, h))
                        out[t] = h_new * run[t]
        if save:
            stats[..., 3:4], stats[..., 4:5] = mean_ih, rstd_ih
            if run is not None:
                stats[..., 3:5] *= run
        c = c.to(xw.dtype)
        return (out, h, c, hw_hat, gates, cs, stats) if save else (out, h, c)

    @_or_torch_ops
    def lstm_backward(a: LSTMArgs, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n):
        T, B, H4 = gates.shape
        if B == 0:
            return TorchOps.lstm_backward(a, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n)
        H, R = H4 // 4, out.shape[2]
        dtype, carry = gates.dtype, stats_dtype(gates.dtype)
        cell_norm, proj = a.ln_cell_weight is not None, a.w_hr is not None
        dout = dout.contiguous()                               # (T, B, R)
        # dL/dh_t = direct + dh_mm: the kernel's part in ACC, the GEMM's in the input dtype
        direct = gates.new_empty(B, R, dtype=carry).copy_(dh_n)
        dh_mm = gates.new_zeros(B, R)
        dc = gates.new_empty(B, H, dtype=carry).copy_(dc_n)
        dA = torch.empty_like(gates)                           # (T, B, 4H)
        dhw = torch.empty_like(gates)                          # (T, B, 4H)
        dg_rows = gates.new_zeros(B, H4, dtype=carry)          # per-row sums over t, reduced at the end
        dwc_rows = gates.new_zeros(B, H, dtype=carry) if cell_norm else None
        dbc_rows = gates.new_zeros(B, H, dtype=carry) if cell_norm else None
        dm = gates.new_zeros(B, H) if proj else None
        m_all = gates.new_zeros(T, B, H) if proj else None
        dht_all = gates.new_zeros(T, B, R) if proj else None
        lens = _lens(a.lengths, gates.device)
        run = None if lens is None else (torch.arange(T, device=gates.device).unsqueeze(1) < lens).unsqueeze(-1)
        dhw_t = dhw.unbind(0)                                  # T x (B, 4H) views, made once
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(gates):
            for t in range(T - 1, -1, -1):
                if proj:  # the P-space part on the host: dh̃_t, the new `direct`, dm = dh̃_t W_hr
                    dh = direct + dh_mm
                    dhv = dout[t] + dh
                    dht = dhv if a.zoneout_h is None else dhv * (1 - a.zoneout_h[t])
                    nxt = torch.zeros_like(dhv) if a.zoneout_h is None else a.zoneout_h[t] * dhv
                    if run is not None:
                        dht = dht * run[t]
                        nxt = torch.where(run[t], nxt, dh)
                    direct.copy_(nxt)
                    dht_all[t] = dht
                    torch.mm(dht.to(dtype), a.w_hr, out=dm)
                _lstm_bwd_step[grid](
                    dout, dh_mm, direct, dc, dm, gates, hw_hat, cs, a.c0, stats, a.ln_hh_weight, a.ln_cell_weight,
                    a.ln_cell_bias, a.zoneout_h, a.zoneout_c, lens,
                    dA, dhw, dg_rows, dwc_rows, dbc_rows, m_all,
                    t, B, H,
                    ACC=_acc(dtype), CELL_NORM=cell_norm, HAS_LEN=lens is not None,
                    ZONE_H=a.zoneout_h is not None and not proj, ZONE_C=a.zoneout_c is not None, PROJ=proj,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
                torch.mm(dhw_t[t], a.w_hh, out=dh_mm)          # dh_{t-1} = direct + (dhw_t W_hh) ρ
                if a.recurrent_mask is not None:
                    dh_mm.mul_(a.recurrent_mask)
        dh = (direct + dh_mm).to(dtype)                        # (B, R)
        hprev = torch.cat([a.h0.unsqueeze(0), out[:-1]], 0)   # (T, B, R)
        if a.recurrent_mask is not None:
            hprev = hprev * a.recurrent_mask
        dw_hh = dhw.reshape(T * B, H4).t() @ hprev.reshape(T * B, R)
        dbias = dA.sum((0, 1)) if a.bias is not None else None
        dxw, dg_ih = _input_ln_backward(dA, a.xw, a.ln_ih_weight, stats, [H4], [(3, 4)])
        dwc = dwc_rows.sum(0).to(dtype) if cell_norm else None
        dbc = dbc_rows.sum(0).to(dtype) if cell_norm else None
        dw_hr = dht_all.reshape(T * B, R).t().to(dtype) @ m_all.reshape(T * B, H) if proj else None
        return dxw, dh, dc.to(dtype), dw_hh, dg_rows.sum(0).to(dtype), dbias, dg_ih, dwc, dbc, dw_hr

    @_or_torch_ops
    def gru_forward(a: GRUArgs, save: bool):
        xw = a.xw
        T, B, H3 = xw.shape
        if B == 0:
            return TorchOps.gru_forward(a, save)
        H = H3 // 3
        acc, carry = _acc(xw.dtype), stats_dtype(xw.dtype)
        x_hat, (m_ru, r_ru, m_n, r_n) = _input_ln(xw, [2 * H, H], a.eps, carry)
        bx = xw.new_zeros(H3)                                  # (3H,) added to x̂ g_ih
        bn = xw.new_zeros(H)                                   # (H,) b_hh^n, inside r * (.)
        if a.bias_ih is not None:
            bx += a.bias_ih
        if a.bias_hh is not None:
            bx[: 2 * H] += a.bias_hh[: 2 * H]
            bn += a.bias_hh[2 * H:]
        xb = torch.addcmul(bx, x_hat, a.ln_ih_weight)
        out = xw.new_empty(T, B, H)
        h = a.h0.clone()
        hw = xw.new_empty(B, H3)
        hw_hat = gates = stats = None
        if save:
            hw_hat, gates = xw.new_empty(T, B, H3), xw.new_empty(T, B, H3)
            stats = xw.new_zeros(T, B, 6, dtype=carry)
        lens = _lens(a.lengths, xw.device)
        wt = a.w_hh.t()
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(xw):
            for t in range(T):
                torch.mm(h if a.recurrent_mask is None else h * a.recurrent_mask, wt, out=hw)
                _gru_fwd_step[grid](
                    hw, xb, a.ln_hh_weight, bn, h, a.zoneout_h, lens, out, hw_hat, gates, stats,
                    t, B, H, a.eps,
                    ACC=acc, HAS_LEN=lens is not None, SAVE=save, ZONE_H=a.zoneout_h is not None,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
        if save:
            stats[..., 2:3], stats[..., 3:4], stats[..., 4:5], stats[..., 5:6] = m_ru, r_ru, m_n, r_n
            if lens is not None:
                stats[..., 2:6] *= (torch.arange(T, device=xw.device).unsqueeze(1) < lens).unsqueeze(-1)
        return (out, h, hw_hat, gates, stats) if save else (out, h)

    @_or_torch_ops
    def gru_backward(a: GRUArgs, out, hw_hat, gates, stats, dout, dh_n):
        T, B, H3 = gates.shape
        if B == 0:
            return TorchOps.gru_backward(a, out, hw_hat, gates, stats, dout, dh_n)
        H = H3 // 3
        dtype, carry = gates.dtype, stats_dtype(gates.dtype)
        dout = dout.contiguous()
        direct = gates.new_empty(B, H, dtype=carry).copy_(dh_n)
        dh_mm = gates.new_zeros(B, H)
        dA = torch.empty_like(gates)
        dhw = torch.empty_like(gates)
        dg_rows = gates.new_zeros(B, H3, dtype=carry)
        dbn_rows = gates.new_zeros(B, H, dtype=carry)
        bn = a.bias_hh[2 * H:] if a.bias_hh is not None else gates.new_zeros(H)
        lens = _lens(a.lengths, gates.device)
        dhw_t = dhw.unbind(0)
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(gates):
            for t in range(T - 1, -1, -1):
                _gru_bwd_step[grid](
                    dout, dh_mm, direct, gates, hw_hat, stats, out, a.h0, a.ln_hh_weight, bn, a.zoneout_h, lens,
                    dA, dhw, dg_rows, dbn_rows,
                    t, B, H,
                    ACC=_acc(dtype), HAS_LEN=lens is not None, ZONE_H=a.zoneout_h is not None,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
                torch.mm(dhw_t[t], a.w_hh, out=dh_mm)
                if a.recurrent_mask is not None:
                    dh_mm.mul_(a.recurrent_mask)
        dh = (direct + dh_mm).to(dtype)
        hprev = torch.cat([a.h0.unsqueeze(0), out[:-1]], 0)
        if a.recurrent_mask is not None:
            hprev = hprev * a.recurrent_mask
        dw_hh = dhw.reshape(T * B, H3).t() @ hprev.reshape(T * B, H)
        dbih = dA.sum((0, 1))
        dbhh = dbih.clone()
        dbhh[2 * H:] = dbn_rows.sum(0)
        dxw, dg_ih = _input_ln_backward(dA, a.xw, a.ln_ih_weight, stats, [2 * H, H], [(2, 3), (4, 5)])
        return (dxw, dh, dw_hh, dg_rows.sum(0).to(dtype), dbih if a.bias_ih is not None else None,
                dbhh if a.bias_hh is not None else None, dg_ih)
