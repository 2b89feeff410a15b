r"""The recurrences as functions: the sequential part of one layer and direction, any backend.

:func:`lstm_recurrence` and :func:`gru_recurrence` validate their arguments against the contract
(:mod:`layernorm.rnn.contract`), pick the implementation (:mod:`layernorm.rnn.dispatch`) and run it:
the reference loop directly; any other backend as ONE autograd node per call (eagerly an
``autograd.Function``, under ``torch.compile`` the custom operators of :mod:`layernorm.rnn.ops`),
whose backward through time is the implementation's own. Under ``no_grad`` (or when no input
requires grad) nothing is saved.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference
from .contract import GRUArgs, LSTMArgs, check_gru, check_lstm
from .dispatch import implementation, resolve

__all__ = ["lstm_recurrence", "gru_recurrence", "resolved_backend"]


def resolved_backend(backend: Optional[str], device, dtype: torch.dtype) -> str:
    """The concrete backend (``reference``, ``torch``, ``cpp``, ``triton``) ``backend`` runs for tensors
    of this device and dtype (resolved once while tracing under ``torch.compile``)."""
    if torch.compiler.is_compiling():
        from ._compile import resolve_constant

        return resolve_constant(backend, torch.device(device).type, dtype)
    return resolve(backend, device, dtype)


def _needs_grad(ts) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in ts)


class _LSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, lengths, eps, xw, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight,
                ln_cell_bias, w_hr, recurrent_mask, zoneout_h, zoneout_c):
        a = LSTMArgs(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr,
                     recurrent_mask, zoneout_h, zoneout_c, eps)
        out, h_n, c_n, *saved = impl.lstm_forward(a, True)
        ctx.save_for_backward(xw, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr,
                              recurrent_mask, zoneout_h, zoneout_c, out, *saved)
        ctx.impl, ctx.lengths, ctx.eps = impl, lengths, eps
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        (xw, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr, recurrent_mask,
         zoneout_h, zoneout_c, out, *saved) = ctx.saved_tensors
        a = LSTMArgs(xw, ctx.lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias,
                     w_hr, recurrent_mask, zoneout_h, zoneout_c, ctx.eps)
        g = ctx.impl.lstm_backward(a, out, *saved, dout, dh_n, dc_n)
        return (None, None, None, *g, None, None, None)


class _GRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, lengths, eps, xw, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask,
                zoneout_h):
        a = GRUArgs(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h, eps)
        out, h_n, *saved = impl.gru_forward(a, True)
        ctx.save_for_backward(xw, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h,
                              out, *saved)
        ctx.impl, ctx.lengths, ctx.eps = impl, lengths, eps
        return out, h_n

    @staticmethod
    def backward(ctx, dout, dh_n):
        (xw, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h, out,
         *saved) = ctx.saved_tensors
        a = GRUArgs(xw, ctx.lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h,
                    ctx.eps)
        g = ctx.impl.gru_backward(a, out, *saved, dout, dh_n)
        return (None, None, None, *g, None, None)


def lstm_recurrence(
    xw: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias: Optional[Tensor],
    ln_ih_weight: Tensor,
    ln_cell_weight: Optional[Tensor] = None,
    ln_cell_bias: Optional[Tensor] = None,
    *,
    w_hr: Optional[Tensor] = None,
    recurrent_mask: Optional[Tensor] = None,
    zoneout_h: Optional[Tensor] = None,
    zoneout_c: Optional[Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The LN-LSTM recurrence of one layer and direction over T steps.

    .. math::
        a_t = \mathrm{LN}(x^w_t; g_{ih}) + \mathrm{LN}((h_{t-1} \odot \rho) W_{hh}^T; g_{hh}) + b,\quad
        \tilde c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g),\quad
        \tilde h_t = [\sigma(o) \odot \tanh(\mathrm{LN}(\tilde c_t; g_c, b_c))]\, W_{hr}^T

    then zoneout :math:`c_t = \tilde c_t + \zeta^c_t (c_{t-1} - \tilde c_t)` (and h alike); rows past
    their length keep their state and output 0. Arguments, shapes and the saved tensors:
    :mod:`layernorm.rnn.contract` (``xw`` is the raw projection :math:`x W_{ih}^T`, (T, B, 4H)).

    Returns:
        out (T, B, R), h_n (B, R), c_n (B, H), with R = ``w_hr.shape[0]`` or H.

    Example::

        >>> T, B, H = 5, 3, 8
        >>> xw, h0 = torch.randn(T, B, 4 * H), torch.zeros(B, H)
        >>> w_hh, ones = torch.randn(4 * H, H) / H ** 0.5, torch.ones(4 * H)
        >>> out, h_n, c_n = lstm_recurrence(xw, None, h0, h0, w_hh, ones, None, ones)
        >>> out.shape
        torch.Size([5, 3, 8])
    """
    a = check_lstm(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr,
                   recurrent_mask, zoneout_h, zoneout_c, eps)
    name = resolved_backend(backend, a.xw.device, a.xw.dtype)
    if name == "reference":
        return reference.lstm_recurrence(*a)
    grad = _needs_grad(a)
    if torch.compiler.is_compiling():
        from .ops import lstm_recurrence_op

        res = lstm_recurrence_op(*a, grad, name)
        return res[0], res[1], res[2]
    impl = implementation(name)
    if not grad:
        with torch.no_grad():
            res = impl.lstm_forward(a, False)
        return res[0], res[1], res[2]
    return _LSTM.apply(impl, a.lengths, a.eps, *a[:1], *a[2:14])


def gru_recurrence(
    xw: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    ln_ih_weight: Tensor,
    *,
    recurrent_mask: Optional[Tensor] = None,
    zoneout_h: Optional[Tensor] = None,
    eps: float = 1e-5,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The LN-GRU recurrence of one layer and direction over T steps.

    .. math::
        [r, u] = \sigma(\mathrm{LN}(x^{w,ru}_t) + b^{ru}_{ih} + \mathrm{LN}((h \odot \rho) W^{ru\,T}_{hh}) + b^{ru}_{hh}),\quad
        n = \tanh(\mathrm{LN}(x^{w,n}_t) + b^n_{ih} + r \odot (\mathrm{LN}((h \odot \rho) W^{n\,T}_{hh}) + b^n_{hh})),\quad
        \tilde h_t = u \odot h_{t-1} + (1 - u) \odot n

    then zoneout and lengths as :func:`lstm_recurrence`. ``xw``: (T, B, 3H), gates r, u (``nn.GRU``'s
    z), n; the LNs run over the [r, u] block and the n block apart. Returns out (T, B, H), h_n (B, H).

    Example::

        >>> xw, h0 = torch.randn(5, 3, 24), torch.zeros(3, 8)
        >>> out, h_n = gru_recurrence(xw, None, h0, torch.randn(24, 8) / 3, torch.ones(24), None, None, torch.ones(24))
    """
    a = check_gru(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h, eps)
    name = resolved_backend(backend, a.xw.device, a.xw.dtype)
    if name == "reference":
        return reference.gru_recurrence(*a)
    grad = _needs_grad(a)
    if torch.compiler.is_compiling():
        from .ops import gru_recurrence_op

        res = gru_recurrence_op(*a, grad, name)
        return res[0], res[1]
    impl = implementation(name)
    if not grad:
        with torch.no_grad():
            res = impl.gru_forward(a, False)
        return res[0], res[1]
    return _GRU.apply(impl, a.lengths, a.eps, *a[:1], *a[2:10])
