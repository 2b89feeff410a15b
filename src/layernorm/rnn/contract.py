"""The recurrence contract, written once: what every implementation takes, saves and returns.

An *implementation* (``reference``, ``torch``, ``cpp``, ``triton``) computes the sequential part of one
layer and direction. The module has already computed the raw input projection of all steps,
``xw = x W_ihᵀ``; the implementation normalizes it (gain ``ln_ih_weight``), runs the time loop, and
for training saves the tensors below. Tests (``tests/test_rnn_contract.py``) run every implementation
against :mod:`layernorm.rnn.reference` and feed each one's saved tensors to every other one's backward.

Arguments (LSTM; R = ``proj_size`` when given, else H)
    xw (T, B, 4H): raw input projection, gates i, f, g, o. T >= 1; B >= 0.
    lengths: int64 CPU (B,), each in [0, T], any order; None when every sequence has T steps. At a step
        ``t >= lengths[b]`` row b keeps its state and outputs 0 (a length 0 returns h0, c0).
    h0 (B, R), c0 (B, H). w_hh (4H, R). ln_hh_weight, ln_ih_weight (4H). bias (4H) = b_ih + b_hh, or None.
    ln_cell_weight, ln_cell_bias (H): both or neither (neither: no cell LN, tanh(c̃)).
    w_hr (R, H): the LSTMP projection, or None.
    recurrent_mask (B, R): multiplies h_{t-1} before W_hh (variational recurrent dropout, already
        scaled by 1/(1-p)), or None.
    zoneout_h (T, B, R), zoneout_c (T, B, H): ζ in h_t = h̃ + ζ (h_{t-1} - h̃) (0/1 masks in training,
        the probability in evaluation), or None.
    eps: inside every LN's square root.

GRU: xw (T, B, 3H), gates r, u, n; h0 (B, H); w_hh (3H, H); ln_hh_weight, ln_ih_weight (3H), split
[2H | H] like the LNs; bias_ih, bias_hh (3H) or None each; recurrent_mask (B, H); zoneout_h (T, B, H).

Returned: out (T, B, R) (zero past each length), h_n (B, R), c_n (B, H) (GRU: out, h_n).

Saved for backward (dtype of xw except ``stats``, which is float32, float64 for float64 input)
    LSTM: hw_hat (T, B, 4H) the normalized recurrent pre-activation ``LN(h_{t-1} W_hhᵀ)`` before its
    gain; gates (T, B, 4H) after their non-linearities; cs (T, B, H) the carried cell state c_t;
    stats (T, B, 5) = :data:`LSTM_STATS`. GRU: hw_hat (T, B, 3H) (each block normalized on its own),
    gates (T, B, 3H) = r, u, n; stats (T, B, 6) = :data:`GRU_STATS`. On a step past a row's length,
    hw_hat, gates and stats are 0 and cs holds the frozen c. Everything else (h_{t-1} = out[t-1],
    tanh(LN(c̃)), the LSTMP's m, c̃ under zoneout) is recomputed.

Backward: the gradients :data:`LSTM_GRADS` / :data:`GRU_GRADS`, None where not asked for.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "LSTMArgs",
    "GRUArgs",
    "LSTM_SAVED",
    "GRU_SAVED",
    "LSTM_STATS",
    "GRU_STATS",
    "LSTM_GRADS",
    "GRU_GRADS",
    "stats_dtype",
    "lstm_saved_shapes",
    "gru_saved_shapes",
    "check_lstm",
    "check_gru",
    "check_lengths",
]

LSTM_SAVED = ("hw_hat", "gates", "cs", "stats")
GRU_SAVED = ("hw_hat", "gates", "stats")
LSTM_STATS = ("rstd_hh", "mean_c", "rstd_c", "mean_ih", "rstd_ih")
GRU_STATS = ("rstd_hh_ru", "rstd_hh_n", "mean_ih_ru", "rstd_ih_ru", "mean_ih_n", "rstd_ih_n")
LSTM_GRADS = ("xw", "h0", "c0", "w_hh", "ln_hh_weight", "bias", "ln_ih_weight", "ln_cell_weight", "ln_cell_bias",
              "w_hr")
GRU_GRADS = ("xw", "h0", "w_hh", "ln_hh_weight", "bias_ih", "bias_hh", "ln_ih_weight")


class LSTMArgs(NamedTuple):
    xw: Tensor
    lengths: Optional[Tensor]
    h0: Tensor
    c0: Tensor
    w_hh: Tensor
    ln_hh_weight: Tensor
    bias: Optional[Tensor]
    ln_ih_weight: Tensor
    ln_cell_weight: Optional[Tensor]
    ln_cell_bias: Optional[Tensor]
    w_hr: Optional[Tensor]
    recurrent_mask: Optional[Tensor]
    zoneout_h: Optional[Tensor]
    zoneout_c: Optional[Tensor]
    eps: float


class GRUArgs(NamedTuple):
    xw: Tensor
    lengths: Optional[Tensor]
    h0: Tensor
    w_hh: Tensor
    ln_hh_weight: Tensor
    bias_ih: Optional[Tensor]
    bias_hh: Optional[Tensor]
    ln_ih_weight: Tensor
    recurrent_mask: Optional[Tensor]
    zoneout_h: Optional[Tensor]
    eps: float


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lstm_saved_shapes(T: int, B: int, H: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of :data:`LSTM_SAVED` (the same for every implementation)."""
    return (T, B, 4 * H), (T, B, 4 * H), (T, B, H), (T, B, len(LSTM_STATS))


