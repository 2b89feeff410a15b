r"""The reference recurrences: the specification every implementation is tested against.

Plain PyTorch, one Python loop over time, autograd for the backward. The equations are written here
once (typeset in ``docs/rnn.md``); :mod:`layernorm.rnn.contract` says what the arguments are.

LN-LSTM step (Ba, Kiros & Hinton, 2016), ``x̂_t = LN(W_ih x_t; g_ih)`` given for all steps::

    a   = x̂_t + LN((h_{t-1} ⊙ ρ) W_hhᵀ; g_hh) + b        ρ: recurrent dropout mask (1 without)
    i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)        nn.LSTM's gate order
    c̃  = f ⊙ c_{t-1} + i ⊙ g                               carried unnormalized
    m   = o ⊙ tanh(LN(c̃; g_c, b_c))                       tanh(c̃) with cell_norm=False
    h̃  = m W_hrᵀ                                          with proj_size (LSTMP), else h̃ = m
    c_t = c̃ + ζ^c_t ⊙ (c_{t-1} - c̃),  h_t = h̃ + ζ^h_t ⊙ (h_{t-1} - h̃)    zoneout (ζ = 0 without)

LN-GRU step (the paper's, with ``nn.GRU``'s storage; LN over the [r, u] block and the n block apart)::

    [r, u] = σ(x̂^{ru}_t + b^{ru}_ih + LN((h_{t-1} ⊙ ρ) W^{ru}_hhᵀ; g^{ru}_hh) + b^{ru}_hh)
    n      = tanh(x̂^n_t + b^n_ih + r ⊙ (LN((h_{t-1} ⊙ ρ) W^n_hhᵀ; g^n_hh) + b^n_hh))
    h̃      = u ⊙ h_{t-1} + (1 - u) ⊙ n
    h_t    = h̃ + ζ^h_t ⊙ (h_{t-1} - h̃)

Sequences end at their own length: at a step ``t >= lengths[b]`` row b keeps its state and outputs 0.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "input_layer_norm",
    "lstm_cell",
    "gru_cell",
    "lstm_recurrence",
    "gru_recurrence",
    "reverse_padded",
    "step_mask",
]


def input_layer_norm(xw: Tensor, gain: Tensor, blocks: Sequence[int], eps: float) -> Tensor:
    """``LN(xw; gain)`` (no shift) over each block of the last axis: LSTM one block of 4H, GRU 2H and H."""
    if len(blocks) == 1:
        return F.layer_norm(xw, (blocks[0],), gain, None, eps)
    parts, start = [], 0
    for size in blocks:
        parts.append(F.layer_norm(xw[..., start:start + size], (size,), gain[start:start + size], None, eps))
        start += size
    return torch.cat(parts, dim=-1)


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of a time-major padded batch within its own length.

    ``x``: (T, B, *). Entry (t, b) goes to (lengths[b] - 1 - t, b) for t < lengths[b]; padding stays
    where it is. The map is its own inverse. ``lengths=None`` reverses the whole time axis.

    Example::

        >>> reverse_padded(torch.arange(3.).view(3, 1, 1), torch.tensor([2]))[:, 0, 0]
        tensor([1., 0., 2.])
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.shape[0], x.shape[1]
    t = torch.arange(T).unsqueeze(1)                           # (T, 1)
    lens = lengths.to(torch.int64).unsqueeze(0)                # (1, B)
    idx = torch.where(t < lens, lens - 1 - t, t)               # (T, B) source step of each entry
    idx = idx.to(x.device).view(T, B, *([1] * (x.dim() - 2))).expand_as(x)  # (T, B, *)
    return x.gather(0, idx)


def step_mask(lengths: Optional[Tensor], T: int, device) -> Optional[Tensor]:
    """(T, B, 1) bool, True where step t is inside sequence b; None when ``lengths`` is None."""
    if lengths is None:
        return None
    t = torch.arange(T).unsqueeze(1)                           # (T, 1)
    return (t < lengths.to(torch.int64).unsqueeze(0)).unsqueeze(-1).to(device)  # (T, B, 1)


def lstm_cell(
    x_ln: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias: Optional[Tensor],
    ln_cell_weight: Optional[Tensor],
    ln_cell_bias: Optional[Tensor],
    w_hr: Optional[Tensor],
    recurrent_mask: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """One LN-LSTM step without zoneout: (h̃, c̃) from the normalized input projection ``x_ln`` (B, 4H).

    ``ln_cell_weight=None`` means no cell LN (tanh(c̃)); shapes as :mod:`layernorm.rnn.contract`."""
    H = c.shape[-1]
    h_in = h if recurrent_mask is None else h * recurrent_mask  # (B, R)
    a = x_ln + F.layer_norm(h_in @ w_hh.t(), (4 * H,), ln_hh_weight, None, eps)  # (B, 4H)
    if bias is not None:
        a = a + bias
    a_i, a_f, a_g, a_o = a.chunk(4, dim=-1)                    # 4 x (B, H)
    c_new = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)  # (B, H)
    if ln_cell_weight is not None:
        c_out = F.layer_norm(c_new, (H,), ln_cell_weight, ln_cell_bias, eps)
    else:
        c_out = c_new
    m = torch.sigmoid(a_o) * torch.tanh(c_out)                 # (B, H)
    h_new = m if w_hr is None else m @ w_hr.t()                # (B, R)
    return h_new, c_new


def gru_cell(
    x_ln: Tensor,
    h: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    recurrent_mask: Optional[Tensor],
    eps: float,
) -> Tensor:
    """One LN-GRU step without zoneout: h̃ from the normalized input projection ``x_ln`` (B, 3H)."""
    H = h.shape[-1]
    h_in = h if recurrent_mask is None else h * recurrent_mask  # (B, H)
    hw = h_in @ w_hh.t()                                       # (B, 3H)
    h_ru = F.layer_norm(hw[:, : 2 * H], (2 * H,), ln_hh_weight[: 2 * H], None, eps)  # (B, 2H)
    h_n = F.layer_norm(hw[:, 2 * H:], (H,), ln_hh_weight[2 * H:], None, eps)        # (B, H)
    x_ru, x_n = x_ln[:, : 2 * H], x_ln[:, 2 * H:]
    if bias_ih is not None:
        x_ru, x_n = x_ru + bias_ih[: 2 * H], x_n + bias_ih[2 * H:]
    if bias_hh is not None:
        h_ru, h_n = h_ru + bias_hh[: 2 * H], h_n + bias_hh[2 * H:]
    r, u = torch.sigmoid(x_ru + h_ru).chunk(2, dim=-1)        # 2 x (B, H)
    n = torch.tanh(x_n + r * h_n)                              # (B, H) candidate
    return u * h + (1 - u) * n                                 # (B, H)


def _zone(new: Tensor, old: Tensor, zoneout: Optional[Tensor]) -> Tensor:
    return new if zoneout is None else new + zoneout * (old - new)


def _frozen(new: Tensor, old: Tensor, running: Optional[Tensor]) -> Tensor:
    return new if running is None else torch.where(running, new, old)


def lstm_recurrence(
    xw: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias: Optional[Tensor],
    ln_ih_weight: Tensor,
    ln_cell_weight: Optional[Tensor],
    ln_cell_bias: Optional[Tensor],
    w_hr: Optional[Tensor],
    recurrent_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor],
    zoneout_c: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The LN-LSTM over T steps -> (out (T, B, R), h_n (B, R), c_n (B, H)); see the module docstring."""
    T, H4 = xw.shape[0], xw.shape[2]
    x_ln = input_layer_norm(xw, ln_ih_weight, [H4], eps)       # (T, B, 4H) all steps at once
    mask = step_mask(lengths, T, xw.device)                    # (T, B, 1) or None
    h, c = h0, c0
    outs: List[Tensor] = []
    for t in range(T):
        h_new, c_new = lstm_cell(x_ln[t], h, c, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias, w_hr,
                                 recurrent_mask, eps)
        h_new = _zone(h_new, h, None if zoneout_h is None else zoneout_h[t])
        c_new = _zone(c_new, c, None if zoneout_c is None else zoneout_c[t])
        running = None if mask is None else mask[t]            # (B, 1)
        h, c = _frozen(h_new, h, running), _frozen(c_new, c, running)
        outs.append(h_new if running is None else torch.where(running, h_new, torch.zeros_like(h_new)))
    return torch.stack(outs, 0), h, c


def gru_recurrence(
    xw: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    ln_ih_weight: Tensor,
    recurrent_mask: Optional[Tensor],
    zoneout_h: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """The LN-GRU over T steps -> (out (T, B, H), h_n (B, H)); see the module docstring."""
    T, H = xw.shape[0], h0.shape[-1]
    x_ln = input_layer_norm(xw, ln_ih_weight, [2 * H, H], eps)  # (T, B, 3H)
    mask = step_mask(lengths, T, xw.device)
    h = h0
    outs: List[Tensor] = []
    for t in range(T):
        h_new = gru_cell(x_ln[t], h, w_hh, ln_hh_weight, bias_ih, bias_hh, recurrent_mask, eps)
        h_new = _zone(h_new, h, None if zoneout_h is None else zoneout_h[t])
        running = None if mask is None else mask[t]
        h = _frozen(h_new, h, running)
        outs.append(h_new if running is None else torch.where(running, h_new, torch.zeros_like(h_new)))
    return torch.stack(outs, 0), h
