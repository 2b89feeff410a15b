"""Functional API: the signatures of ``torch.nn.functional`` plus a keyword ``backend``.

Each function is a thin call of its operator (:mod:`layernorm.ops`): in eager mode through the
extension's entry point, which parses arguments with torch's own parser (same accepted types, errors
and ``__torch_function__`` handling as ``torch.nn.functional``) and dispatches like a torch builtin;
under ``torch.compile`` through ``torch.ops.layernorm.*``, which dynamo puts in the graph. Argument
checks and reshaping happen once, inside the operator.

``backend=`` (or the environment variable ``LAYERNORM_BACKEND``) overrides the operator's choice of
kernel: ``"torch"`` runs ``torch.nn.functional``, ``"reference"`` the plain-PyTorch spec, ``"cpu"``
and ``"triton"`` the operator on a device where that kernel runs (see :mod:`layernorm.backends`).
"""
from __future__ import annotations

import math
import os
import sys
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import ENV_VAR, reference, resolve_backend
from .ops import NATIVE

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"]

_ShapeLike = Union[int, Sequence[int], torch.Size]
_CASTING_MODES = ("torch", "llama")
_is_compiling = torch.compiler.is_compiling


def _round_normalized(casting_mode: str) -> bool:
    if casting_mode == "torch":
        return False
    if casting_mode == "llama":
        return True
    raise ValueError(f"casting_mode must be one of {_CASTING_MODES}, but got {casting_mode!r}")


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

    with the biased variance; statistics per row in float32 (float64 for float64 input), exact
    two-pass. Same signature, semantics and errors as :func:`torch.nn.functional.layer_norm`.

    Args:
        backend: ``"reference"``, ``"cpu"``, ``"torch"``, ``"triton"``, or None: the environment
            variable ``LAYERNORM_BACKEND``, else the operator's kernel for the tensor's device.

    Shape:
        input :math:`(*, \text{normalized\_shape})`; weight and bias ``normalized_shape``; output as input.

    Example::

        >>> x = torch.randn(4, 10, 64)
        >>> y = layer_norm(x, (64,))
    """
    if backend is None and NATIVE is not None and ENV_VAR not in os.environ:
        if _is_compiling():
            return torch.ops.layernorm.layer_norm(input, normalized_shape, weight, bias, eps)
        return NATIVE.layer_norm(input, normalized_shape, weight, bias, eps)
    return _override(backend, input, None, normalized_shape, weight, bias, eps, False)


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

    ``eps=None`` is torch 2.13's default: the machine epsilon of the type the op computes in (float32's
    for float32/bfloat16/float16 input, float64's for float64).

    Args:
        offset: added to the weight (Gemma stores ``w`` and multiplies by ``1 + w``). Default 0.
        casting_mode: ``"torch"``: normalize and scale in float32, round once (torch, Gemma, OLMo2);
            ``"llama"``: the normalized value is rounded to the input dtype before the weight
            multiply (Llama, Mistral, Qwen, Phi-3, T5). Identical for float32/float64 input.
        backend: as in :func:`layer_norm`.

    Example::

        >>> y = rms_norm(torch.randn(4, 10, 64), (64,), torch.ones(64))
    """
    if backend is None and NATIVE is not None and ENV_VAR not in os.environ:
        round_normalized = casting_mode != "torch" and _round_normalized(casting_mode)
        if _is_compiling():
            return torch.ops.layernorm.rms_norm(input, normalized_shape, weight, eps, offset, round_normalized)
        return NATIVE.rms_norm(input, normalized_shape, weight, eps, offset=offset, round_normalized=round_normalized)
    return _override(backend, input, None, normalized_shape, weight, None, eps, True, offset,
                     _round_normalized(casting_mode))


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
    if backend is None and NATIVE is not None and ENV_VAR not in os.environ:
        if _is_compiling():
            return torch.ops.layernorm.add_layer_norm(input, residual, normalized_shape, weight, bias, eps)
        return NATIVE.add_layer_norm(input, residual, normalized_shape, weight, bias, eps)
    return _override(backend, input, residual, normalized_shape, weight, bias, eps, False)


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
    if backend is None and NATIVE is not None and ENV_VAR not in os.environ:
        round_normalized = casting_mode != "torch" and _round_normalized(casting_mode)
        if _is_compiling():
            return torch.ops.layernorm.add_rms_norm(
                input, residual, normalized_shape, weight, eps, offset, round_normalized
            )
        return NATIVE.add_rms_norm(
            input, residual, normalized_shape, weight, eps, offset=offset, round_normalized=round_normalized
        )
    return _override(backend, input, residual, normalized_shape, weight, None, eps, True, offset,
                     _round_normalized(casting_mode))


# ---- backend overrides --------------------------------------------------------------------------------

