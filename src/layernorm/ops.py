"""``torch.library`` custom ops: the one door through which every backend is called.

``layernorm::norm_fwd`` and ``layernorm::norm_bwd`` take 2-D contiguous tensors (the reshaping to
(rows, cols) happens once, in :mod:`layernorm.functional`). Each op has a fake (meta) implementation,
so ``torch.compile(fullgraph=True)`` traces through them, and ``norm_fwd`` has a registered autograd
formula. Optional outputs are returned as empty tensors because custom ops cannot return None.

Double backward (``create_graph=True``, e.g. gradgradcheck) evaluates the reference backward
formulas on autograd-tracked tensors, so every backend supports it, fused residual ops included, at
reference speed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends import reference

__all__ = ["norm", "norm_fwd", "norm_bwd", "forward_impl", "backward_impl"]

_EMPTY = (0,)


def forward_impl(x, residual, weight, bias, eps, rms, backend):
    """The forward both doors share: returns (y, z, mean, rstd) with empty tensors for absent ones."""
    acc = reference.stat_dtype(x.dtype)
    M = x.shape[0]
    if x.numel() == 0:  # zero rows or zero columns: nothing to normalize, nothing to launch
        y = torch.empty_like(x)
        z = torch.empty_like(x) if residual is not None else x.new_empty(_EMPTY)
        mean = x.new_empty(_EMPTY, dtype=acc) if rms else x.new_zeros((M,), dtype=acc)
        return y, z, mean, x.new_zeros((M,), dtype=acc)
    y, z, mean, rstd = backends.get_backend(backend).forward(x, residual, weight, bias, eps, rms)
    if z is None:
        z = x.new_empty(_EMPTY)
    if mean is None:
        mean = x.new_empty(_EMPTY, dtype=acc)
    return y, z, mean, rstd


@torch.library.custom_op("layernorm::norm_fwd", mutates_args=())
def norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    rms: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, mean, rstd); z is empty without residual, mean is empty for RMSNorm."""
    return forward_impl(x, residual, weight, bias, eps, rms, backend)


@norm_fwd.register_fake
def _(x, residual, weight, bias, eps, rms, backend):
    acc = reference.stat_dtype(x.dtype)
    M = x.shape[0]
    y = torch.empty_like(x)
    z = torch.empty_like(x) if residual is not None else x.new_empty(_EMPTY)
    mean = x.new_empty(_EMPTY, dtype=acc) if rms else x.new_empty((M,), dtype=acc)
    rstd = x.new_empty((M,), dtype=acc)
    return y, z, mean, rstd


def backward_impl(dy, dz, z, weight, mean, rstd, bias, rms, backend):
    """The backward both doors share: (dx, dweight, dbias), empty tensors for absent parameters."""
    if z.numel() == 0:
        dx = torch.zeros_like(z) if dz is None else dz.clone()
        dw = torch.zeros_like(weight) if weight is not None else z.new_empty(_EMPTY)
        db = torch.zeros_like(bias) if bias is not None else z.new_empty(_EMPTY)
        return dx, dw, db
    dx, dw, db = backends.get_backend(backend).backward(
        dy, dz, z, weight, bias, None if rms else mean, rstd, rms
    )
    if dw is None:
        dw = z.new_empty(_EMPTY)
    if db is None:
        db = z.new_empty(_EMPTY)
    return dx, dw, db


@torch.library.custom_op("layernorm::norm_bwd", mutates_args=())
def norm_bwd(
    dy: Tensor,
    dz: Optional[Tensor],
    z: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    bias: Optional[Tensor],
    rms: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dweight/dbias are empty when there is no weight/bias.

    ``bias`` is passed only for its presence and dtype: the backward does not read its values."""
    return backward_impl(dy, dz, z, weight, mean, rstd, bias, rms, backend)


@norm_bwd.register_fake
def _(dy, dz, z, weight, mean, rstd, bias, rms, backend):
    dx = torch.empty_like(z)
    dw = torch.empty_like(weight) if weight is not None else z.new_empty(_EMPTY)
    db = torch.empty_like(bias) if bias is not None else z.new_empty(_EMPTY)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, rms, backend = inputs
    y, z, mean, rstd = output
    normalized = z if residual is not None else x
    ctx.save_for_backward(normalized, weight, bias, mean, rstd)
    ctx.eps = eps
    ctx.rms = rms
    ctx.backend = backend
    ctx.has_residual = residual is not None


def _double_differentiable_backward(ctx, dy, dz, normalized, weight, bias):
    """Backward as a differentiable graph (for create_graph=True): the reference formulas, run on
    autograd-tracked tensors so the returned grads are differentiable in dy, the input and weight.

    The formulas are evaluated directly rather than with ``torch.autograd.grad`` of the forward:
    in the fused case ``normalized`` is the op's own output z, and asking autograd for grads with
    respect to z and weight re-enters this op's backward node (which also leads to weight) forever.
    """
    with torch.enable_grad():
        _, _, mean, rstd = reference.forward(normalized, None, None, None, ctx.eps, ctx.rms)
        dx, dw, db = reference.backward(dy, dz, normalized, weight, bias, mean, rstd, ctx.rms)
    return dx, dw, db


def _grads(ctx, dy, dz, bwd):
    normalized, weight, bias, mean, rstd = ctx.saved_tensors
    if not ctx.has_residual:
        dz = None
    if torch.is_grad_enabled():
        dx, dw, db = _double_differentiable_backward(ctx, dy, dz, normalized, weight, bias)
    else:
        dx, dw, db = bwd(
            dy.contiguous(), None if dz is None else dz.contiguous(), normalized, weight, mean, rstd,
            bias, ctx.rms, ctx.backend,
        )
        dw = dw if weight is not None else None
        db = db if bias is not None else None
    dres = dx if ctx.has_residual else None
    return dx, dres, dw, db, None, None, None


def _backward(ctx, dy, dz, dmean, drstd):
    return _grads(ctx, dy, dz, norm_bwd)


torch.library.register_autograd("layernorm::norm_fwd", _backward, setup_context=_setup_context)


class _EagerNorm(torch.autograd.Function):
    """The same forward/backward as the custom op, for eager mode.

    A custom op's Python dispatch costs ~20 us per call, a quarter of a 4 MB LayerNorm on CPU;
    ``torch.autograd.Function`` costs a few. Under ``torch.compile`` the custom op is used instead
    (dynamo needs its fake implementation), so both doors run ``forward_impl``/``backward_impl``.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, rms, backend):
        out = forward_impl(x, residual, weight, bias, eps, rms, backend)
        _setup_context(ctx, (x, residual, weight, bias, eps, rms, backend), out)
        ctx.mark_non_differentiable(out[2], out[3])
        return out

    @staticmethod
    def backward(ctx, dy, dz, dmean, drstd):
        return _grads(ctx, dy, dz, backward_impl)


def norm(x, residual, weight, bias, eps, rms, backend):
    """(y, z, mean, rstd) through the cheapest door that is correct in the current context."""
    if torch.compiler.is_compiling():
        return norm_fwd(x, residual, weight, bias, eps, rms, backend)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias)
    )
    if not needs_grad:
        return forward_impl(x, residual, weight, bias, eps, rms, backend)
    return _EagerNorm.apply(x, residual, weight, bias, eps, rms, backend)
