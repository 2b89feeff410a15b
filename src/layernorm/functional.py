"""Functional API: the signatures of ``torch.nn.functional`` plus a keyword ``backend``.

This is the only place where inputs are checked and reshaped to (rows, cols); everything below it
(custom ops, backends, kernels) sees 2-D contiguous tensors that are known to be valid.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .backends import available_backends, reference, resolve_backend

__all__ = [
    "layer_norm",
    "rms_norm",
    "add_layer_norm",
    "add_rms_norm",
    "available_backends",
]

_ShapeLike = Union[int, Sequence[int], torch.Size]
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _as_shape(normalized_shape: _ShapeLike) -> List[int]:
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    try:
        shape = [int(s) for s in normalized_shape]
    except TypeError:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, but got {normalized_shape!r}"
        ) from None
    if len(shape) == 0:
        raise ValueError("normalized_shape must be non-empty: it names the trailing dimensions to normalize over")
    if any(s < 0 for s in shape):
        raise ValueError(f"normalized_shape must not contain negative sizes, but got {shape}")
    return shape


def _check_input(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64), but got {t.dtype}"
        )


def _check_param(name: str, p: Optional[Tensor], x: Tensor, shape: List[int]) -> Optional[Tensor]:
    if p is None:
        return None
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, but got {type(p).__name__}")
    if list(p.shape) != shape:
        raise ValueError(
            f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
            f"{list(p.shape)} and normalized_shape = {shape}"
        )
    if p.device != x.device:
        raise ValueError(f"Expected {name} on the input's device {x.device}, but got {name} on {p.device}")
    mixed_ok = x.dtype in _LOW_PRECISION and p.dtype == torch.float32
    if p.dtype != x.dtype and not mixed_ok:
        raise TypeError(
            f"Expected {name} to have the input's dtype {x.dtype}"
            + (" or torch.float32" if x.dtype in _LOW_PRECISION else "")
            + f", but got {name} of dtype {p.dtype}"
        )
    return p.contiguous().view(-1)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, but got {type(eps).__name__}")
    eps = float(eps)
    if not (eps >= 0.0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, but got eps={eps}")
    return eps


def _prepare(input: Tensor, normalized_shape: _ShapeLike) -> Tuple[List[int], int]:
    _check_input("input", input)
    shape = _as_shape(normalized_shape)
    k = len(shape)
    if input.dim() < k or list(input.shape[input.dim() - k:]) != shape:
        raise ValueError(
            f"Given normalized_shape={shape}, expected input with shape [*, {', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}"
        )
    return shape, math.prod(shape)


def _aten_takes(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """True when torch.nn.functional accepts these dtypes as they are (all equal, or all-fp32
    parameters with bf16/fp16 input on CPU); otherwise the torch backend's own casting path runs."""
    params = [p for p in (weight, bias) if p is not None]
    if all(p.dtype == x.dtype for p in params):
        return True
    return x.device.type == "cpu" and x.dtype in _LOW_PRECISION and all(p.dtype == torch.float32 for p in params)


_CASTING_MODES = ("torch", "llama")


