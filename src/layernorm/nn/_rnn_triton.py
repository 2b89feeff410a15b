"""The ``"triton"`` implementation of :mod:`layernorm.nn.rnn_fast`: one fused Triton kernel per step.

Same algorithm, signatures and saved tensors as ``rnn_fast._TorchImpl`` (read it first); only the
per-step elementwise work moves into one kernel, so a step costs one cuBLAS GEMM plus one launch
instead of 22-28 (forward) and 55 (backward) launches of torch ops (LSTM; docs/rnn_fast.md).

Forward, per step ``t``:

1. ``hw = h_{t-1} @ W_hhᵀ`` with ``torch.mm(out=)`` (cuBLAS);
2. ``_lstm_fwd_step`` / ``_gru_fwd_step``: the LN of ``hw`` (LSTM: over the row's 4H entries; GRU: over
   the [r, u] 2H block and over the n block), gain, ``+ xw_ln[t] + bias``, the gate non-linearities,
   the cell update, ``LN(c)`` with its weight and bias (or ``tanh(c)``), ``h``, the length mask (rows
   past their length keep h and c and output 0), ``out[t]``, the new state in place, and with
   ``SAVE`` the tensors ``_TorchImpl`` saves (so either backward can consume them).

Backward, per step (reverse order), with ``dL/dh_t = direct + dh_mm``:

1. ``_lstm_bwd_step`` / ``_gru_bwd_step``: ``dA = dxw[t]`` (gate pre-activation gradient), the cell LN
   backward and the new ``dc``, the recurrent LN backward ``dhw[t]``, and the next ``direct`` (GRU:
   ``u * dh``; LSTM: 0; rows past their length: their unchanged ``dh``);
2. ``dh_mm = dhw[t] @ W_hh`` with ``torch.mm(out=)`` (cuBLAS).

Parameter gradients that are sums over the batch (``ln_hh_weight``, ``ln_cell_*``, GRU ``b_hh^n``)
accumulate into one (B, width) buffer row per batch row, in the accumulation dtype; every element
has exactly one writer per step and the steps run in order, so there are no atomics. After the loop
``torch.sum(dim=0)`` reduces the rows in a fixed order: two runs are bitwise equal. ``dbias`` is the
sum of ``dxw`` and ``dW_hh`` one GEMM, as in ``_TorchImpl``.

Layout: one program owns ``BLOCK_M`` batch rows; each gate block of a row is its own
``[BLOCK_M, BLOCK_H]`` register tile (``BLOCK_H = next_pow2(H)``), so the gates are separate tensors
without slicing and the LN statistics are sums over the G tiles. Statistics are an exact two-pass in
``ACC`` (float32; float64 for float64 input). bfloat16/float16 are computed in float32 and stored in the
input dtype, like every tensor ``_TorchImpl`` stores, except the carries that never meet a GEMM: the
cell state ``c``, ``dc`` and ``direct`` stay in ACC (``h`` and ``dh_mm`` are GEMM operands or results,
so they are in the input dtype), which keeps the low-precision error near the reference's instead
of adding two roundings per step. Rows much wider than H = 2048 spill registers (slow but correct).

This module imports Triton; ``rnn_fast._pick_impl`` imports it only for CUDA tensors or under
``TRITON_INTERPRET=1`` (Triton's CPU interpreter, used by the tests on CPU tensors).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from .rnn_fast import _TorchImpl

__all__ = ["_TritonImpl"]

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
    block_m = max(1, min(_ROW_TILE // block_h, triton.next_power_of_2(B)))
    return block_m, block_h, max(1, min(16, block_m * block_h // 128))


def _acc(dtype: torch.dtype):
    if dtype == torch.float64:
        return tl.float64
    if dtype in (torch.float32, torch.bfloat16, torch.float16):
        return tl.float32
    raise ValueError(f"impl='triton' supports float16, bfloat16, float32 and float64, but got {dtype}")


def _carry_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device_ctx(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------
# kernels. Offsets: `o1` addresses a (B, H) step slice, `oG` gate 0 of a (B, G*H) one (gate k: + k*H);
# `s1`, `sG` are the int64 starts of step t in (T, B, H) / (T, B, G*H) tensors.
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
    """Row and column indices of this program, the (row, col) mask, and `live`: the mask restricted
    to rows whose sequence is still running at step t."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)                # [BLOCK_M]
    cols = tl.arange(0, BLOCK_H)                                             # [BLOCK_H]
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < H)[None, :]
    if HAS_LEN:
        running = t < tl.load(LEN + rows, mask=row_ok, other=0)
        live = mask & running[:, None]
    else:
        live = mask
    return rows, cols, row_ok, mask, live


