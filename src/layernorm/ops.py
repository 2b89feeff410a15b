"""The operators: one per op, one door for every device.

``torch.ops.layernorm.layer_norm``, ``rms_norm``, ``add_layer_norm``, ``add_rms_norm`` have torch's
signatures (plus the residual, and RMSNorm's ``offset``/``round_normalized`` for Hugging Face
numerics). They are defined by the C++ extension (``native/csrc/norm_ops.cpp``), which also gives
them their autograd formula, their Meta kernels (so fake tensors, ``torch.compile`` and
``torch.export`` trace through) and their CPU kernels. Underneath, every public op runs on two
kernel ops, ``layernorm::norm_forward`` and ``layernorm::norm_backward``; this module registers
their CUDA kernels, which are the Triton kernels of :mod:`layernorm.backends.triton` (Triton is a
Python library, so that registration lives here). Graphs and exported programs name only these ops:
never a backend.

When the extension cannot be built, :data:`NATIVE` is None, the ops do not exist, and
:mod:`layernorm.functional` runs on torch's own kernels.
"""
from __future__ import annotations

import functools
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backends import reference
from .native import load

__all__ = ["NATIVE", "native_layer_norm", "triton_forward", "triton_backward"]

#: The extension module (its Python entry points parse arguments like torch's own functions), or None.
NATIVE = load()


def _cols(normalized_shape: Sequence[int]) -> int:
    n = 1
    for s in normalized_shape:
        n *= int(s)
    return n


@functools.lru_cache(maxsize=None)
def _triton_backend():
    """The Triton launchers, or None (with one warning) where Triton does not import."""
    try:
        from .backends import triton as triton_backend
    except ImportError as exc:
        warnings.warn(
            f"layernorm: triton does not import ({exc}); CUDA tensors use the plain-PyTorch reference kernels. "
            f"Install triton (pip install 'layernorm[gpu]') for the fused kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return triton_backend


def triton_forward(input: Tensor, residual: Optional[Tensor], normalized_shape: List[int], weight: Optional[Tensor],
                   bias: Optional[Tensor], eps: float, rms: bool, offset: float,
                   round_normalized: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``layernorm::norm_forward`` for CUDA tensors: the Triton kernels on the (rows, cols) view."""
    N = _cols(normalized_shape)
    x2d = input.contiguous().view(-1, N) if N > 0 else input.reshape(input.numel(), 0)
    r2d = residual.contiguous().view(x2d.shape) if residual is not None else None
    w = weight.contiguous().view(-1) if weight is not None else None
    b = bias.contiguous().view(-1) if bias is not None else None
    impl = _triton_backend() if x2d.numel() > 0 else None
    if impl is None:
        y, z, mean, rstd = reference.forward(x2d, r2d, w, b, eps, rms, offset, round_normalized)
    else:
        y, z, mean, rstd = impl.forward(x2d, r2d, w, b, eps, rms, offset, round_normalized)
    empty = input.new_empty((0,))
    z = z.view(input.shape) if z is not None else empty
    mean = mean if mean is not None else empty.to(rstd.dtype)
    return y.view(input.shape), z, mean, rstd


def triton_backward(grad_out: Tensor, grad_sum: Optional[Tensor], input: Tensor, mean: Tensor, rstd: Tensor,
                    normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor], rms: bool,
                    offset: float, round_normalized: bool, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """``layernorm::norm_backward`` for CUDA tensors."""
    N = _cols(normalized_shape)
    h = input.contiguous().view(-1, N) if N > 0 else input.reshape(input.numel(), 0)
    dy = grad_out.contiguous().view(h.shape)
    dz = grad_sum.contiguous().view(h.shape) if grad_sum is not None else None
    w = weight.contiguous().view(-1) if weight is not None else None
    b = bias.contiguous().view(-1) if bias is not None else None
    impl = _triton_backend() if h.numel() > 0 else None
    args = (dy, dz, h, w, b, None if rms else mean, rstd, rms, offset, round_normalized)
    dx, dw, db = (impl or reference).backward(*args)
    empty = input.new_empty((0,))
    dx = dx.view(input.shape) if output_mask[0] else empty
    dw = dw.view(weight.shape) if (output_mask[1] and weight is not None) else empty
    db = db.view(bias.shape) if (output_mask[2] and bias is not None) else empty
    return dx, dw, db


if NATIVE is not None:
    torch.library.impl("layernorm::norm_forward", "CUDA")(triton_forward)
    torch.library.impl("layernorm::norm_backward", "CUDA")(triton_backward)


def native_layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`torch.native_layer_norm`'s outputs (output, mean, rstd), mean and rstd with torch's shape
    ``(*, 1, ..., 1)`` and dtype (the input's, or float32 for low-precision input with float32 parameters).

    The output is differentiable (through ``layernorm::layer_norm``); mean and rstd are not, as in torch.
    """
    from .functional import layer_norm

    out = layer_norm(input, normalized_shape, weight, bias, eps)
    k = len(normalized_shape)
    stat_shape = list(input.shape[: input.dim() - k]) + [1] * k
    params = [p for p in (weight, bias) if p is not None]
    mixed = input.dtype in (torch.float16, torch.bfloat16) and params and all(p.dtype == torch.float32 for p in params)
    stat_dtype = torch.float32 if mixed else input.dtype
    with torch.no_grad():
        if NATIVE is not None:
            _, _, mean, rstd = torch.ops.layernorm.norm_forward(
                input, None, list(normalized_shape), weight, bias, eps, False, 0.0, False
            )
        else:
            _, mean, rstd = torch.native_layer_norm(input, normalized_shape, weight, bias, eps)
    return out, mean.reshape(stat_shape).to(stat_dtype), rstd.reshape(stat_shape).to(stat_dtype)