def _norm(input, residual, normalized_shape, weight, bias, eps, rms, backend, offset=0.0, casting_mode="torch"):
    shape, N = _prepare(input, normalized_shape)
    if casting_mode not in _CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {_CASTING_MODES}, but got {casting_mode!r}")
    round_normalized = casting_mode == "llama" and input.dtype != reference.stat_dtype(input.dtype)
    if offset != 0.0 or round_normalized:
        # Hugging Face numerics (Gemma's 1 + w, Llama's casting): the spec, until the native op has them.
        backend = "reference"
    if residual is not None:
        _check_input("residual", residual)
        if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                "Expected residual with the input's shape, dtype and device "
                f"({list(input.shape)}, {input.dtype}, {input.device}), but got "
                f"({list(residual.shape)}, {residual.dtype}, {residual.device})"
            )
    w = _check_param("weight", weight, input, shape)
    b = _check_param("bias", bias, input, shape)
    if eps is None and rms:  # RMSNorm's default, as in torch: the input dtype's machine epsilon
        eps = torch.finfo(input.dtype).eps
    eps = _check_eps(eps)
    name = resolve_backend(backend, input.device, input.dtype, rms)
    if name == "torch" and not torch.compiler.is_compiling() and _aten_takes(input, weight, bias):
        # The torch backend *is* ATen: in eager mode call it the way torch users do, so choosing
        # it (automatically for bf16/fp16 on CPU) costs nothing over torch.nn.functional.
        h = input if residual is None else input + residual
        if rms:
            y = torch.nn.functional.rms_norm(h, shape, weight, eps)
        else:
            y = torch.nn.functional.layer_norm(h, shape, weight, bias, eps)
        return y if residual is None else (y, h)
    M = math.prod(input.shape[: input.dim() - len(shape)])  # explicit: view(-1, 0) is ambiguous
    x2d = input.contiguous().view(M, N)  # the one reshape to (rows, cols)
    r2d = residual.contiguous().view(M, N) if residual is not None else None
    if name == "reference" and x2d.numel() > 0:  # empty input: the custom op's no-launch path
        # The spec runs as plain PyTorch under autograd: differentiable to any order, and the
        # oracle against which the custom-op path (hand-written backward) is tested.
        y, z, _, _ = reference.forward(x2d, r2d, w, b, eps, rms, offset, round_normalized)
    else:
        y, z, _, _ = ops.norm(x2d, r2d, w, b, eps, rms, name)
    y = y.view(input.shape)
    if residual is None:
        return y
    return y, z.view(input.shape)


def layer_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dimensions.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    with the biased variance, statistics per row in float32 (float64 for float64 input).
    Same signature and semantics as :func:`torch.nn.functional.layer_norm`.

    Args:
        backend: ``"reference"``, ``"cpu"``, ``"torch"``, ``"triton"``, or None: the environment
            variable ``LAYERNORM_BACKEND``, else the fastest measured backend for the device and dtype.

    Example::

        >>> x = torch.randn(4, 10, 64)
        >>> y = layer_norm(x, (64,))
    """
    return _norm(input, None, normalized_shape, weight, bias, eps, False, backend)


def rms_norm(
    input: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
    backend: Optional[str] = None,
) -> Tensor:
    r"""Root-mean-square normalization, as :func:`torch.nn.functional.rms_norm`.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \cdot (\text{offset} + \gamma)

    ``eps=None`` means ``torch.finfo(input.dtype).eps``, as in torch.

    Args:
        offset: added to the weight (Gemma stores ``w`` and multiplies by ``1 + w``). Default 0.
        casting_mode: ``"torch"``: normalize and scale in float32, round once (torch, Gemma, OLMo2);
            ``"llama"``: the normalized value is rounded to the input dtype before the weight
            multiply (Llama, Mistral, Qwen, Phi-3, T5). Identical for float32/float64 input.
    """
    return _norm(input, None, normalized_shape, weight, None, eps, True, backend, offset, casting_mode)


def add_layer_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused pre-norm residual: returns ``(layer_norm(input + residual), input + residual)``.

    The sum is read once and written once; backward accepts gradients for both outputs.

    Example::

        >>> h = torch.randn(8, 512); r = torch.randn(8, 512)
        >>> normed, r = add_layer_norm(h, r, (512,))
    """
    return _norm(input, residual, normalized_shape, weight, bias, eps, False, backend)


def add_rms_norm(
    input: Tensor,
    residual: Tensor,
    normalized_shape: _ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    offset: float = 0.0,
    casting_mode: str = "torch",
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Fused pre-norm residual: returns ``(rms_norm(input + residual), input + residual)``;
    ``offset`` and ``casting_mode`` as in :func:`rms_norm`."""
    return _norm(input, residual, normalized_shape, weight, None, eps, True, backend, offset, casting_mode)