def _override(backend, input, residual, normalized_shape, weight, bias, eps, rms, offset=0.0,
              round_normalized=False):
    """The same op through the kernel ``backend`` (or ``LAYERNORM_BACKEND``) names."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, but got {type(input).__name__}")
    name = resolve_backend(backend, input.device, input.dtype, rms)
    if name == "torch":
        return _torch_norm(input, residual, normalized_shape, weight, bias, eps, rms, offset, round_normalized)
    if name == "cpu" or (name == "triton" and input.device.type == "cuda"):
        args = (input,) + ((residual,) if residual is not None else ()) + (normalized_shape, weight)
        args += (eps, offset, round_normalized) if rms else (bias, eps)
        if _is_compiling():
            op_name = ("add_" if residual is not None else "") + ("rms_norm" if rms else "layer_norm")
            return getattr(torch.ops.layernorm, op_name)(*args)
        return _EAGER_OPS[(rms, residual is not None)](*args)
    # reference, or Triton's interpreter on CPU tensors: (rows, cols) views, checks of the operators
    shape = _as_shape(normalized_shape)
    if eps is None:
        eps = sys.float_info.epsilon if input.dtype == torch.float64 else torch.finfo(torch.float32).eps
    if NATIVE is not None and not _is_compiling():  # dynamo cannot trace into the extension's function
        NATIVE.check_args(input, residual, shape, weight, bias, rms)
    N = math.prod(shape)
    M = math.prod(input.shape[: input.dim() - len(shape)])  # explicit: view(-1, 0) is ambiguous
    x2d = input.contiguous().view(M, N)
    r2d = residual.contiguous().view(M, N) if residual is not None else None
    w = weight.contiguous().view(-1) if weight is not None else None
    b = bias.contiguous().view(-1) if bias is not None else None
    if name == "reference" and N == 0:  # rows without columns: nothing to normalize; keep the graph
        z = x2d if r2d is None else x2d + r2d
        y = z * (w if w is not None else 1) + (b if b is not None else 0)
    elif name == "reference":
        y, z, _, _ = reference.forward(x2d, r2d, w, b, float(eps), rms, offset, round_normalized)
    else:
        y, z = _InterpretedTriton.apply(x2d, r2d, w, b, float(eps), rms, offset, round_normalized)
    y = y.view(input.shape)
    return y if residual is None else (y, z.view(input.shape))


def _as_shape(normalized_shape) -> List[int]:
    # torch's rule: a tuple/list of ints (an int is refused by torch.nn.functional as well)
    if isinstance(normalized_shape, (str, bytes)) or not isinstance(normalized_shape, (list, tuple, torch.Size)):
        raise TypeError(f"normalized_shape must be tuple of ints, not {type(normalized_shape).__name__}")
    for s in normalized_shape:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"normalized_shape must be tuple of ints, but found element of type "
                            f"{type(s).__name__}")
    return [int(s) for s in normalized_shape]


def _torch_norm(input, residual, normalized_shape, weight, bias, eps, rms, offset, round_normalized):
    """torch.nn.functional, with the residual add and Hugging Face's RMSNorm numerics composed."""
    F = torch.nn.functional
    h = input if residual is None else input + residual
    if not rms:
        y = F.layer_norm(h, normalized_shape, weight, bias, eps)
    elif round_normalized and weight is not None:  # Llama: w * xhat.to(input dtype)
        y = (F.rms_norm(h, normalized_shape, None, eps) * (weight + offset)).to(h.dtype)
    elif offset != 0.0 and weight is not None:  # Gemma: xhat * (1 + w) in float32, rounded once
        y = F.rms_norm(h, normalized_shape, weight.float() + offset, eps)
    else:
        y = F.rms_norm(h, normalized_shape, weight, eps)
    return y if residual is None else (y, h)


class _InterpretedTriton(torch.autograd.Function):
    """The Triton launchers on CPU tensors (``TRITON_INTERPRET=1``): the kernels the CUDA operators
    run, reachable without a GPU so the test-suite can check them forward and backward."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms, offset, round_normalized):
        from .backends import triton as impl

        y, z, mean, rstd = impl.forward(x, residual, weight, bias, eps, rms, offset, round_normalized)
        ctx.save_for_backward(z if residual is not None else x, weight, bias, mean, rstd)
        ctx.flags = (rms, offset, round_normalized, residual is not None)
        return y, z

    @staticmethod
    def backward(ctx, dy, dz):
        from .backends import triton as impl

        h, weight, bias, mean, rstd = ctx.saved_tensors
        rms, offset, round_normalized, has_residual = ctx.flags
        if dy is None:
            dy = torch.zeros_like(h)
        dx, dw, db = impl.backward(dy.contiguous(), dz.contiguous() if (has_residual and dz is not None) else None,
                                   h, weight, bias, mean, rstd, rms, offset, round_normalized)
        return dx, (dx if has_residual else None), dw, db, None, None, None, None


def _register_for_torchscript(fn, op: str) -> None:
    """Make TorchScript compile calls of ``fn`` to the operator ``op`` (as it does for torch's builtins)."""
    from torch.jit import _builtins

    if _builtins._builtin_table is None:  # not built yet: it reads this list when it is
        _builtins._builtin_ops.append((fn, op))
    else:
        _builtins._register_builtin(fn, op)


_EAGER_OPS = {}
if NATIVE is not None:
    _EAGER_OPS = {
        (False, False): NATIVE.layer_norm,
        (True, False): lambda x, s, w, eps, offset, rn: NATIVE.rms_norm(x, s, w, eps, offset=offset, round_normalized=rn),
        (False, True): NATIVE.add_layer_norm,
        (True, True): lambda x, r, s, w, eps, offset, rn: NATIVE.add_rms_norm(
            x, r, s, w, eps, offset=offset, round_normalized=rn
        ),
    }
    # __torch_function__ overrides receive this module's functions, as torch's receive its own.
    NATIVE.set_torch_function_api(sys.modules[__name__])
    for _fn in (layer_norm, rms_norm, add_layer_norm, add_rms_norm):
        _register_for_torchscript(_fn, f"layernorm::{_fn.__name__}")
