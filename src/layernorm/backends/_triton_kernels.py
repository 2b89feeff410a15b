"""Triton kernels of the ``triton`` backend (host code and launch table: :mod:`.triton`).

Notation: a tile is ``[BLOCK_M, BLOCK_N]`` (rows x columns); ``h`` is the row being normalized (x, or
z = x + residual rounded to x's dtype) in the accumulation dtype ``ACC`` (float32, float64 for
float64 input); ``c = h - mean`` (``c = h`` for RMSNorm); ``xhat = c * rstd``. ``W`` is the weight as
the kernels use it (the host adds RMSNorm's offset, Gemma's ``1 + w``, beforehand); ``ROUND`` rounds
xhat to the input dtype before the weight multiply (Llama's casting).

Two families, chosen per width by the host:

* *fused* kernels keep whole rows in registers (``BLOCK_N = next_pow2(N)``), several rows per
  program when rows are narrow. Forward statistics are an exact two-pass over the registers.
* *wide* kernels loop over column blocks for rows too wide for registers. The forward merges the
  per-block (count, mean, M2) with Chan's formula, so it reads the row twice (statistics, output)
  and never forms E[x^2] - E[x]^2. The backward is split in two launches: per-row reductions, then
  a (column block x row group) grid that writes dx and the dweight/dbias partials.

Every offset is ``row.to(int64) * N + col`` so tensors above 2^31 elements are addressed safely.
No atomics: dweight/dbias partials go to a (programs, N) buffer that the host sums in a fixed order.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _overflow_rstd(c, mask, var, rstd, eps, N):
    """reference.row_rstd's rescue for rows whose sum of squares overflowed (|c| ~ 1e20 in fp32).

    ``c``: [BLOCK_M, BLOCK_N] centred tile (zeros where masked); ``var``, ``rstd``: [BLOCK_M].
    With s = max|c|: rstd = 1 / (s * sqrt(mean((c/s)^2) + eps/s^2)). Rows with a non-finite entry
    keep the plain result, as in the reference."""
    finite = tl.min(tl.where(tl.abs(c) < float("inf"), 1, 0), axis=1)       # [BLOCK_M] 1: all finite
    over = (var == float("inf")) & (finite == 1)
    s = tl.where(over, tl.max(tl.abs(c), axis=1), 1.0)                      # [BLOCK_M] > 0
    cs = tl.where(mask, c / s[:, None], 0.0)
    svar = tl.sum(cs * cs, axis=1) / N
    srstd = tl.math.rsqrt(svar + eps / (s * s)) / s
    return tl.where(over, srstd, rstd)


@triton.jit
def _fwd_fused(
    X, R, W, B, Y, Z, MEAN, RSTD,
    M, N, eps,
    ACC: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)                             # [BLOCK_M]
    cols = tl.arange(0, BLOCK_N)                                             # [BLOCK_N]
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]                    # int64: M*N may be > 2^31
    x = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=mask, other=0.0)
        z = (x.to(ACC) + r.to(ACC)).to(Z.dtype.element_ty)                  # rounded like the stored z
        tl.store(Z + offs, z, mask=mask)
        h = z.to(ACC)
    else:
        h = x.to(ACC)
    if RMS:
        c = h
    else:
        mean = tl.sum(h, axis=1) / N                                         # [BLOCK_M]
        c = tl.where(mask, h - mean[:, None], 0.0)                           # two-pass: exact centring
        tl.store(MEAN + rows, mean, mask=row_ok)
    var = tl.sum(c * c, axis=1) / N                                          # [BLOCK_M]
    rstd = tl.math.rsqrt(var + eps)
    if tl.max(tl.where(var == float("inf"), 1, 0), axis=0) > 0:              # rare: costs nothing otherwise
        rstd = _overflow_rstd(c, mask, var, rstd, eps, N)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = c * rstd[:, None]
    if ROUND:  # Llama's casting: xhat rounded to the input dtype before the weight multiply
        y = y.to(Y.dtype.element_ty).to(ACC)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(ACC)
        y = y + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_h(X, R, offs, m, ACC: tl.constexpr, HAS_RES: tl.constexpr):
    """h for one column block of a wide row, recomputed from the inputs (z = x + residual rounded
    to x's dtype), so later passes never read back what this program stored."""
    x = tl.load(X + offs, mask=m, other=0.0)
    if HAS_RES:
        r = tl.load(R + offs, mask=m, other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(X.dtype.element_ty)
    return x.to(ACC)


@triton.jit
def _fwd_wide(
    X, R, W, B, Y, Z, MEAN, RSTD,
    M, N, eps,
    ACC: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, ROUND: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One row per program, looping over BLOCK_N-wide column blocks."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols0 = tl.arange(0, BLOCK_N)
    # pass 1: statistics (and z) -----------------------------------------------------------
    sumsq = tl.zeros([BLOCK_N], dtype=ACC)                                   # RMS: per-lane sums
    n_a = tl.sum(tl.zeros([BLOCK_N], dtype=ACC), axis=0)                     # LN: running count,
    mean_a = n_a                                                             # mean and M2 (scalars)
    m2_a = n_a
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        offs = base + cols
        if HAS_RES:
            x = tl.load(X + offs, mask=m, other=0.0)
            r = tl.load(R + offs, mask=m, other=0.0)
            z = (x.to(ACC) + r.to(ACC)).to(Z.dtype.element_ty)
            tl.store(Z + offs, z, mask=m)
            h = z.to(ACC)
        else:
            h = tl.load(X + offs, mask=m, other=0.0).to(ACC)
        if RMS:
            sumsq += h * h
        else:
            # block statistics by two-pass over registers, merged with Chan et al.'s formula
            n_b = tl.minimum(N - start, BLOCK_N).to(ACC)
            mean_b = tl.sum(h, axis=0) / n_b
            d = tl.where(m, h - mean_b, 0.0)
            m2_b = tl.sum(d * d, axis=0)
            n = n_a + n_b
            delta = mean_b - mean_a
            mean_a = mean_a + delta * (n_b / n)
            # delta * (delta * w), not delta**2 * w: on the first block w = 0 and delta**2 may be inf
            m2_a = m2_a + m2_b + delta * (delta * (n_a * n_b / n))
            n_a = n
    if RMS:
        mean = 0.0
        var = tl.sum(sumsq, axis=0) / N
    else:
        mean = mean_a
        var = m2_a / N
        tl.store(MEAN + row, mean)
    rstd = tl.math.rsqrt(var + eps)
    if var == float("inf"):
        # rare overflow rescue (see _overflow_rstd): two more passes, this row only
        s = tl.sum(tl.zeros([BLOCK_N], dtype=ACC), axis=0)
        finite = 1
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            m = cols < N
            c = tl.where(m, _load_h(X, R, base + cols, m, ACC, HAS_RES) - mean, 0.0)
            s = tl.maximum(s, tl.max(tl.abs(c), axis=0))
            finite = tl.minimum(finite, tl.min(tl.where(tl.abs(c) < float("inf"), 1, 0), axis=0))
        if finite == 1:
            acc = tl.zeros([BLOCK_N], dtype=ACC)
            for start in range(0, N, BLOCK_N):
                cols = start + cols0
                m = cols < N
                c = tl.where(m, _load_h(X, R, base + cols, m, ACC, HAS_RES) - mean, 0.0)
                cs = c / s
                acc += cs * cs
            rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / N + eps / (s * s)) / s
    tl.store(RSTD + row, rstd)
    # pass 2: output ---------------------------------------------------------------------------
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        offs = base + cols
        y = (_load_h(X, R, offs, m, ACC, HAS_RES) - mean) * rstd
        if ROUND:
            y = y.to(Y.dtype.element_ty).to(ACC)
        if HAS_W:
            y = y * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        if HAS_B:
            y = y + tl.load(B + cols, mask=m, other=0.0).to(ACC)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_fused(
    DY, DZ, Zin, W, MEAN, RSTD, DX, DWP, DBP,
    M, N, rows_per_prog,
    ACC: tl.constexpr, HAS_DZ: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent: program p owns rows [p*rows_per_prog, (p+1)*rows_per_prog), BLOCK_M at a time,
    keeps dweight/dbias accumulators in registers and writes them to row p of the partial buffers.

    dx = rstd * (dxhat - xhat * mean(dxhat * xhat) - mean(dxhat)) (+ dz), dxhat = dy * w;
    RMSNorm drops mean(dxhat)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(Zin + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            dxhat = g * w[None, :]
            if ROUND:  # the weight multiplied the rounded xhat
                dw_acc += g * xhat.to(DX.dtype.element_ty).to(ACC)
            else:
                dw_acc += g * xhat
        else:
            dxhat = g
        if HAS_B:
            db_acc += g
        c1 = tl.sum(dxhat * xhat, axis=1) / N
        dh = dxhat - xhat * c1[:, None]
        if not RMS:
            c2 = tl.sum(dxhat, axis=1) / N
            dh = dh - c2[:, None]
        dh = dh * rstd[:, None]
        if HAS_DZ:
            dh += tl.load(DZ + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
    part = pid.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DWP + part, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DBP + part, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _bwd_wide_rows(
    DY, Zin, W, MEAN, RSTD, C1, C2,
    N,
    ACC: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Wide rows, launch 1 of 2: per row c1 = mean(dxhat * xhat) and c2 = mean(dxhat)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    cols0 = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row)
    if RMS:
        mean = 0.0
    else:
        mean = tl.load(MEAN + row)
    s1 = tl.zeros([BLOCK_N], dtype=ACC)
    s2 = tl.zeros([BLOCK_N], dtype=ACC)
    for start in range(0, N, BLOCK_N):
        cols = start + cols0
        m = cols < N
        h = tl.load(Zin + base + cols, mask=m, other=0.0).to(ACC)
        g = tl.load(DY + base + cols, mask=m, other=0.0).to(ACC)
        xhat = tl.where(m, (h - mean) * rstd, 0.0)
        if HAS_W:
            g = g * tl.load(W + cols, mask=m, other=0.0).to(ACC)
        s1 += g * xhat
        s2 += g
    tl.store(C1 + row, tl.sum(s1, axis=0) / N)
    if not RMS:
        tl.store(C2 + row, tl.sum(s2, axis=0) / N)


@triton.jit
def _bwd_wide_cols(
    DY, DZ, Zin, W, MEAN, RSTD, C1, C2, DX, DWP, DBP,
    M, N, rows_per_prog,
    ACC: tl.constexpr, HAS_DZ: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    RMS: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Wide rows, launch 2 of 2: grid (column block, row group). Writes dx for its tile and the
    dweight/dbias partial sums of its row group to row ``program_id(1)`` of the partial buffers."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    row_start = pid_m * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(Zin + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        c1 = tl.load(C1 + rows, mask=row_ok, other=0.0)
        if RMS:
            xhat = h * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (h - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            dxhat = g * w[None, :]
            if ROUND:  # the weight multiplied the rounded xhat
                dw_acc += g * xhat.to(DX.dtype.element_ty).to(ACC)
            else:
                dw_acc += g * xhat
        else:
            dxhat = g
        if HAS_B:
            db_acc += g
        dh = dxhat - xhat * c1[:, None]
        if not RMS:
            c2 = tl.load(C2 + rows, mask=row_ok, other=0.0)
            dh = dh - c2[:, None]
        dh = dh * rstd[:, None]
        if HAS_DZ:
            dh += tl.load(DZ + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DX + offs, dh.to(DX.dtype.element_ty), mask=mask)
    part = pid_m.to(tl.int64) * N + cols
    if HAS_W:
        tl.store(DWP + part, tl.sum(dw_acc, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DBP + part, tl.sum(db_acc, axis=0), mask=col_ok)
