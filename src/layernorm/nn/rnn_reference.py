"""Reference recurrences of the layer-normalized LSTM and GRU: the spec of the layer kernel interface.

Plain PyTorch, one Python loop over time; autograd does the backward. Every fast path
(``layernorm.nn.rnn_fast``) must return the same outputs, final states and gradients as these two
functions. The equations are in ``docs/rnn.md``.

The module (:mod:`layernorm.nn.rnn`) does the time-parallel part before calling these: per layer
and direction, ``xw = input @ W_ih^T`` for all steps in one GEMM and ONE batched layer norm of it
(gain ``ln_ih_weight``, no shift). What is left here is the sequential part.

Interface (shared with the fast path):

``lstm_recurrence(xw_ln, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias,
eps, cell_norm) -> (out, h_n, c_n)``
    xw_ln: (T, B, 4H) time-major contiguous, the normalized input projection, gates i, f, g, o.
    lengths: int64 CPU tensor (B,), any order, each in [1, T]; or None meaning every sequence has T.
    h0, c0: (B, H). w_hh: (4H, H). ln_hh_weight: (4H,). bias: (4H,) = b_ih + b_hh, or None.
    ln_cell_weight, ln_cell_bias: (H,), or None when ``cell_norm`` is False.
    out: (T, B, H), zero where t >= lengths[b]; h_n, c_n: (B, H), the state after each sequence's
    own last step (the state is frozen past the length).

``gru_recurrence(xw_ln, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, eps) -> (out, h_n)``
    xw_ln: (T, B, 3H), gates r, u(z), n as ``nn.GRU``: rows [0:2H] normalized together (r and u),
    rows [2H:3H] normalized on their own (candidate). w_hh: (3H, H); ln_hh_weight: (3H,) split the
    same way; bias_ih, bias_hh: (3H,) or None (kept apart because ``b_hh[2H:]`` sits inside r * (.)
    as in ``nn.GRU``).

Reverse directions are not handled here: the module reverses each sequence within its length
(:func:`reverse_padded`) before and after the call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "lstm_cell_step",
    "gru_cell_step",
    "lstm_recurrence",
    "gru_recurrence",
    "reverse_padded",
    "step_mask",
]


def reverse_padded(x: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """Reverse each sequence of a time-major padded batch within its own length.

    ``x``: (T, B, *). Entry (t, b) goes to (lengths[b] - 1 - t, b) for t < lengths[b]; padding
    stays where it is. The map is its own inverse. ``lengths=None`` reverses the whole time axis.
    """
    if lengths is None:
        return x.flip(0)
    T, B = x.shape[0], x.shape[1]
    t = torch.arange(T).unsqueeze(1)                           # (T, 1)
    lens = lengths.to(torch.int64).unsqueeze(0)                # (1, B)
    idx = torch.where(t < lens, lens - 1 - t, t)               # (T, B) source step of each entry
    idx = idx.to(x.device).view(T, B, *([1] * (x.dim() - 2))).expand_as(x)  # (T, B, *)
    return x.gather(0, idx)


def step_mask(lengths: Optional[Tensor], T: int, device, dtype=torch.bool) -> Optional[Tensor]:
    """(T, B, 1) bool: True where step t is inside sequence b; None when ``lengths`` is None."""
    if lengths is None:
        return None
    t = torch.arange(T).unsqueeze(1)                           # (T, 1)
    return (t < lengths.to(torch.int64).unsqueeze(0)).unsqueeze(-1).to(device)  # (T, B, 1)


def lstm_cell_step(
    xw_ln_t: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias: Optional[Tensor],
    ln_cell_weight: Optional[Tensor],
    ln_cell_bias: Optional[Tensor],
    eps: float,
    cell_norm: bool,
) -> Tuple[Tensor, Tensor]:
    """One step of the LN-LSTM given the normalized input projection of this step.

    gates = xw_ln_t + LN(h W_hh^T; g_hh, 0) + b;  c' = σ(f) c + σ(i) tanh(g);
    h' = σ(o) tanh(LN(c'; g_c, b_c))  (tanh(c') without cell_norm). c' is returned unnormalized.
    """
    H = h.shape[-1]
    hw = h @ w_hh.t()                                          # (B, 4H) recurrent pre-activations
    gates = xw_ln_t + F.layer_norm(hw, (4 * H,), ln_hh_weight, None, eps)  # (B, 4H)
    if bias is not None:
        gates = gates + bias                                   # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=-1)                        # 4 x (B, H), nn.LSTM's gate order
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (B, H) carried unnormalized
    c_out = F.layer_norm(c_new, (H,), ln_cell_weight, ln_cell_bias, eps) if cell_norm else c_new  # (B, H)
    h_new = torch.sigmoid(o) * torch.tanh(c_out)               # (B, H)
    return h_new, c_new


def gru_cell_step(
    xw_ln_t: Tensor,
    h: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    eps: float,
) -> Tensor:
    """One step of the LN-GRU given the normalized input projection of this step.

    [r, u] = σ(LN(W x) + LN(U h) + b_ih + b_hh)            (LN over the 2H block)
    n = tanh(LN(W' x) + b_ih' + r ⊙ (LN(U' h) + b_hh'))     (LN over the H block)
    h' = u ⊙ h + (1 - u) ⊙ n
    """
    H = h.shape[-1]
    hw = h @ w_hh.t()                                          # (B, 3H)
    h_ru = F.layer_norm(hw[:, : 2 * H], (2 * H,), ln_hh_weight[: 2 * H], None, eps)  # (B, 2H)
    h_n = F.layer_norm(hw[:, 2 * H:], (H,), ln_hh_weight[2 * H:], None, eps)  # (B, H)
    x_ru, x_n = xw_ln_t[:, : 2 * H], xw_ln_t[:, 2 * H:]        # (B, 2H), (B, H)
    if bias_ih is not None:
        x_ru = x_ru + bias_ih[: 2 * H]                         # (B, 2H)
        x_n = x_n + bias_ih[2 * H:]                            # (B, H)
    if bias_hh is not None:
        h_ru = h_ru + bias_hh[: 2 * H]                         # (B, 2H)
        h_n = h_n + bias_hh[2 * H:]                            # (B, H)
    r, u = torch.sigmoid(x_ru + h_ru).chunk(2, dim=-1)         # 2 x (B, H)
    n = torch.tanh(x_n + r * h_n)                              # (B, H) candidate
    return u * h + (1 - u) * n                                 # (B, H)


def lstm_recurrence(
    xw_ln: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias: Optional[Tensor],
    ln_cell_weight: Optional[Tensor],
    ln_cell_bias: Optional[Tensor],
    eps: float,
    cell_norm: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The LN-LSTM recurrence over T steps; see the module docstring for the contract."""
    T = xw_ln.shape[0]
    mask = step_mask(lengths, T, xw_ln.device)                 # (T, B, 1) or None
    h, c = h0, c0                                              # (B, H), (B, H)
    outs = []
    for t in range(T):
        h_new, c_new = lstm_cell_step(
            xw_ln[t], h, c, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias, eps, cell_norm
        )                                                      # (B, H), (B, H)
        if mask is None:
            h, c = h_new, c_new
            outs.append(h_new)
        else:
            m = mask[t]                                        # (B, 1) sequence b still running
            h = torch.where(m, h_new, h)                       # (B, H) frozen past the length
            c = torch.where(m, c_new, c)                       # (B, H)
            outs.append(torch.where(m, h_new, torch.zeros_like(h_new)))  # (B, H) zero padding
    return torch.stack(outs, 0), h, c                          # (T, B, H), (B, H), (B, H)


def gru_recurrence(
    xw_ln: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """The LN-GRU recurrence over T steps; see the module docstring for the contract."""
    T = xw_ln.shape[0]
    mask = step_mask(lengths, T, xw_ln.device)                 # (T, B, 1) or None
    h = h0                                                     # (B, H)
    outs = []
    for t in range(T):
        h_new = gru_cell_step(xw_ln[t], h, w_hh, ln_hh_weight, bias_ih, bias_hh, eps)  # (B, H)
        if mask is None:
            h = h_new
            outs.append(h_new)
        else:
            m = mask[t]                                        # (B, 1)
            h = torch.where(m, h_new, h)                       # (B, H)
            outs.append(torch.where(m, h_new, torch.zeros_like(h_new)))  # (B, H)
    return torch.stack(outs, 0), h                             # (T, B, H), (B, H)