def gru_saved_shapes(T: int, B: int, H: int) -> Tuple[Tuple[int, ...], ...]:
    """Shapes of :data:`GRU_SAVED`."""
    return (T, B, 3 * H), (T, B, 3 * H), (T, B, len(GRU_STATS))


def _tensor(name: str, t: Optional[Tensor], shape: Sequence[int], ref: Tensor, required: bool = True):
    if t is None:
        if required:
            raise TypeError(f"{name} must be a Tensor, got None")
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"Expected {name} of size {list(shape)}, but got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"Expected {name} to have dtype {ref.dtype} like xw, but got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"Expected {name} on {ref.device} like xw, but got {t.device}")
    return t.contiguous()


def _eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) >= 0 or float(eps) == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, but got eps={eps!r}")
    return float(eps)


def check_lengths(lengths, T: int, B: int) -> Optional[Tensor]:
    """int64 CPU (B,) in [0, T], or None; None also when every length is T (nothing to mask)."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, but got {lengths.dtype}")
    if tuple(lengths.shape) != (B,):
        raise RuntimeError(f"Expected lengths of size [{B}], but got {list(lengths.shape)}")
    lengths = lengths.detach().to("cpu", torch.int64)
    if B == 0:
        return None
    if torch.compiler.is_compiling():  # value checks are data-dependent: the custom op makes them when it runs
        return lengths
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > T:
        raise ValueError(f"lengths must lie in [0, {T}], but got min {lo}, max {hi}")
    return None if lo == T else lengths


def _xw(xw, gates: int) -> Tuple[int, int, int]:
    if not isinstance(xw, Tensor):
        raise TypeError(f"xw must be a Tensor, got {type(xw).__name__}")
    if xw.dim() != 3 or xw.shape[2] % gates or xw.shape[2] == 0 or xw.shape[0] == 0:
        raise RuntimeError(f"Expected xw of size [T, B, {gates}*H] with T >= 1 and H >= 1, but got {list(xw.shape)}")
    if not xw.dtype.is_floating_point:
        raise TypeError(f"xw must be a floating-point tensor, but got {xw.dtype}")
    return xw.shape[0], xw.shape[1], xw.shape[2] // gates


def check_lstm(xw, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_ih_weight, ln_cell_weight=None, ln_cell_bias=None,
               w_hr=None, recurrent_mask=None, zoneout_h=None, zoneout_c=None, eps=1e-5) -> LSTMArgs:
    """Validate (errors name the argument) and return :class:`LSTMArgs` with contiguous tensors."""
    T, B, H = _xw(xw, 4)
    xw = xw.contiguous()
    if (ln_cell_weight is None) != (ln_cell_bias is None):
        raise ValueError("ln_cell_weight and ln_cell_bias must be given together (cell LN) or both be None")
    R = H
    if w_hr is not None:
        if not isinstance(w_hr, Tensor) or w_hr.dim() != 2 or w_hr.shape[1] != H or w_hr.shape[0] < 1:
            raise RuntimeError(f"Expected w_hr of size [proj_size, {H}] with proj_size >= 1, but got "
                               f"{list(w_hr.shape) if isinstance(w_hr, Tensor) else type(w_hr).__name__}")
        R = w_hr.shape[0]
    return LSTMArgs(
        xw, check_lengths(lengths, T, B),
        _tensor("h0", h0, (B, R), xw), _tensor("c0", c0, (B, H), xw), _tensor("w_hh", w_hh, (4 * H, R), xw),
        _tensor("ln_hh_weight", ln_hh_weight, (4 * H,), xw), _tensor("bias", bias, (4 * H,), xw, False),
        _tensor("ln_ih_weight", ln_ih_weight, (4 * H,), xw),
        _tensor("ln_cell_weight", ln_cell_weight, (H,), xw, False), _tensor("ln_cell_bias", ln_cell_bias, (H,), xw, False),
        _tensor("w_hr", w_hr, (R, H), xw, False), _tensor("recurrent_mask", recurrent_mask, (B, R), xw, False),
        _tensor("zoneout_h", zoneout_h, (T, B, R), xw, False), _tensor("zoneout_c", zoneout_c, (T, B, H), xw, False),
        _eps(eps),
    )


def check_gru(xw, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, recurrent_mask=None,
              zoneout_h=None, eps=1e-5) -> GRUArgs:
    """Validate and return :class:`GRUArgs` with contiguous tensors."""
    T, B, H = _xw(xw, 3)
    xw = xw.contiguous()
    return GRUArgs(
        xw, check_lengths(lengths, T, B),
        _tensor("h0", h0, (B, H), xw), _tensor("w_hh", w_hh, (3 * H, H), xw),
        _tensor("ln_hh_weight", ln_hh_weight, (3 * H,), xw),
        _tensor("bias_ih", bias_ih, (3 * H,), xw, False), _tensor("bias_hh", bias_hh, (3 * H,), xw, False),
        _tensor("ln_ih_weight", ln_ih_weight, (3 * H,), xw),
        _tensor("recurrent_mask", recurrent_mask, (B, H), xw, False), _tensor("zoneout_h", zoneout_h, (T, B, H), xw, False),
        _eps(eps),
    )
