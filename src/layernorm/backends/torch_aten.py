"""The ``torch`` backend: delegates to ATen's own kernels. It is the baseline the others must beat.

Same contract as :mod:`layernorm.backends.reference`. LayerNorm uses ``aten::native_layer_norm`` and
its backward; RMSNorm uses ``aten::_fused_rms_norm`` where this torch has it, else the composite
formula (which is what ``torch.nn.functional.rms_norm`` runs on CPU).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["forward", "backward"]

_HAS_FUSED_RMS = hasattr(torch.ops.aten, "_fused_rms_norm") and hasattr(
    torch.ops.aten, "_fused_rms_norm_backward"
)


def _fused_rms(t: Tensor) -> bool:
    # aten::_fused_rms_norm_backward has CUDA kernels only; CPU runs the composite formula.
    return _HAS_FUSED_RMS and t.device.type == "cuda"


def _param_dtype(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> torch.dtype:
    # ATen's CPU kernels take float32 weight and bias with bf16/fp16 input ("mixed type") only when
    # every given parameter is float32; then mean/rstd are float32 too. Otherwise all share x's dtype.
    params = [p for p in (weight, bias) if p is not None]
    if (
        x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and params
        and all(p.dtype == torch.float32 for p in params)
    ):
        return torch.float32
    return x.dtype


def _common_dtype(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None):
    """(weight, bias) in the dtype ATen's kernels accept together with x."""
    dtype = _param_dtype(x, weight, bias)
    return tuple(None if p is None else p.to(dtype) for p in (weight, bias))


def forward(x, residual, weight, bias, eps, rms):
    acc = reference.stat_dtype(x.dtype)
    z = None
    h = x
    if residual is not None:
        z = torch.add(x, residual)
        h = z
    N = h.shape[-1]
    if rms:
        if _fused_rms(h):
            y, rstd = torch.ops.aten._fused_rms_norm(h, [N], _common_dtype(h, weight)[0], eps)
            return y, z, None, rstd.reshape(-1).to(acc)
        y, _, _, rstd = reference.forward(h, None, weight, None, eps, True)
        return y, z, None, rstd
    w, b = _common_dtype(h, weight, bias)
    y, mean, rstd = torch.native_layer_norm(h, [N], w, b, eps)
    return y, z, mean.reshape(-1).to(acc), rstd.reshape(-1).to(acc)


def backward(dy, dz, z, weight, bias, mean, rstd, rms):
    N = z.shape[-1]
    if rms:
        if _fused_rms(z):
            w = _common_dtype(z, weight)[0]
            dx, dweight = torch.ops.aten._fused_rms_norm_backward(
                dy, z, [N], rstd.reshape(-1, 1), w, [True, w is not None]
            )
            dbias = None
        else:
            dx, dweight, dbias = reference.backward(dy, None, z, weight, bias, None, rstd, True)
    else:
        w, b = _common_dtype(z, weight, bias)
        stat = _param_dtype(z, weight, bias)  # the dtype native_layer_norm returned mean/rstd in
        mask = [True, w is not None, b is not None]
        dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
            dy, z, [N], mean.reshape(-1, 1).to(stat), rstd.reshape(-1, 1).to(stat), w, b, mask,
        )
    if dz is not None:
        dx = dx + dz
    if weight is not None and dweight is not None:
        dweight = dweight.to(weight.dtype)
    if bias is not None and dbias is not None:
        dbias = dbias.to(bias.dtype)
    return dx, dweight if weight is not None else None, dbias if bias is not None else None
