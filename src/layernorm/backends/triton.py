"""The ``triton`` backend: fused LayerNorm / RMSNorm (+ residual add) kernels for CUDA tensors.

Same contract as :mod:`layernorm.backends.reference` (read it for shapes and dtypes):

``forward(x, residual, weight, bias, eps, rms) -> (y, z, mean, rstd)``
``backward(dy, dz, z, weight, bias, mean, rstd, rms) -> (dx, dweight, dbias)``

How it works (kernels in :mod:`._triton_kernels`):

* Statistics are computed in float32 (float64 for float64 input). Rows up to ``_FWD_MAX_BLOCK``
  (forward) / ``_BWD_MAX_BLOCK`` (backward) columns are held in registers, several narrow rows per
  program; wider rows loop over ``_WIDE_BLOCK``-column blocks, merging per-block (count, mean, M2)
  with Chan's formula, so any width works without register spills.
* Rows whose sum of squares overflows (|x| ~ 1e20 in float32) are rescued by pre-scaling with the
  row's largest magnitude, the rule of :func:`reference.row_rstd`; normal rows pay one comparison.
* Backward: a persistent grid (a few programs per SM) in which each program owns a contiguous
  range of rows and keeps dweight/dbias partial sums in registers; the partials, one row per
  program of a (programs, N) float32 buffer, are summed by ``torch.sum(dim=0)``. No atomics, so
  results are bitwise reproducible run to run.

Importing this module imports Triton; the registry imports it lazily, only for CUDA tensors or under
``TRITON_INTERPRET=1`` (Triton's CPU interpreter, which the test-suite uses on CPU tensors).

Example::

    >>> from layernorm.backends import triton as tb
    >>> x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    >>> y, z, mean, rstd = tb.forward(x, None, None, None, 1e-5, False)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import reference
from ._triton_kernels import _bwd_fused, _bwd_wide_cols, _bwd_wide_rows, _fwd_fused, _fwd_wide

__all__ = ["forward", "backward"]

# Launch table. Widths are in elements; the choice depends on the width only (no autotuning).
# Register budgets were checked with ptxas for sm_90 (`ptxas -v`, fp32 and bf16, residual + weight +
# bias): about 8 (backward) to 16 (forward) row elements per thread fit without spills; above that
# ptxas spills (forward 16384 x 16 warps: 112 B; backward 8192 x 16 warps: 196 B).
_FWD_MAX_BLOCK = 8192    # widest row the forward keeps whole in registers
_BWD_MAX_BLOCK = 4096    # the backward holds ~8 row-sized values per row (z, dy, dz, w, xhat, ...)
_WIDE_BLOCK = 4096       # column block of the looping (wide-row) kernels, 16 warps
_FWD_TILE = 4096         # narrow rows: rows per program = _TILE // next_pow2(N), at most _MAX_ROWS
_BWD_TILE = 2048
_MAX_ROWS = 64
_WAVES = 32              # backward: programs per SM = _WAVES // num_warps (several CTAs in flight)
_CPU_SMS = 4             # "SM count" on the CPU interpreter: small, but > 1 to exercise the partials


def _num_warps(tile_elems: int) -> int:
    # 8 elements per thread (two 16-byte fp32 vectors), between 4 and 16 warps
    return max(4, min(16, tile_elems // 256))


def _fused_tile(N: int, M: int, tile: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows held whole in registers."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(tile // block_n, _MAX_ROWS, triton.next_power_of_2(M)))
    return block_m, block_n, _num_warps(block_m * block_n)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(t: Tensor) -> int:
    if t.is_cuda:
        return _cuda_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return _CPU_SMS  # interpreter on CPU tensors: never touch torch.cuda here


def _device_ctx(t: Tensor):
    # Triton launches on the current CUDA device: make it the tensor's device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    M, N = x.shape
    if x.numel() == 0:
        return reference.forward(x, residual, weight, bias, eps, rms)
    x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    acc = reference.stat_dtype(x.dtype)
    y = torch.empty_like(x)
    z = torch.empty_like(x) if residual is not None else None
    mean = None if rms else torch.empty((M,), dtype=acc, device=x.device)
    rstd = torch.empty((M,), dtype=acc, device=x.device)
    args = (
        x, residual.contiguous() if residual is not None else None, weight, bias, y, z, mean, rstd,
        M, N, float(eps),
    )
    flags = dict(
        ACC=_acc(x.dtype), HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, RMS=bool(rms),
    )
    with _device_ctx(x):
        if triton.next_power_of_2(N) <= _FWD_MAX_BLOCK:
            block_m, block_n, warps = _fused_tile(N, M, _FWD_TILE)
            _fwd_fused[(triton.cdiv(M, block_m),)](
                *args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps
            )
        else:
            _fwd_wide[(M,)](*args, **flags, BLOCK_N=_WIDE_BLOCK, num_warps=_num_warps(_WIDE_BLOCK))
    return y, z, mean, rstd


def _persistent_split(M: int, block_m: int, programs: int) -> Tuple[int, int]:
    """(rows per program, programs actually launched): contiguous row ranges, multiples of block_m.

    The partial buffer is sized by the returned count, which is exactly the grid."""
    blocks = triton.cdiv(M, block_m)
    rows_per_prog = triton.cdiv(blocks, max(1, min(programs, blocks))) * block_m
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


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
    M, N = z.shape
    if z.numel() == 0:
        return reference.backward(dy, dz, z, weight, bias, mean, rstd, rms)
    z = z.contiguous()
    dy = dy.contiguous()
    dz = dz.contiguous() if dz is not None else None
    weight = weight.contiguous() if weight is not None else None
    acc = reference.stat_dtype(z.dtype)
    dx = torch.empty_like(z)
    flags = dict(
        ACC=_acc(z.dtype), HAS_W=weight is not None, HAS_B=bias is not None, RMS=bool(rms),
    )
    sms = _sm_count(z)
    with _device_ctx(z):
        if triton.next_power_of_2(N) <= _BWD_MAX_BLOCK:
            block_m, block_n, warps = _fused_tile(N, M, _BWD_TILE)
            rows_per_prog, programs = _persistent_split(M, block_m, sms * max(1, _WAVES // warps))
            dwp = torch.empty((programs, N), dtype=acc, device=z.device) if weight is not None else None
            dbp = torch.empty((programs, N), dtype=acc, device=z.device) if bias is not None else None
            _bwd_fused[(programs,)](
                dy, dz, z, weight, mean, rstd, dx, dwp, dbp, M, N, rows_per_prog,
                **flags, HAS_DZ=dz is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            )
        else:
            c1 = torch.empty((M,), dtype=acc, device=z.device)
            c2 = None if rms else torch.empty((M,), dtype=acc, device=z.device)
            warps = _num_warps(_WIDE_BLOCK)
            _bwd_wide_rows[(M,)](
                dy, z, weight, mean, rstd, c1, c2, N,
                ACC=flags["ACC"], HAS_W=flags["HAS_W"], RMS=flags["RMS"], BLOCK_N=_WIDE_BLOCK,
                num_warps=warps,
            )
            col_blocks = triton.cdiv(N, _WIDE_BLOCK)
            groups = triton.cdiv(sms * max(1, _WAVES // warps), col_blocks)
            rows_per_prog, programs = _persistent_split(M, 1, groups)
            dwp = torch.empty((programs, N), dtype=acc, device=z.device) if weight is not None else None
            dbp = torch.empty((programs, N), dtype=acc, device=z.device) if bias is not None else None
            _bwd_wide_cols[(col_blocks, programs)](
                dy, dz, z, weight, mean, rstd, c1, c2, dx, dwp, dbp, M, N, rows_per_prog,
                **flags, HAS_DZ=dz is not None, BLOCK_M=1, BLOCK_N=_WIDE_BLOCK, num_warps=warps,
            )
    # fixed-order reduction of the per-program partials: deterministic
    dweight = dwp.sum(dim=0).to(weight.dtype) if weight is not None else None
    dbias = dbp.sum(dim=0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
