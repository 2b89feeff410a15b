"""The ``"torch"`` implementation: the hand-written forward and backward through time, in torch ops.

Runs on any device and dtype, one Python iteration (about 20 small ops) per step. It is the fallback
where the C++ extension cannot be built, the CUDA path where Triton does not import, and the
readable twin of ``native/csrc/rnn.cpp`` (the same algorithm and saved tensors; see
:mod:`layernorm.rnn.contract`). Shapes: T steps, B rows, H hidden, R = proj_size or H.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .contract import GRUArgs, LSTMArgs, stats_dtype

__all__ = ["TorchOps"]


def _running(lengths: Optional[Tensor], T: int, device) -> Optional[Tensor]:
    """(T, B, 1) float 1.0 where step t is inside sequence b, else 0; None without lengths."""
    if lengths is None:
        return None
    return (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).unsqueeze(-1).to(device)


def _stats(v: Tensor, eps: float, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Mean and 1/sqrt(biased var + eps) over the last axis, keepdim, in the accumulation dtype."""
    var, mean = torch.var_mean(v.to(acc), -1, keepdim=True, correction=0)
    return mean, (var + eps).rsqrt()


def _ln_backward(dy: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """dx of x_hat = (x - mean) * rstd given dy = d x_hat, over the last axis."""
    return rstd * (dy - dy.mean(-1, keepdim=True) - x_hat * (dy * x_hat).mean(-1, keepdim=True))


def _input_ln(xw: Tensor, blocks: List[int], eps: float, acc) -> Tuple[Tensor, List[Tensor]]:
    """x̂ of every block of xw (T, B, G*H), and per block (mean, rstd) each (T, B, 1)."""
    parts, stats, start = [], [], 0
    for size in blocks:
        mean, rstd = _stats(xw[..., start:start + size], eps, acc)
        parts.append(((xw[..., start:start + size] - mean) * rstd).to(xw.dtype))
        stats += [mean, rstd]
        start += size
    return (parts[0] if len(parts) == 1 else torch.cat(parts, -1)), stats


def _input_ln_backward(dA: Tensor, xw: Tensor, g_ih: Tensor, stats: Tensor, blocks: List[int],
                       cols: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
    """(dxw, d g_ih) of x̂ g_ih given dA = d(x̂ g_ih); ``cols[k]`` = the (mean, rstd) columns of block k."""
    dxw, dg, start = [], [], 0
    for size, (cm, cr) in zip(blocks, cols):
        mean, rstd = stats[..., cm:cm + 1], stats[..., cr:cr + 1]
        sl = slice(start, start + size)
        x_hat = (xw[..., sl] - mean) * rstd
        dg.append((dA[..., sl] * x_hat).sum((0, 1)))
        dxw.append(_ln_backward(dA[..., sl] * g_ih[sl], x_hat, rstd))
        start += size
    cat = (lambda v: v[0]) if len(blocks) == 1 else (lambda v: torch.cat(v, -1))
    return cat(dxw).to(xw.dtype), cat(dg).to(g_ih.dtype)


def _zeros_like_args(a, names) -> tuple:
    """The gradients of an empty batch: zeros for every present input (no step ran)."""
    return tuple(None if getattr(a, n) is None else torch.zeros_like(getattr(a, n)) for n in names)


class TorchOps:
    """The contract's four methods in torch ops (see :mod:`layernorm.rnn.contract`)."""

    name = "torch"

    @staticmethod
    def lstm_forward(a: LSTMArgs, save: bool):
        xw, T, B = a.xw, a.xw.shape[0], a.xw.shape[1]
        H = xw.shape[2] // 4
        if B == 0:  # nothing to run (and var_mean of empty rows warns)
            saved = (xw.new_empty(T, 0, 4 * H), xw.new_empty(T, 0, 4 * H), xw.new_empty(T, 0, H),
                     xw.new_empty(T, 0, 5, dtype=stats_dtype(xw.dtype)))
            res = (xw.new_empty(T, 0, a.h0.shape[1]), a.h0.clone(), a.c0.clone())
            return res + saved if save else res
        acc = stats_dtype(xw.dtype)
        live = _running(a.lengths, T, xw.device)
        x_hat, (mean_ih, rstd_ih) = _input_ln(xw, [4 * H], a.eps, acc)
        xb = x_hat * a.ln_ih_weight if a.bias is None else torch.addcmul(a.bias, x_hat, a.ln_ih_weight)
        cell_norm = a.ln_cell_weight is not None
        out = xw.new_empty(T, B, a.h0.shape[1])
        h, c = a.h0, a.c0
        if save:
            hw_hat, gates, cs = xw.new_empty(T, B, 4 * H), xw.new_empty(T, B, 4 * H), xw.new_empty(T, B, H)
            stats = xw.new_zeros(T, B, 5, dtype=acc)
            stats[..., 3:4], stats[..., 4:5] = mean_ih, rstd_ih
        w_t = a.w_hh.t()
        for t in range(T):
            h_in = h if a.recurrent_mask is None else h * a.recurrent_mask
            hw = h_in @ w_t                                            # (B, 4H)
            m1, r1 = _stats(hw, a.eps, acc)
            xh = ((hw - m1) * r1).to(xw.dtype)                         # (B, 4H)
            pre = torch.addcmul(xb[t], xh, a.ln_hh_weight)
            ga = torch.sigmoid(pre)
            ga[:, 2 * H:3 * H] = torch.tanh(pre[:, 2 * H:3 * H])
            i, f, g, o = ga.chunk(4, dim=-1)
            c_tilde = torch.addcmul(f * c, i, g)                       # (B, H)
            if cell_norm:
                m2, r2 = _stats(c_tilde, a.eps, acc)
                tc = torch.tanh(torch.addcmul(a.ln_cell_bias, ((c_tilde - m2) * r2).to(xw.dtype), a.ln_cell_weight))
            else:
                tc = torch.tanh(c_tilde)
            m = o * tc                                                 # (B, H)
            h_tilde = m if a.w_hr is None else m @ a.w_hr.t()          # (B, R)
            c_new = c_tilde if a.zoneout_c is None else c_tilde + a.zoneout_c[t] * (c - c_tilde)
            h_new = h_tilde if a.zoneout_h is None else h_tilde + a.zoneout_h[t] * (h - h_tilde)
            if live is None:
                h, c = h_new, c_new
                out[t] = h_new
            else:
                run = live[t].bool()
                h, c = torch.where(run, h_new, h), torch.where(run, c_new, c)
                out[t] = h_new * live[t]
            if save:
                keep = 1 if live is None else live[t]
                hw_hat[t], gates[t], cs[t] = xh * keep, ga * keep, c
                stats[t, :, 0:1] = r1 * keep
                if cell_norm:
                    stats[t, :, 1:2], stats[t, :, 2:3] = m2 * keep, r2 * keep
        if live is not None and save:
            stats[..., 3:5] *= live
        return (out, h, c, hw_hat, gates, cs, stats) if save else (out, h, c)

    @staticmethod
    def lstm_backward(a: LSTMArgs, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n):
        T, B, H4 = gates.shape
        if B == 0:
            return _zeros_like_args(a, ("xw",)) + (dh_n.clone(), dc_n.clone()) + _zeros_like_args(
                a, ("w_hh", "ln_hh_weight", "bias", "ln_ih_weight", "ln_cell_weight", "ln_cell_bias", "w_hr"))
        H = H4 // 4
        dt = gates.dtype
        live = _running(a.lengths, T, gates.device)
        cell_norm = a.ln_cell_weight is not None
        dA_all = torch.empty_like(gates)                               # (T, B, 4H) d(x̂_ih g_ih + ...)
        dhw = torch.empty_like(gates)                                  # (T, B, 4H) d(h_in W_hhᵀ)
        dh, dc = dh_n.clone(), dc_n.clone()
        dg = torch.zeros(H4, dtype=dt, device=gates.device)
        dwc = torch.zeros(H, dtype=dt, device=gates.device) if cell_norm else None
        dbc = torch.zeros_like(dwc) if cell_norm else None
        if a.w_hr is not None:
            dh_tilde_all, m_all = out.new_zeros(out.shape), out.new_zeros(T, B, H)
        for t in range(T - 1, -1, -1):
            i, f, g, o = gates[t].chunk(4, dim=-1)
            cp = cs[t - 1] if t > 0 else a.c0
            hp = out[t - 1] if t > 0 else a.h0
            run = None if live is None else live[t]
            dh_t = dout[t] + dh                                        # dL/dh_t
            dh_tilde = dh_t if a.zoneout_h is None else dh_t * (1 - a.zoneout_h[t])
            if run is not None:
                dh_tilde = dh_tilde * run
            c_tilde = cs[t] if a.zoneout_c is None else torch.addcmul(f * cp, i, g)
            if cell_norm:
                chat = ((c_tilde - stats[t, :, 1:2]) * stats[t, :, 2:3]).to(dt)
                tc = torch.tanh(torch.addcmul(a.ln_cell_bias, chat, a.ln_cell_weight))
            else:
                tc = torch.tanh(c_tilde)
            if a.w_hr is not None:
                m_all[t] = o * tc
                dh_tilde_all[t] = dh_tilde
                dm = dh_tilde @ a.w_hr                                 # (B, H)
            else:
                dm = dh_tilde
            dpre_tc = dm * o * (1 - tc * tc)
            if cell_norm:
                dwc += (dpre_tc * chat).sum(0)
                dbc += dpre_tc.sum(0)
                dc_tilde = _ln_backward(dpre_tc * a.ln_cell_weight, chat, stats[t, :, 2:3].to(dt))
            else:
                dc_tilde = dpre_tc
            dc_in = dc if a.zoneout_c is None else dc * (1 - a.zoneout_c[t])
            if run is not None:
                dc_in = dc_in * run
            dc_tilde = dc_tilde + dc_in
            dA = torch.cat([dc_tilde * g * i * (1 - i), dc_tilde * cp * f * (1 - f), dc_tilde * i * (1 - g * g),
                            dm * tc * o * (1 - o)], -1)
            dA_all[t] = dA
            dg += (dA * hw_hat[t]).sum(0)
            dhw[t] = _ln_backward(dA * a.ln_hh_weight, hw_hat[t], stats[t, :, 0:1].to(dt))
            dh_prev = dhw[t] @ a.w_hh                                  # (B, R)
            if a.recurrent_mask is not None:
                dh_prev = dh_prev * a.recurrent_mask
            dc_prev = dc_tilde * f
            if a.zoneout_h is not None:
                dh_prev = dh_prev + a.zoneout_h[t] * dh_t
            if a.zoneout_c is not None:
                dc_prev = dc_prev + a.zoneout_c[t] * dc
            if run is None:
                dh, dc = dh_prev, dc_prev
            else:
                keep = run.bool()
                dh, dc = torch.where(keep, dh_prev, dh), torch.where(keep, dc_prev, dc)
        hprev = torch.cat([a.h0.unsqueeze(0), out[:-1]], 0)           # (T, B, R)
        if a.recurrent_mask is not None:
            hprev = hprev * a.recurrent_mask
        dw_hh = dhw.reshape(T * B, H4).t() @ hprev.reshape(T * B, -1)
        dbias = dA_all.sum((0, 1)) if a.bias is not None else None
        dxw, dg_ih = _input_ln_backward(dA_all, a.xw, a.ln_ih_weight, stats, [H4], [(3, 4)])
        dw_hr = None
        if a.w_hr is not None:
            dw_hr = dh_tilde_all.reshape(T * B, -1).t() @ m_all.reshape(T * B, H)
        return dxw, dh, dc, dw_hh, dg, dbias, dg_ih, dwc, dbc, dw_hr

    @staticmethod
    def gru_forward(a: GRUArgs, save: bool):
        xw, T, B = a.xw, a.xw.shape[0], a.xw.shape[1]
        H = xw.shape[2] // 3
        if B == 0:
            saved = (xw.new_empty(T, 0, 3 * H), xw.new_empty(T, 0, 3 * H), xw.new_empty(T, 0, 6, dtype=stats_dtype(xw.dtype)))
            res = (xw.new_empty(T, 0, H), a.h0.clone())
            return res + saved if save else res
        acc = stats_dtype(xw.dtype)
        live = _running(a.lengths, T, xw.device)
        x_hat, (m_ru, r_ru, m_n, r_n) = _input_ln(xw, [2 * H, H], a.eps, acc)
        bx = xw.new_zeros(3 * H)
        bn = xw.new_zeros(H)
        if a.bias_ih is not None:
            bx = bx + a.bias_ih
        if a.bias_hh is not None:
            bx[: 2 * H] += a.bias_hh[: 2 * H]
            bn = bn + a.bias_hh[2 * H:]
        xb = torch.addcmul(bx, x_hat, a.ln_ih_weight)                  # (T, B, 3H)
        g_ru, g_n = a.ln_hh_weight[: 2 * H], a.ln_hh_weight[2 * H:]
        out = xw.new_empty(T, B, H)
        h = a.h0
        if save:
            hw_hat, gates = xw.new_empty(T, B, 3 * H), xw.new_empty(T, B, 3 * H)
            stats = xw.new_zeros(T, B, 6, dtype=acc)
            stats[..., 2:3], stats[..., 3:4], stats[..., 4:5], stats[..., 5:6] = m_ru, r_ru, m_n, r_n
        w_t = a.w_hh.t()
        for t in range(T):
            h_in = h if a.recurrent_mask is None else h * a.recurrent_mask
            hw = h_in @ w_t                                            # (B, 3H)
            ma, ra = _stats(hw[:, : 2 * H], a.eps, acc)
            mb, rb = _stats(hw[:, 2 * H:], a.eps, acc)
            xh = torch.cat([(hw[:, : 2 * H] - ma) * ra, (hw[:, 2 * H:] - mb) * rb], -1).to(xw.dtype)
            ru = torch.sigmoid(torch.addcmul(xb[t, :, : 2 * H], xh[:, : 2 * H], g_ru))
            r, u = ru.chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(xb[t, :, 2 * H:], r, torch.addcmul(bn, xh[:, 2 * H:], g_n)))
            h_tilde = torch.lerp(n, h, u)                              # u h + (1 - u) n
            h_new = h_tilde if a.zoneout_h is None else h_tilde + a.zoneout_h[t] * (h - h_tilde)
            if live is None:
                h = h_new
                out[t] = h_new
            else:
                h = torch.where(live[t].bool(), h_new, h)
                out[t] = h_new * live[t]
            if save:
                keep = 1 if live is None else live[t]
                hw_hat[t] = xh * keep
                gates[t, :, : 2 * H], gates[t, :, 2 * H:] = ru * keep, n * keep
                stats[t, :, 0:1], stats[t, :, 1:2] = ra * keep, rb * keep
        if live is not None and save:
            stats[..., 2:6] *= live
        return (out, h, hw_hat, gates, stats) if save else (out, h)

    @staticmethod
    def gru_backward(a: GRUArgs, out, hw_hat, gates, stats, dout, dh_n):
        T, B, H3 = gates.shape
        if B == 0:
            return _zeros_like_args(a, ("xw",)) + (dh_n.clone(),) + _zeros_like_args(
                a, ("w_hh", "ln_hh_weight", "bias_ih", "bias_hh", "ln_ih_weight"))
        H = H3 // 3
        dt = gates.dtype
        live = _running(a.lengths, T, gates.device)
        dA_all = torch.empty_like(gates)
        dhw = torch.empty_like(gates)
        dh = dh_n.clone()
        dg = torch.zeros(H3, dtype=dt, device=gates.device)
        dbn = torch.zeros(H, dtype=dt, device=gates.device)
        bn = a.bias_hh[2 * H:] if a.bias_hh is not None else gates.new_zeros(H)
        g_ru, g_n = a.ln_hh_weight[: 2 * H], a.ln_hh_weight[2 * H:]
        for t in range(T - 1, -1, -1):
            r, u, n = gates[t].chunk(3, dim=-1)
            xh = hw_hat[t]
            hp = out[t - 1] if t > 0 else a.h0
            run = None if live is None else live[t]
            dh_t = dout[t] + dh
            dh_tilde = dh_t if a.zoneout_h is None else dh_t * (1 - a.zoneout_h[t])
            if run is not None:
                dh_tilde = dh_tilde * run
            dnp = dh_tilde * (1 - u) * (1 - n * n)                     # d of n's pre-activation
            hn = torch.addcmul(bn, xh[:, 2 * H:], g_n)
            dhn = dnp * r                                              # d of LN(h W^n) g^n + b_hh^n
            dA = torch.cat([dnp * hn * r * (1 - r), dh_tilde * (hp - n) * u * (1 - u), dnp], -1)
            dA_all[t] = dA
            dbn += dhn.sum(0)
            d_hat = torch.cat([dA[:, : 2 * H], dhn], -1)               # d of the normalized recurrent part
            dg += (d_hat * xh).sum(0)
            dy = d_hat * a.ln_hh_weight
            dhw[t, :, : 2 * H] = _ln_backward(dy[:, : 2 * H], xh[:, : 2 * H], stats[t, :, 0:1].to(dt))
            dhw[t, :, 2 * H:] = _ln_backward(dy[:, 2 * H:], xh[:, 2 * H:], stats[t, :, 1:2].to(dt))
            dh_prev = dhw[t] @ a.w_hh
            if a.recurrent_mask is not None:
                dh_prev = dh_prev * a.recurrent_mask
            dh_prev = dh_prev + dh_tilde * u
            if a.zoneout_h is not None:
                dh_prev = dh_prev + a.zoneout_h[t] * dh_t
            dh = dh_prev if run is None else torch.where(run.bool(), dh_prev, dh)
        hprev = torch.cat([a.h0.unsqueeze(0), out[:-1]], 0)
        if a.recurrent_mask is not None:
            hprev = hprev * a.recurrent_mask
        dw_hh = dhw.reshape(T * B, H3).t() @ hprev.reshape(T * B, H)
        dbih = dA_all.sum((0, 1))
        dbhh = dbih.clone()
        dbhh[2 * H:] = dbn
        dxw, dg_ih = _input_ln_backward(dA_all, a.xw, a.ln_ih_weight, stats, [2 * H, H], [(2, 3), (4, 5)])
        return (dxw, dh, dw_hh, dg, dbih if a.bias_ih is not None else None,
                dbhh if a.bias_hh is not None else None, dg_ih)
