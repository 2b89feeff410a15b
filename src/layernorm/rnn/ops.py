"""The recurrences as custom operators, for ``torch.compile`` and ``torch.export``.

Dynamo cannot trace the extension's pybind calls nor the implementations' Python time loops, so
under compilation :func:`layernorm.rnn.lstm_recurrence` / :func:`~layernorm.rnn.gru_recurrence` call
one opaque operator per layer and direction instead of their ``autograd.Function``:

- ``layernorm::lstm_recurrence`` / ``layernorm::gru_recurrence``: the forward, returning the outputs
  and the saved tensors of :mod:`layernorm.rnn.contract` (empty when ``save`` is False);
- ``layernorm::lstm_recurrence_backward`` / ``layernorm::gru_recurrence_backward``: the gradients
  (empty where an input is absent), the autograd formula of the forward op.

The backend (``torch``, ``cpp``, ``triton``) is resolved while tracing and crosses the op boundary
as a string. Every implementation saves the same tensors with the same shapes, so the fake kernels
below are the contract's shapes and nothing else.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .contract import GRUArgs, LSTMArgs, check_lengths, gru_saved_shapes, lstm_saved_shapes, stats_dtype
from .dispatch import implementation

__all__ = ["lstm_recurrence_op", "gru_recurrence_op"]

_EMPTY = (0,)
_LSTM_IN = ("Tensor xw, Tensor? lengths, Tensor h0, Tensor c0, Tensor w_hh, Tensor ln_hh_weight, Tensor? bias, "
            "Tensor ln_ih_weight, Tensor? ln_cell_weight, Tensor? ln_cell_bias, Tensor? w_hr, "
            "Tensor? recurrent_mask, Tensor? zoneout_h, Tensor? zoneout_c, float eps")
_GRU_IN = ("Tensor xw, Tensor? lengths, Tensor h0, Tensor w_hh, Tensor ln_hh_weight, Tensor? bias_ih, "
           "Tensor? bias_hh, Tensor ln_ih_weight, Tensor? recurrent_mask, Tensor? zoneout_h, float eps")


def _or_empty(ts, like: Tensor) -> tuple:
    return tuple(like.new_empty(_EMPTY) if t is None else t for t in ts)


def _lengths(lengths: Optional[Tensor], T: int, B: int) -> Optional[Tensor]:
    return None if lengths is None else check_lengths(lengths, T, B)


# ---------------------------------------------------------------- LSTM


@torch.library.custom_op("layernorm::lstm_recurrence", mutates_args=(),
                         schema=f"({_LSTM_IN}, bool save, str backend) -> "
                                "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def lstm_recurrence_op(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias,
                       w_hr, recurrent_mask, zoneout_h, zoneout_c, eps, save, backend):
    a = LSTMArgs(xw, _lengths(lengths, xw.shape[0], xw.shape[1]), h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight,
                 ln_cell_weight, ln_cell_bias, w_hr, recurrent_mask, zoneout_h, zoneout_c, eps)
    res = implementation(backend).lstm_forward(a, save)
    return _or_empty(tuple(res) + (None,) * (7 - len(res)), xw)


@lstm_recurrence_op.register_fake
def _(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr,
      recurrent_mask, zoneout_h, zoneout_c, eps, save, backend):
    T, B, H4 = xw.shape
    H, R = H4 // 4, h0.shape[1]
    shapes = lstm_saved_shapes(T, B, H) if save else (_EMPTY,) * 4
    saved = [xw.new_empty(s) for s in shapes[:3]] + [xw.new_empty(shapes[3], dtype=stats_dtype(xw.dtype))]
    return (xw.new_empty(T, B, R), xw.new_empty(B, R), xw.new_empty(B, H), *saved)


@torch.library.custom_op("layernorm::lstm_recurrence_backward", mutates_args=(),
                         schema=f"({_LSTM_IN}, Tensor out, Tensor hw_hat, Tensor gates, Tensor cs, Tensor stats, "
                                "Tensor dout, Tensor dh_n, Tensor dc_n, str backend) -> "
                                "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def lstm_recurrence_backward_op(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight,
                                ln_cell_bias, w_hr, recurrent_mask, zoneout_h, zoneout_c, eps, out, hw_hat, gates, cs,
                                stats, dout, dh_n, dc_n, backend):
    a = LSTMArgs(xw, _lengths(lengths, xw.shape[0], xw.shape[1]), h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight,
                 ln_cell_weight, ln_cell_bias, w_hr, recurrent_mask, zoneout_h, zoneout_c, eps)
    grads = implementation(backend).lstm_backward(a, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n)
    return _or_empty(grads, xw)


@lstm_recurrence_backward_op.register_fake
def _(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr, recurrent_mask,
      zoneout_h, zoneout_c, eps, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n, backend):
    like = (xw, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight, ln_cell_bias, w_hr)
    return tuple(xw.new_empty(_EMPTY) if t is None else torch.empty_like(t) for t in like)


def _lstm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:14], *output)
    ctx.eps, ctx.backend, ctx.save = inputs[14], inputs[16], inputs[15]
    ctx.mark_non_differentiable(*output[3:])


def _lstm_backward(ctx, dout, dh_n, dc_n, *_):
    if not ctx.save:
        raise RuntimeError("layernorm::lstm_recurrence ran with save=False: nothing to differentiate with")
    saved = ctx.saved_tensors
    inputs, (out, _, _, hw_hat, gates, cs, stats) = saved[:14], saved[14:]
    grads = lstm_recurrence_backward_op(*inputs, ctx.eps, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n,
                                        ctx.backend)
    present = [inputs[k] is not None for k in (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)]
    g = [gr if ok else None for gr, ok in zip(grads, present)]
    # xw, lengths, h0, c0, w_hh, ln_hh, bias, ln_ih, ln_cell_w, ln_cell_b, w_hr, masks x3, eps, save, backend
    return (g[0], None, g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], None, None, None, None, None, None)


torch.library.register_autograd("layernorm::lstm_recurrence", _lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------- GRU


@torch.library.custom_op("layernorm::gru_recurrence", mutates_args=(),
                         schema=f"({_GRU_IN}, bool save, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def gru_recurrence_op(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h,
                      eps, save, backend):
    a = GRUArgs(xw, _lengths(lengths, xw.shape[0], xw.shape[1]), h0, w_hh, ln_hh_weight, bias_ih, bias_hh,
                ln_ih_weight, recurrent_mask, zoneout_h, eps)
    res = implementation(backend).gru_forward(a, save)
    return _or_empty(tuple(res) + (None,) * (5 - len(res)), xw)


@gru_recurrence_op.register_fake
def _(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h, eps, save,
      backend):
    T, B, H3 = xw.shape
    H = H3 // 3
    shapes = gru_saved_shapes(T, B, H) if save else (_EMPTY,) * 3
    saved = [xw.new_empty(s) for s in shapes[:2]] + [xw.new_empty(shapes[2], dtype=stats_dtype(xw.dtype))]
    return (xw.new_empty(T, B, H), xw.new_empty(B, H), *saved)


@torch.library.custom_op("layernorm::gru_recurrence_backward", mutates_args=(),
                         schema=f"({_GRU_IN}, Tensor out, Tensor hw_hat, Tensor gates, Tensor stats, Tensor dout, "
                                "Tensor dh_n, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def gru_recurrence_backward_op(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask,
                               zoneout_h, eps, out, hw_hat, gates, stats, dout, dh_n, backend):
    a = GRUArgs(xw, _lengths(lengths, xw.shape[0], xw.shape[1]), h0, w_hh, ln_hh_weight, bias_ih, bias_hh,
                ln_ih_weight, recurrent_mask, zoneout_h, eps)
    return _or_empty(implementation(backend).gru_backward(a, out, hw_hat, gates, stats, dout, dh_n), xw)


@gru_recurrence_backward_op.register_fake
def _(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask, zoneout_h, eps, out,
      hw_hat, gates, stats, dout, dh_n, backend):
    like = (xw, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight)
    return tuple(xw.new_empty(_EMPTY) if t is None else torch.empty_like(t) for t in like)


def _gru_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], *output)
    ctx.eps, ctx.backend, ctx.save = inputs[10], inputs[12], inputs[11]
    ctx.mark_non_differentiable(*output[2:])


def _gru_backward(ctx, dout, dh_n, *_):
    if not ctx.save:
        raise RuntimeError("layernorm::gru_recurrence ran with save=False: nothing to differentiate with")
    saved = ctx.saved_tensors
    inputs, (out, _, hw_hat, gates, stats) = saved[:10], saved[10:]
    grads = gru_recurrence_backward_op(*inputs, ctx.eps, out, hw_hat, gates, stats, dout, dh_n, ctx.backend)
    present = [inputs[k] is not None for k in (0, 2, 3, 4, 5, 6, 7)]
    g: List[Optional[Tensor]] = [gr if ok else None for gr, ok in zip(grads, present)]
    # xw, lengths, h0, w_hh, ln_hh, bias_ih, bias_hh, ln_ih, recurrent_mask, zoneout_h, eps, save, backend
    return (g[0], None, g[1], g[2], g[3], g[4], g[5], g[6], None, None, None, None, None)


torch.library.register_autograd("layernorm::gru_recurrence", _gru_backward, setup_context=_gru_setup)