@triton.jit(do_not_specialize=["t"])
def _lstm_fwd_step(
    HW, XW, G, BIAS, WC, BC, HS, CST, LEN, OUT, HW_HAT, GATES, CS, RSTD1, MEAN2, RSTD2,
    t, B, H, eps,
    ACC: tl.constexpr, HAS_BIAS: tl.constexpr, CELL_NORM: tl.constexpr, HAS_LEN: tl.constexpr,
    SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
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
    # gate pre-activations (xw_t + bias) + x̂ g, then the non-linearities
    p_i = _ld(XW + s4, o4, mask, ACC)
    p_f = _ld(XW + s4, o4 + H, mask, ACC)
    p_g = _ld(XW + s4, o4 + 2 * H, mask, ACC)
    p_o = _ld(XW + s4, o4 + 3 * H, mask, ACC)
    if HAS_BIAS:
        p_i += _ld(BIAS, cols, col_ok, ACC)[None, :]
        p_f += _ld(BIAS, cols + H, col_ok, ACC)[None, :]
        p_g += _ld(BIAS, cols + 2 * H, col_ok, ACC)[None, :]
        p_o += _ld(BIAS, cols + 3 * H, col_ok, ACC)[None, :]
    i = _sigmoid(p_i + x_i * _ld(G, cols, col_ok, ACC)[None, :])
    f = _sigmoid(p_f + x_f * _ld(G, cols + H, col_ok, ACC)[None, :])
    gg = _tanh(p_g + x_g * _ld(G, cols + 2 * H, col_ok, ACC)[None, :])
    o = _sigmoid(p_o + x_o * _ld(G, cols + 3 * H, col_ok, ACC)[None, :])
    # cell update and output
    c_old = _ld(CST, o1, mask, ACC)
    c_new = tl.where(mask, f * c_old + i * gg, 0.0)
    if CELL_NORM:
        mean2 = tl.sum(c_new, 1) / H
        d2 = tl.where(mask, c_new - mean2[:, None], 0.0)
        rstd2 = tl.math.rsqrt(tl.sum(d2 * d2, 1) / H + eps)
        tc = _tanh(_ld(BC, cols, col_ok, ACC)[None, :] + d2 * rstd2[:, None] * _ld(WC, cols, col_ok, ACC)[None, :])
    else:
        tc = _tanh(c_new)
    h_new = o * tc
    # rows past their length keep their state and output 0
    dt = OUT.dtype.element_ty
    tl.store(HS + o1, h_new.to(dt), mask=live)
    tl.store(CST + o1, c_new, mask=live)
    tl.store(OUT + s1 + o1, tl.where(live, h_new, 0.0).to(dt), mask=mask)
    if SAVE:
        tl.store(HW_HAT + s4 + o4, x_i.to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + H, x_f.to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + 2 * H, x_g.to(dt), mask=mask)
        tl.store(HW_HAT + s4 + o4 + 3 * H, x_o.to(dt), mask=mask)
        tl.store(GATES + s4 + o4, i.to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + H, f.to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + 2 * H, gg.to(dt), mask=mask)
        tl.store(GATES + s4 + o4 + 3 * H, o.to(dt), mask=mask)
        tl.store(CS + s1 + o1, tl.where(live, c_new, c_old).to(dt), mask=mask)  # the state after step t
        st = t.to(tl.int64) * B + rows                                       # (T, B, 1) statistics
        tl.store(RSTD1 + st, rstd1.to(dt), mask=row_ok)
        if CELL_NORM:
            tl.store(MEAN2 + st, mean2.to(dt), mask=row_ok)
            tl.store(RSTD2 + st, rstd2.to(dt), mask=row_ok)


@triton.jit(do_not_specialize=["t"])
def _lstm_bwd_step(
    DOUT, DH_MM, DIRECT, DC, GATES, HW_HAT, CS, C0, RSTD1, MEAN2, RSTD2, G, WC, BC, LEN,
    DXW, DHW, DG_ROWS, DWC_ROWS, DBC_ROWS,
    t, B, H,
    ACC: tl.constexpr, CELL_NORM: tl.constexpr, HAS_LEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o4 = rows[:, None] * (4 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s4 = s1 * 4
    st = t.to(tl.int64) * B + rows
    dh = _ld(DIRECT, o1, mask, ACC) + _ld(DH_MM, o1, mask, ACC)              # dL/dh_t from the later steps
    dhv = tl.where(live, _ld(DOUT + s1, o1, mask, ACC) + dh, 0.0)            # padding rows contribute nothing
    i = _ld(GATES + s4, o4, mask, ACC)
    f = _ld(GATES + s4, o4 + H, mask, ACC)
    gg = _ld(GATES + s4, o4 + 2 * H, mask, ACC)
    o = _ld(GATES + s4, o4 + 3 * H, mask, ACC)
    c = _ld(CS + s1, o1, mask, ACC)
    if t > 0:
        cp = _ld(CS + (s1 - B * H), o1, mask, ACC)
    else:
        cp = _ld(C0, o1, mask, ACC)
    dc = _ld(DC, o1, mask, ACC)
    # cell LN backward (tanh(LN(c)) recomputed from the saved statistics)
    if CELL_NORM:
        wc = _ld(WC, cols, col_ok, ACC)[None, :]
        rstd2 = _ld(RSTD2, st, row_ok, ACC)[:, None]
        chat = tl.where(mask, (c - _ld(MEAN2, st, row_ok, ACC)[:, None]) * rstd2, 0.0)
        tc = _tanh(_ld(BC, cols, col_ok, ACC)[None, :] + chat * wc)
        dcn = dhv * o * (1.0 - tc * tc)
        tl.store(DWC_ROWS + o1, _ld(DWC_ROWS, o1, mask, ACC) + dcn * chat, mask=mask)
        tl.store(DBC_ROWS + o1, _ld(DBC_ROWS, o1, mask, ACC) + dcn, mask=mask)
        dy = dcn * wc
        m1 = tl.sum(dy, 1) / H
        m2 = tl.sum(dy * chat, 1) / H
        dcv = rstd2 * (dy - m1[:, None] - chat * m2[:, None]) + dc
    else:
        tc = _tanh(c)
        dcv = dhv * o * (1.0 - tc * tc) + dc
    # gate pre-activation gradients dA = dxw[t]; zero for rows past their length
    dA_i = tl.where(live, dcv * gg * i * (1.0 - i), 0.0)
    dA_f = tl.where(live, dcv * cp * f * (1.0 - f), 0.0)
    dA_g = tl.where(live, dcv * i * (1.0 - gg * gg), 0.0)
    dA_o = tl.where(live, dhv * tc * o * (1.0 - o), 0.0)
    tl.store(DC + o1, tl.where(live, dcv * f, dc), mask=mask)
    tl.store(DIRECT + o1, tl.where(live, 0.0, dh), mask=mask)
    dt = DXW.dtype.element_ty
    tl.store(DXW + s4 + o4, dA_i.to(dt), mask=mask)
    tl.store(DXW + s4 + o4 + H, dA_f.to(dt), mask=mask)
    tl.store(DXW + s4 + o4 + 2 * H, dA_g.to(dt), mask=mask)
    tl.store(DXW + s4 + o4 + 3 * H, dA_o.to(dt), mask=mask)
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
    rstd1 = _ld(RSTD1, st, row_ok, ACC)[:, None]
    tl.store(DHW + s4 + o4, (rstd1 * (dy_i - m1 - x_i * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + H, (rstd1 * (dy_f - m1 - x_f * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + 2 * H, (rstd1 * (dy_g - m1 - x_g * m2)).to(dt), mask=mask)
    tl.store(DHW + s4 + o4 + 3 * H, (rstd1 * (dy_o - m1 - x_o * m2)).to(dt), mask=mask)


@triton.jit(do_not_specialize=["t"])
def _gru_fwd_step(
    HW, XW, G, BX, BN, HS, LEN, OUT, HW_HAT, GATES, RSTD,
    t, B, H, eps,
    ACC: tl.constexpr, HAS_LEN: tl.constexpr, SAVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
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
    # gates; bx = b_ih (+ b_hh on r, u) and bn = b_hh^n, which sits inside r * (.)
    xt_r = _ld(XW + s3, o3, mask, ACC) + _ld(BX, cols, col_ok, ACC)[None, :]
    xt_u = _ld(XW + s3, o3 + H, mask, ACC) + _ld(BX, cols + H, col_ok, ACC)[None, :]
    xt_n = _ld(XW + s3, o3 + 2 * H, mask, ACC) + _ld(BX, cols + 2 * H, col_ok, ACC)[None, :]
    r = _sigmoid(xt_r + x_r * _ld(G, cols, col_ok, ACC)[None, :])
    u = _sigmoid(xt_u + x_u * _ld(G, cols + H, col_ok, ACC)[None, :])
    hn = _ld(BN, cols, col_ok, ACC)[None, :] + x_n * _ld(G, cols + 2 * H, col_ok, ACC)[None, :]
    n = _tanh(xt_n + r * hn)
    h_old = _ld(HS, o1, mask, ACC)
    h_new = n + u * (h_old - n)                                              # u h + (1 - u) n
    dt = OUT.dtype.element_ty
    tl.store(HS + o1, h_new.to(dt), mask=live)
    tl.store(OUT + s1 + o1, tl.where(live, h_new, 0.0).to(dt), mask=mask)
    if SAVE:
        tl.store(HW_HAT + s3 + o3, x_r.to(dt), mask=mask)
        tl.store(HW_HAT + s3 + o3 + H, x_u.to(dt), mask=mask)
        tl.store(HW_HAT + s3 + o3 + 2 * H, x_n.to(dt), mask=mask)
        tl.store(GATES + s3 + o3, r.to(dt), mask=mask)
        tl.store(GATES + s3 + o3 + H, u.to(dt), mask=mask)
        tl.store(GATES + s3 + o3 + 2 * H, n.to(dt), mask=mask)
        st = (t.to(tl.int64) * B + rows) * 2                                 # (T, B, 2) statistics
        tl.store(RSTD + st, rstd_a.to(dt), mask=row_ok)
        tl.store(RSTD + st + 1, rstd_b.to(dt), mask=row_ok)


@triton.jit(do_not_specialize=["t"])
def _gru_bwd_step(
    DOUT, DH_MM, DIRECT, GATES, HW_HAT, RSTD, OUT, H0, G, BN, LEN,
    DXW, DHW, DG_ROWS, DBN_ROWS,
    t, B, H,
    ACC: tl.constexpr, HAS_LEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows, cols, row_ok, mask, live = _rows(t, B, H, LEN, HAS_LEN, BLOCK_M, BLOCK_H)
    col_ok = cols < H
    o1 = rows[:, None] * H + cols[None, :]
    o3 = rows[:, None] * (3 * H) + cols[None, :]
    s1 = t.to(tl.int64) * B * H
    s3 = s1 * 3
    st = (t.to(tl.int64) * B + rows) * 2
    dh = _ld(DIRECT, o1, mask, ACC) + _ld(DH_MM, o1, mask, ACC)
    dhv = tl.where(live, _ld(DOUT + s1, o1, mask, ACC) + dh, 0.0)
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
    dnp = dhv * (1.0 - u) * (1.0 - n * n)                                    # d of n's pre-activation
    hn = _ld(BN, cols, col_ok, ACC)[None, :] + x_n * g_n
    dhn = dnp * r                                                            # d of LN(h W^n) g^n + b_hh^n
    dx_r = dnp * hn * r * (1.0 - r)
    dx_u = dhv * (hp - n) * u * (1.0 - u)
    dt = DXW.dtype.element_ty
    tl.store(DXW + s3 + o3, dx_r.to(dt), mask=mask)
    tl.store(DXW + s3 + o3 + H, dx_u.to(dt), mask=mask)
    tl.store(DXW + s3 + o3 + 2 * H, dnp.to(dt), mask=mask)
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
    rstd_a = _ld(RSTD, st, row_ok, ACC)[:, None]
    tl.store(DHW + s3 + o3, (rstd_a * (dy_r - m1 - x_r * m2)).to(dt), mask=mask)
    tl.store(DHW + s3 + o3 + H, (rstd_a * (dy_u - m1 - x_u * m2)).to(dt), mask=mask)
    m1 = (tl.sum(dy_n, 1) / H)[:, None]
    m2 = (tl.sum(dy_n * x_n, 1) / H)[:, None]
    rstd_b = _ld(RSTD, st + 1, row_ok, ACC)[:, None]
    tl.store(DHW + s3 + o3 + 2 * H, (rstd_b * (dy_n - m1 - x_n * m2)).to(dt), mask=mask)
    # `direct`: the u * dh path; rows past their length pass dh through unchanged
    tl.store(DIRECT + o1, tl.where(live, dhv * u, dh), mask=mask)


# ------------------------------------------------------------------------------------------------
# host code
# ------------------------------------------------------------------------------------------------


def _or_torch_ops(fn):
    """Run a ``_TritonImpl`` method; if Triton cannot build its step kernel on this GPU (compile error,
    too many registers or too much shared memory), warn once and use ``_TorchImpl``'s method from
    then on. Both implementations take and save the same tensors, so a forward and a backward may come
    from different ones. The kernels are tested under Triton's interpreter only until a GPU run; this
    keeps a CUDA user of ``impl="auto"`` working if the real compiler disagrees."""
    name = fn.__name__
    fallback = getattr(_TorchImpl, name)

    @functools.wraps(fn)
    def run(*args):
        if name in _BROKEN:
            return fallback(*args)
        try:
            return fn(*args)
        except _COMPILE_ERRORS as exc:
            _BROKEN[name] = exc
            warnings.warn(
                f"layernorm.nn.rnn_fast: the Triton step kernel of {name} could not be built on this device "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
                f"using the torch-ops implementation instead (set LAYERNORM_RNN_IMPL=torch to silence this)",
                RuntimeWarning,
                stacklevel=3,
            )
            return fallback(*args)

    return staticmethod(run)


class _TritonImpl:
    """Signatures and return lists of ``rnn_fast._TorchImpl``; empty inputs go to it (nothing to launch)."""

    @_or_torch_ops
    def lstm_forward(xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save):
        if xw.numel() == 0:
            return _TorchImpl.lstm_forward(xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save)
        T, B, H4 = xw.shape
        H = H4 // 4
        acc = _acc(xw.dtype)
        out = xw.new_empty(T, B, H)
        h = h0.clone()                                         # (B, H) state, updated in place per step
        c = c0.to(_carry_dtype(xw.dtype), copy=True)           # (B, H) the cell carry stays in ACC
        hw = xw.new_empty(B, H4)                               # (B, 4H) the step's GEMM
        hw_hat = gates = cs = rstd1 = mean2 = rstd2 = None
        if save:
            hw_hat, gates, cs = xw.new_empty(T, B, H4), xw.new_empty(T, B, H4), xw.new_empty(T, B, H)
            rstd1, mean2, rstd2 = (xw.new_zeros(T, B, 1) for _ in range(3))
        lens = lengths.to(xw.device) if lengths is not None else None  # (B,) int64
        wt = w.t()                                             # (H, 4H)
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(xw):
            for t in range(T):
                torch.mm(h, wt, out=hw)
                _lstm_fwd_step[grid](
                    hw, xw, g, bias, wc, bc, h, c, lens, out, hw_hat, gates, cs, rstd1, mean2, rstd2,
                    t, B, H, eps,
                    ACC=acc, HAS_BIAS=bias is not None, CELL_NORM=cell_norm, HAS_LEN=lens is not None,
                    SAVE=save, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
        c = c.to(xw.dtype)
        if not save:
            return [out, h, c]
        return [out, h, c, hw_hat, gates, cs, rstd1, mean2, rstd2]

    @_or_torch_ops
    def lstm_backward(dout, dhn, dcn, lengths, h0, c0, w, g, wc, bc, out, hw_hat, gates, cs,
                      rstd1, mean2, rstd2, cell_norm):
        if gates.numel() == 0:
            return _TorchImpl.lstm_backward(dout, dhn, dcn, lengths, h0, c0, w, g, wc, bc, out, hw_hat, gates,
                                            cs, rstd1, mean2, rstd2, cell_norm)
        T, B, H4 = gates.shape
        H = H4 // 4
        dtype, carry = gates.dtype, _carry_dtype(gates.dtype)
        dout = dout.contiguous()                               # (T, B, H)
        # dL/dh_t = direct + dh_mm: the kernel's part in ACC, the GEMM's in the input dtype
        direct = gates.new_empty(B, H, dtype=carry).copy_(dhn)  # (B, H)
        dh_mm = gates.new_zeros(B, H)                          # (B, H)
        dc = gates.new_empty(B, H, dtype=carry).copy_(dcn)    # (B, H)
        dxw = torch.empty_like(gates)                          # (T, B, 4H)
        dhw = torch.empty_like(gates)                          # (T, B, 4H)
        dg_rows = gates.new_zeros(B, H4, dtype=carry)          # per-row sums over t, reduced at the end
        dwc_rows = gates.new_zeros(B, H, dtype=carry) if cell_norm else None
        dbc_rows = gates.new_zeros(B, H, dtype=carry) if cell_norm else None
        lens = lengths.to(gates.device) if lengths is not None else None
        dhw_t = dhw.unbind(0)                                  # T x (B, 4H) views, made once
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(gates):
            for t in range(T - 1, -1, -1):
                _lstm_bwd_step[grid](
                    dout, dh_mm, direct, dc, gates, hw_hat, cs, c0, rstd1, mean2, rstd2, g, wc, bc, lens,
                    dxw, dhw, dg_rows, dwc_rows, dbc_rows,
                    t, B, H,
                    ACC=_acc(dtype), CELL_NORM=cell_norm, HAS_LEN=lens is not None,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
                torch.mm(dhw_t[t], w, out=dh_mm)               # dh_{t-1} = direct + dhw_t W_hh
        dh = (direct + dh_mm).to(dtype)                        # (B, H)
        hprev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)      # (T, B, H)
        dw = dhw.reshape(T * B, H4).t() @ hprev.reshape(T * B, H)  # (4H, H)
        dbias = dxw.reshape(T * B, H4).sum(0)                  # (4H,)
        dwc = dwc_rows.sum(0).to(dtype) if cell_norm else None
        dbc = dbc_rows.sum(0).to(dtype) if cell_norm else None
        return [dxw, dh, dc.to(dtype), dw, dg_rows.sum(0).to(dtype), dbias, dwc, dbc]

    @_or_torch_ops
    def gru_forward(xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save):
        if xw.numel() == 0:
            return _TorchImpl.gru_forward(xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save)
        T, B, H3 = xw.shape
        H = H3 // 3
        acc = _acc(xw.dtype)
        out = xw.new_empty(T, B, H)
        h = h0.clone()                                         # (B, H)
        hw = xw.new_empty(B, H3)                               # (B, 3H)
        bx = xw.new_zeros(H3)                                  # (3H,) added to xw_t
        bn = xw.new_zeros(H)                                   # (H,) b_hh^n, inside r * (.)
        if bias_ih is not None:
            bx += bias_ih
        if bias_hh is not None:
            bx[: 2 * H] += bias_hh[: 2 * H]
            bn += bias_hh[2 * H:]
        hw_hat = gates = rstd = None
        if save:
            hw_hat, gates = xw.new_empty(T, B, H3), xw.new_empty(T, B, H3)
            rstd = xw.new_zeros(T, B, 2)
        lens = lengths.to(xw.device) if lengths is not None else None
        wt = w.t()                                             # (H, 3H)
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(xw):
            for t in range(T):
                torch.mm(h, wt, out=hw)
                _gru_fwd_step[grid](
                    hw, xw, g, bx, bn, h, lens, out, hw_hat, gates, rstd,
                    t, B, H, eps,
                    ACC=acc, HAS_LEN=lens is not None, SAVE=save,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
        if not save:
            return [out, h]
        return [out, h, hw_hat, gates, rstd]

    @_or_torch_ops
    def gru_backward(dout, dhn, lengths, h0, w, g, bias_hh, out, hw_hat, gates, rstd):
        if gates.numel() == 0:
            return _TorchImpl.gru_backward(dout, dhn, lengths, h0, w, g, bias_hh, out, hw_hat, gates, rstd)
        T, B, H3 = gates.shape
        H = H3 // 3
        dtype, carry = gates.dtype, _carry_dtype(gates.dtype)
        dout = dout.contiguous()                               # (T, B, H)
        direct = gates.new_empty(B, H, dtype=carry).copy_(dhn)  # (B, H) as in lstm_backward
        dh_mm = gates.new_zeros(B, H)                          # (B, H)
        dxw = torch.empty_like(gates)                          # (T, B, 3H)
        dhw = torch.empty_like(gates)                          # (T, B, 3H)
        dg_rows = gates.new_zeros(B, H3, dtype=carry)
        dbn_rows = gates.new_zeros(B, H, dtype=carry)
        bn = bias_hh[2 * H:] if bias_hh is not None else gates.new_zeros(H)  # (H,)
        lens = lengths.to(gates.device) if lengths is not None else None
        dhw_t = dhw.unbind(0)
        block_m, block_h, warps = _tile(B, H)
        grid = (triton.cdiv(B, block_m),)
        with _device_ctx(gates):
            for t in range(T - 1, -1, -1):
                _gru_bwd_step[grid](
                    dout, dh_mm, direct, gates, hw_hat, rstd, out, h0, g, bn, lens,
                    dxw, dhw, dg_rows, dbn_rows,
                    t, B, H,
                    ACC=_acc(dtype), HAS_LEN=lens is not None,
                    BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps,
                )
                torch.mm(dhw_t[t], w, out=dh_mm)               # dh_{t-1} = direct + dhw_t W_hh
        dh = (direct + dh_mm).to(dtype)                        # (B, H)
        hprev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)      # (T, B, H)
        dw = dhw.reshape(T * B, H3).t() @ hprev.reshape(T * B, H)  # (3H, H)
        dbih = dxw.reshape(T * B, H3).sum(0)                   # (3H,)
        dbhh = dbih.clone()
        dbhh[2 * H:] = dbn_rows.sum(0)
        return [dxw, dh, dw, dg_rows.sum(0).to(dtype), dbih, dbhh]
