"""The reference backend: plain PyTorch, written to be read. It is the spec.

Every other backend (``cpu``, ``torch``, ``triton``) is tested against these two functions, forward
and backward. The maths is derived in ``docs/math.md``; the code follows the derivation line by line.

Shapes: ``M`` rows, ``N`` columns (the flattened ``normalized_shape``). Statistics are computed in
float32 (float64 for float64 input), whatever the input dtype.

Backend contract (every backend module exposes exactly these two functions):

``forward(x, residual, weight, bias, eps, rms, offset=0, round_normalized=False) -> (y, z, mean, rstd)``
    x, residual: (M, N) contiguous, same dtype; residual may be None.
    weight, bias: (N,) contiguous or None (float32 weights with low-precision x are allowed).
    z = x + residual (rounded to x.dtype), or None when residual is None. The norm is taken of z
    (of x when there is no residual). y has x.dtype. mean is None when rms. mean, rstd: (M,) in the
    statistics dtype (float32, or float64 for float64 input). ``offset`` is added to the weight
    (Gemma's ``1 + w``); ``round_normalized`` rounds xhat to x's dtype before the weight multiply
    (Llama's ``w * xhat.to(input_dtype)``).

``backward(dy, dz, z, weight, bias, mean, rstd, rms, offset=0, round_normalized=False) -> (dx, dweight, dbias)``
    z is the tensor that was normalized (x, or x + residual). dz: gradient flowing into the
    residual output z, or None. dx has z.dtype and already includes dz (so it is the gradient of
    both x and residual in the fused case). dweight/dbias have the dtype of weight/bias, or are
    None when weight/bias is None.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["forward", "backward", "stat_dtype", "row_rstd"]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and reductions are computed in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_rstd(centered: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(centered**2) + eps) per row, without overflow for huge rows.

    Squaring a float32 value above ~1.8e19 overflows to inf, which makes the plain formula return
    rstd = 0 (and y = 0). For such rows we pre-scale by the row's largest magnitude s:
    mean(c**2) = s**2 * mean((c/s)**2), so rstd = 1 / (s * sqrt(mean((c/s)**2) + eps/s**2)).
    """
    var = centered.square().mean(dim=-1)                       # (M,) inf when c**2 overflowed
    rstd = torch.rsqrt(var + eps)                              # (M,)
    scale = centered.abs().amax(dim=-1)                        # (M,) NaN/inf for non-finite rows
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # (M,) avoids 0/0 on constant rows
    scaled_var = (centered / safe[:, None]).square().mean(dim=-1)  # (M,) in [1/N, 1]
    scaled_rstd = torch.rsqrt(scaled_var + eps / safe.square()) / safe  # (M,)
    overflowed = torch.isinf(var) & torch.isfinite(scale)      # (M,) finite rows lost to overflow
    rstd = torch.where(overflowed, scaled_rstd, rstd)          # (M,)
    return rstd


def forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    offset: float = 0.0,
    round_normalized: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """``offset`` is added to the weight (Gemma's ``1 + w``); ``round_normalized`` rounds xhat to
    x's dtype before the weight multiply (Llama's casting: ``w * xhat.to(input_dtype)``)."""
    acc = stat_dtype(x.dtype)
    z = None
    if residual is not None:
        z = (x.to(acc) + residual.to(acc)).to(x.dtype)         # (M, N) pre-norm sum, stored dtype
    h = (x if z is None else z).to(acc)                        # (M, N) what is normalized
    if rms:
        mean = None
        centered = h                                           # (M, N) RMSNorm does not centre
    else:
        mean = h.mean(dim=-1)                                  # (M,)
        centered = h - mean[:, None]                           # (M, N)
    rstd = row_rstd(centered, eps)                             # (M,)
    xhat = centered * rstd[:, None]                            # (M, N) zero mean (LN), unit RMS
    if round_normalized:
        xhat = xhat.to(x.dtype).to(acc)                        # (M, N) rounded as the input dtype
    y = xhat
    if weight is not None:
        y = y * (weight.to(acc) + offset)                      # (M, N) gain per column
    if bias is not None:
        y = y + bias.to(acc)                                   # (M, N) shift per column
    return y.to(x.dtype), z, mean, rstd


def backward(
    dy: Tensor,
    dz: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    rms: bool,
    offset: float = 0.0,
    round_normalized: bool = False,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    acc = stat_dtype(z.dtype)
    h = z.to(acc)                                              # (M, N)
    g = dy.to(acc)                                             # (M, N) dL/dy
    centered = h if rms else h - mean[:, None]                 # (M, N)
    xhat = centered * rstd[:, None]                            # (M, N)
    scaled = xhat.to(z.dtype).to(acc) if round_normalized else xhat  # (M, N) what the weight multiplied
    dweight = (g * scaled).sum(dim=0) if weight is not None else None  # (N,)
    dbias = g.sum(dim=0) if bias is not None else None         # (N,)
    dxhat = g * (weight.to(acc) + offset) if weight is not None else g  # (M, N) dL/dxhat
    # dL/dh = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)); RMSNorm drops mean(dxhat)
    proj = (dxhat * xhat).mean(dim=-1, keepdim=True)           # (M, 1)
    dh = dxhat - xhat * proj                                   # (M, N)
    if not rms:
        dh = dh - dxhat.mean(dim=-1, keepdim=True)             # (M, N)
    dh = dh * rstd[:, None]                                    # (M, N)
    if dz is not None:
        dh = dh + dz.to(acc)                                   # (M, N) gradient through the residual output
    dx = dh.to(z.dtype)
    if dweight is not None:
        dweight = dweight.to(weight.dtype)
    if dbias is not None:
        dbias = dbias.to(bias.dtype)
    return dx, dweight, dbias
