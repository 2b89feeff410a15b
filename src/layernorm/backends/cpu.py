"""The ``cpu`` backend: numba kernels for LayerNorm / RMSNorm (+ fused residual add), forward and backward.

Same contract as :mod:`layernorm.backends.reference`; measurements and the reasons for each design choice
are in ``docs/backends.md`` (CPU section). In short:

* One row per task, parallel over rows (``prange``). A row is read from memory once; the statistics
  passes and the output pass then re-read it from L1/L2. Statistics are two-pass (mean, then the sum of
  squared deviations), never E[x^2] - E[x]^2. Row sums use 16 independent accumulators so LLVM can
  vectorise them without ``fastmath`` (the order of additions is fixed by the code, not by the compiler).
* Rows whose sum of squares overflows (|x| ~ 1e20 in float32) are rescaled by their largest magnitude,
  exactly as :func:`layernorm.backends.reference.row_rstd`; NaN/Inf stay inside their row.
* Backward: dx per row; dweight/dbias are accumulated in float32 (float64 for float64) partial rows over a
  FIXED partition of the rows into chunks that depends only on the shape, then reduced in chunk order. The
  result is bitwise identical across runs and across thread counts.
* Threading: numba's ``omp`` layer with as many threads as ``torch.get_num_threads()``; its OpenMP calls
  bind to torch's own libgomp, so our kernels run on torch's thread pool (see
  :func:`_select_threading_layer`); ``workqueue`` where numba has no OpenMP.
* ``cache=True``: compiled kernels are stored next to this file (or in NUMBA_CACHE_DIR), so a second
  process pays only the load (well under a second), not the compile.

float16 / bfloat16 inputs are computed by upcasting to float32 with torch (numba has no bfloat16), so they
are correct here but slower than the ``torch`` backend, which the automatic choice uses for them.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

try:
    import numba
    from numba import njit, prange
except ImportError as exc:  # the registry reports the backend as unavailable
    raise ImportError("the cpu backend needs numba (pip install numba)") from exc

from . import reference

__all__ = ["forward", "backward", "THREADING_LAYER", "configure_threads", "chunk_rows"]


def _select_threading_layer() -> str:
    """numba's ``omp`` layer, else ``workqueue``; a user's NUMBA_THREADING_LAYER wins.

    torch loads its bundled ``libgomp.so.1`` with RTLD_GLOBAL (via libtorch_global_deps), so when numba's
    omppool is loaded afterwards its ``GOMP_parallel`` / ``omp_*`` symbols bind to *torch's* runtime
    (checked with LD_DEBUG=bindings; the system libgomp that omppool names also gets mapped, but stays
    unused). numba's kernels then run on torch's own OpenMP threads: one pool, no oversubscription, no
    second set of spinning threads. ``omp`` also launches faster than ``workqueue``, whose launching
    thread only hands work off and waits (~80 µs per launch measured, docs/backends.md).
    """
    user = os.environ.get("NUMBA_THREADING_LAYER")
    if user:
        return user
    try:
        from numba.np.ufunc import omppool  # noqa: F401

        layer = "omp"
    except ImportError:  # no OpenMP runtime for numba here
        layer = "workqueue"
    numba.config.THREADING_LAYER = layer
    return layer


# numba only reads the setting at its first parallel launch: set it before anything in the process
# runs a parallel numba kernel (importing this module does).
THREADING_LAYER = _select_threading_layer()

# dweight/dbias partial chunks: a function of the shape only, never of the thread count. At most 64
# chunks (enough parallelism for 64 threads), at least 16 rows each (so the partial rows, M/16 x N,
# cost little next to dy and z).
_MAX_CHUNKS = 64
_MIN_CHUNK_ROWS = 16

# numba's workqueue layer (the fallback) aborts the process on concurrent parallel launches from two
# Python threads; serialising our launches makes the backend safe to call from several threads.
_LAUNCH_LOCK = threading.Lock()

# GNU OpenMP is not fork-safe: numba terminates a child forked after the omp pool started if it launches
# a parallel kernel. Such a child (e.g. a fork-started DataLoader worker) is served by the ``torch``
# backend instead: same contract, and the same fork rules as the rest of torch (one thread in the child).
_POOL = {"started": False, "forked_after_start": False}


def _after_fork_in_child() -> None:
    if _POOL["started"] and THREADING_LAYER == "omp":
        _POOL["forked_after_start"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_OPTS = dict(parallel=True, fastmath=False, cache=True, nogil=True, error_model="numpy")


def configure_threads() -> int:
    """Use as many numba threads as torch uses (capped by numba's pool size); returns the count.

    Starting numba's ``omp`` pool calls ``omp_set_num_threads(NUMBA_NUM_THREADS)`` in the libgomp that
    torch shares with it, which silently undid a user's ``torch.set_num_threads(1)`` (torch then ran
    its own ops on every core after our first call). torch's count is read before and put back after.
    """
    want = torch.get_num_threads()
    n = max(1, min(want, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return n


# ----------------------------------------------------------------------------------------------------
# Row helpers. Reductions carry fastmath={"reassoc"} and nothing else: LLVM may then split a row sum
# over several vector accumulators (the order is fixed by the compiled code, so results are still
# deterministic, and independent of the thread count), while NaN/Inf semantics ("nnan"/"ninf"), signed
# zeros and the absence of FMA contraction are kept.
# ----------------------------------------------------------------------------------------------------

_REASSOC = {"reassoc"}


@njit(fastmath=_REASSOC, cache=True)
def _row_sum(v, n, zero):
    s = zero
    for j in range(n):
        s += v[j]
    return s


@njit(fastmath=_REASSOC, cache=True)
def _row_sumsq(v, n, mu, zero):
    """sum((v - mu)**2) over the row: the second pass of the two-pass variance."""
    s = zero
    for j in range(n):
        c = v[j] - mu
        s += c * c
    return s


@njit(fastmath=_REASSOC, cache=True)
def _bwd_row_sums(gi, zi, w, dwc, dbc, mu, rs, n, has_w, want_db, zero):
    """One pass over a row of the backward: returns (sum(dxhat), sum(dxhat * xhat)) and adds the
    row's dweight (dy * xhat) and dbias (dy) contributions to the chunk's partial rows."""
    s1 = zero
    s2 = zero
    if has_w and want_db:
        for j in range(n):
            g = gi[j]
            xh = (zi[j] - mu) * rs
            dwc[j] += g * xh
            dbc[j] += g
            gw = g * w[j]
            s1 += gw
            s2 += gw * xh
    elif has_w:
        for j in range(n):
            g = gi[j]
            xh = (zi[j] - mu) * rs
            dwc[j] += g * xh
            gw = g * w[j]
            s1 += gw
            s2 += gw * xh
    elif want_db:
        for j in range(n):
            g = gi[j]
            xh = (zi[j] - mu) * rs
            dbc[j] += g
            s1 += g
            s2 += g * xh
    else:
        for j in range(n):
            g = gi[j]
            xh = (zi[j] - mu) * rs
            s1 += g
            s2 += g * xh
    return s1, s2


@njit(inline="always", fastmath=False, cache=True)
def _row_rstd(h, n, mu, eps, zero):
    """1/sqrt(mean((h-mu)^2) + eps), pre-scaled by max|h-mu| when the plain sum overflows."""
    one = zero + h.dtype.type(1)
    var = _row_sumsq(h, n, mu, zero) / h.dtype.type(n)
    if np.isinf(var):
        # Overflow of the squares, or a non-finite value in the row (then the plain answer stands).
        finite = True
        scale = zero
        for j in range(n):
            c = h[j] - mu
            if not np.isfinite(c):
                finite = False
                break
            a = abs(c)
            if a > scale:
                scale = a
        if finite and scale > zero:
            s = zero
            for j in range(n):
                c = (h[j] - mu) / scale
                s += c * c
            svar = s / h.dtype.type(n)
            return (one / np.sqrt(svar + eps / (scale * scale))) / scale
    return one / np.sqrt(var + eps)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@njit(**_OPTS)
def _fwd(x, r, w, b, y, z, mean, rstd, eps, has_r, has_w, has_b, rms):
    M, N = x.shape
    zero = x.dtype.type(0)
    fn = x.dtype.type(N)
    for i in prange(M):
        xi = x[i]
        yi = y[i]
        if has_r:
            ri = r[i]
            hi = z[i]
            for j in range(N):
                hi[j] = xi[j] + ri[j]
        else:
            hi = xi
        if rms:
            mu = zero
        else:
            mu = _row_sum(hi, N, zero) / fn
            mean[i] = mu
        rs = _row_rstd(hi, N, mu, eps, zero)
        rstd[i] = rs
        # Same operation order as the reference: ((h - mu) * rstd) * w + b.
        if has_w and has_b:
            for j in range(N):
                yi[j] = ((hi[j] - mu) * rs) * w[j] + b[j]
        elif has_w:
            for j in range(N):
                yi[j] = ((hi[j] - mu) * rs) * w[j]
        elif has_b:
            for j in range(N):
                yi[j] = ((hi[j] - mu) * rs) + b[j]
        else:
            for j in range(N):
                yi[j] = (hi[j] - mu) * rs


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@njit(**_OPTS)
def _bwd(dy, dz, z, w, mean, rstd, dx, dwp, dbp, dw, db, nchunks, rows_per_chunk, has_dz, has_w, want_dw, want_db, rms):
    M, N = z.shape
    zero = z.dtype.type(0)
    fn = z.dtype.type(N)
    for c in prange(nchunks):
        lo = c * rows_per_chunk
        hi_ = min(M, lo + rows_per_chunk)
        dwc = dwp[c] if want_dw else dwp[0]
        dbc = dbp[c] if want_db else dbp[0]
        if want_dw:
            dwc[:] = zero
        if want_db:
            dbc[:] = zero
        for i in range(lo, hi_):
            zi = z[i]
            gi = dy[i]
            dxi = dx[i]
            mu = zero if rms else mean[i]
            rs = rstd[i]
            # pass 1: partial dweight/dbias rows and the two row sums
            s1, s2 = _bwd_row_sums(gi, zi, w, dwc, dbc, mu, rs, N, has_w, want_db, zero)
            proj = s2 / fn
            mdx = zero if rms else s1 / fn
            # pass 2 (row now in cache): dh = rstd * (dxhat - xhat * proj - mean(dxhat)) + dz
            if has_w:
                if has_dz:
                    dzi = dz[i]
                    for j in range(N):
                        xh = (zi[j] - mu) * rs
                        dxi[j] = ((gi[j] * w[j] - xh * proj) - mdx) * rs + dzi[j]
                else:
                    for j in range(N):
                        xh = (zi[j] - mu) * rs
                        dxi[j] = ((gi[j] * w[j] - xh * proj) - mdx) * rs
            else:
                if has_dz:
                    dzi = dz[i]
                    for j in range(N):
                        xh = (zi[j] - mu) * rs
                        dxi[j] = ((gi[j] - xh * proj) - mdx) * rs + dzi[j]
                else:
                    for j in range(N):
                        xh = (zi[j] - mu) * rs
                        dxi[j] = ((gi[j] - xh * proj) - mdx) * rs
    # fixed-order reduction of the partial rows: out[j] = sum over chunks c, in order, of part[c, j]
    if want_dw or want_db:
        nb = (N + 255) // 256
        for bidx in prange(nb):
            lo = bidx * 256
            hi_ = min(N, lo + 256)
            if want_dw:
                for j in range(lo, hi_):
                    dw[j] = dwp[0, j]
                for c in range(1, nchunks):
                    for j in range(lo, hi_):
                        dw[j] += dwp[c, j]
            if want_db:
                for j in range(lo, hi_):
                    db[j] = dbp[0, j]
                for c in range(1, nchunks):
                    for j in range(lo, hi_):
                        db[j] += dbp[c, j]


# ----------------------------------------------------------------------------------------------------
# Torch entry points
# ----------------------------------------------------------------------------------------------------

_DUMMY = {}


def _dummy(dtype: np.dtype, ndim: int) -> np.ndarray:
    key = (np.dtype(dtype), ndim)
    if key not in _DUMMY:
        _DUMMY[key] = np.zeros((0,) * ndim, dtype=dtype)
    return _DUMMY[key]


def _dummy_part(dtype: np.dtype) -> np.ndarray:
    # (1, 0): the kernel takes row 0 of an absent partial buffer and never touches it.
    key = (np.dtype(dtype), "part")
    if key not in _DUMMY:
        _DUMMY[key] = np.zeros((1, 0), dtype=dtype)
    return _DUMMY[key]


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16 / bfloat16 are computed in float32 (numba has no bfloat16; see the module docstring).
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vec(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    if t is None:
        return None
    return t.detach().to(acc).contiguous()


def _check(name: str, t: Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"the cpu backend needs CPU tensors, but {name} is on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"the cpu backend needs a contiguous {name}")


def chunk_rows(M: int) -> int:
    """Rows per dweight/dbias partial chunk: depends on M only (never on the thread count)."""
    nchunks = max(1, min(_MAX_CHUNKS, -(-M // _MIN_CHUNK_ROWS)))
    return -(-M // nchunks)


def forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    if _POOL["forked_after_start"]:
        from . import torch_aten

        return torch_aten.forward(x, residual, weight, bias, eps, rms)
    _check("x", x)
    if x.dim() != 2:
        raise ValueError(f"the cpu backend expects x of shape (rows, cols), but got {tuple(x.shape)}")
    if residual is not None:
        _check("residual", residual)
    dtype = x.dtype
    acc = _compute_dtype(dtype)
    M, N = x.shape
    z = None
    if dtype != acc:
        # Low precision: z is rounded to x.dtype before it is normalized, as in the reference.
        if residual is not None:
            z = torch.add(x, residual)
            xc = z.to(acc)
        else:
            xc = x.to(acc)
        rc = None
    else:
        xc, rc = x, residual
    y = torch.empty((M, N), dtype=acc)
    zc = torch.empty((M, N), dtype=acc) if rc is not None else None
    mean = None if rms else torch.empty((M,), dtype=acc)
    rstd = torch.empty((M,), dtype=acc)
    w = _vec(weight, acc)
    b = _vec(bias, acc)
    npd = np.float64 if acc == torch.float64 else np.float32
    if M > 0 and N > 0:
        with _LAUNCH_LOCK:
            configure_threads()
            _POOL["started"] = True
            _fwd(
                _np(xc),
                _np(rc) if rc is not None else _dummy(npd, 2),
                _np(w) if w is not None else _dummy(npd, 1),
                _np(b) if b is not None else _dummy(npd, 1),
                _np(y),
                _np(zc) if zc is not None else _dummy(npd, 2),
                _np(mean) if mean is not None else _dummy(npd, 1),
                _np(rstd),
                npd(eps),
                rc is not None,
                w is not None,
                b is not None,
                bool(rms),
            )
    if zc is not None:
        z = zc
    if dtype != acc:
        y = y.to(dtype)
    return y, z, mean, rstd


def backward(
    dy: Tensor,
    dz: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    rms: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    if _POOL["forked_after_start"]:
        from . import torch_aten

        return torch_aten.backward(dy, dz, z, weight, bias, mean, rstd, rms)
    for name, t in (("dy", dy), ("z", z), ("dz", dz)):
        if t is not None:
            _check(name, t)
    dtype = z.dtype
    acc = _compute_dtype(dtype)
    M, N = z.shape
    npd = np.float64 if acc == torch.float64 else np.float32
    g = dy if dy.dtype == acc else dy.to(acc)
    h = z if dtype == acc else z.to(acc)
    d = None if dz is None else (dz if dz.dtype == acc else dz.to(acc))
    w = _vec(weight, acc)
    want_dw = weight is not None
    want_db = bias is not None
    rpc = chunk_rows(max(M, 1))
    nchunks = -(-M // rpc) if M > 0 else 0
    dwp = torch.empty((nchunks, N), dtype=acc) if want_dw else None
    dbp = torch.empty((nchunks, N), dtype=acc) if want_db else None
    dx = torch.empty((M, N), dtype=acc)
    dweight = torch.zeros((N,), dtype=acc) if want_dw else None
    dbias = torch.zeros((N,), dtype=acc) if want_db else None
    if M > 0 and N > 0:
        with _LAUNCH_LOCK:
            configure_threads()
            _POOL["started"] = True
            mean_c = mean.to(acc).contiguous() if mean is not None and not rms else None
            rstd_c = rstd.to(acc).contiguous()
            _bwd(
                _np(g),
                _np(d) if d is not None else _dummy(npd, 2),
                _np(h),
                _np(w) if w is not None else _dummy(npd, 1),
                _np(mean_c) if mean_c is not None else _dummy(npd, 1),
                _np(rstd_c),
                _np(dx),
                _np(dwp) if dwp is not None else _dummy_part(npd),
                _np(dbp) if dbp is not None else _dummy_part(npd),
                _np(dweight) if dweight is not None else _dummy(npd, 1),
                _np(dbias) if dbias is not None else _dummy(npd, 1),
                nchunks,
                rpc,
                d is not None,
                w is not None,
                want_dw,
                want_db,
                bool(rms),
            )
    elif d is not None:
        dx.copy_(d)
    if dtype != acc:
        dx = dx.to(dtype)
    if dweight is not None:
        dweight = dweight.to(weight.dtype)
    if dbias is not None:
        dbias = dbias.to(bias.dtype)
    return dx, dweight, dbias
