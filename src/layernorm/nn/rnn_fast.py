"""Fast recurrences of the layer-normalized LSTM and GRU, with a hand-written backward through time.

Same contract as :mod:`layernorm.nn.rnn_reference` (see its docstring): the module computes the
time-parallel ``LN(W_ih x)`` for all steps and calls :func:`lstm_recurrence` / :func:`gru_recurrence`
once per layer and direction. Here autograd sees ONE node per call, not a tape of ~20 ops per step.

Three implementations of the same algorithm (forward saves per step only what the backward needs:
the normalized recurrent pre-activation, the gates after their non-linearity, the cell state and the
layer-norm statistics; ``h_{t-1}`` is read back from the output; ``dW_hh`` is one GEMM after the loop):

``"cpp"``
    The whole time loop in C++ (``_rnn_cpp/rnn.cpp``, built on first use with
    ``torch.utils.cpp_extension`` and cached under ``$TORCH_EXTENSIONS_DIR`` or
    ``~/.cache/torch_extensions``). The recurrent GEMM goes to oneDNN (ATen's exported wrappers,
    W_hh packed once per call; ``$LAYERNORM_RNN_GEMM`` = ``auto``/``onednn``/``mkl``) or else to MKL,
    on torch's own OpenMP pool; the layer norms, gates and cell update are one fused pass per batch
    row. CPU, float32/float64 (float64 GEMMs go to ATen).
``"torch"``
    The same forward/backward written with torch ops per step in Python. Runs on any device
    (CUDA included) and is the fallback when the extension cannot be built (no compiler).
``"triton"``
    CUDA: per step the recurrent GEMM (cuBLAS) plus ONE fused Triton kernel for everything else,
    forward and backward (``_rnn_triton.py``, imported only when chosen). CPU tensors only under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, for the tests). float16/bfloat16/float32/float64.

Choice: argument ``impl=`` or the environment variable ``LAYERNORM_RNN_IMPL`` (``auto``, ``cpp``,
``torch``, ``triton``); ``auto`` takes ``cpp`` for CPU float32/float64 tensors when the extension
builds, ``triton`` for CUDA tensors when Triton imports, otherwise ``torch``. Design notes and
measurements: ``docs/rnn_fast.md``.

Example::

    >>> T, B, H = 5, 3, 8
    >>> xw = torch.randn(T, B, 4 * H)
    >>> h0 = c0 = torch.zeros(B, H)
    >>> w = torch.randn(4 * H, H) / H ** 0.5
    >>> out, h_n, c_n = lstm_recurrence(xw, None, h0, c0, w, torch.ones(4 * H), None,
    ...                                 torch.ones(H), torch.zeros(H), 1e-5, True)
    >>> out.shape, h_n.shape
    (torch.Size([5, 3, 8]), torch.Size([3, 8]))
"""
from __future__ import annotations

import functools
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["lstm_recurrence", "gru_recurrence", "cpp_extension_available", "IMPLS"]

IMPLS = ("auto", "cpp", "torch", "triton")
_ENV = "LAYERNORM_RNN_IMPL"


def _load_ext():
    """The package's C++ extension (:mod:`layernorm.native`, built once per environment), or None."""
    from ..native import load

    return load()


def cpp_extension_available() -> bool:
    """True when the C++ recurrence is built (builds it on first call)."""
    return _load_ext() is not None


@functools.lru_cache(maxsize=None)
def _load_triton():
    """(``_TritonImpl``, None), or (None, the error) when Triton does not import."""
    try:
        from ._rnn_triton import _TritonImpl
    except Exception as exc:  # not installed, or a broken install: the torch path still works
        return None, exc
    return _TritonImpl, None


def _pick_impl(impl: Optional[str], x: Tensor):
    choice = impl if impl is not None else os.environ.get(_ENV, "auto")
    if choice not in IMPLS:
        raise ValueError(f"impl (or ${_ENV}) must be one of {IMPLS}, but got {choice!r}")
    if choice == "torch":
        return _TorchImpl
    if choice == "triton":
        interpreted = x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if x.device.type != "cuda" and not interpreted:
            raise ValueError(f"impl='triton' needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                             f"but got tensors on {x.device}")
        triton_impl, err = _load_triton()
        if triton_impl is None:
            raise RuntimeError(f"impl='triton' requested but triton does not import: {err}")
        return triton_impl
    cpp_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if choice == "cpp":
        if not cpp_ok:
            raise ValueError(f"impl='cpp' needs CPU float32/float64 tensors, but got {x.dtype} on {x.device}")
        ext = _load_ext()
        if ext is None:
            raise RuntimeError("impl='cpp' requested but the C++ extension is not built (`layernorm build` says why)")
        return _cpp_adapter(ext)
    if cpp_ok and os.environ.get(_ENV, "auto") != "torch":
        ext = _load_ext()
        if ext is not None:
            return _cpp_adapter(ext)
    if x.device.type == "cuda" and os.environ.get(_ENV, "auto") != "torch":
        triton_impl, _ = _load_triton()
        if triton_impl is not None:
            return triton_impl
    return _TorchImpl


class _CppImpl:
    """The C++ recurrences (``_rnn_cpp/rnn.cpp``) behind the implementation interface.

    Besides the four methods every implementation has, the C++ code can apply the input layer norm
    itself (``fuses_input_ln``): given the gain ``g_ih``, ``xw`` is the raw projection ``W_ih x``
    and is normalized row by row inside the time loop, which saves two passes over the (T, B, G*H)
    projection each way and its normalized copy. The ``*_ln`` methods take and return the extra
    tensors (forward: the input LN's statistics; backward: ``d g_ih``).
    """

    fuses_input_ln = True

    def __init__(self, ext):
        self.ext = ext

    def lstm_forward(self, xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save):
        return self.ext.lstm_forward(xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save, None)[:9]

    def lstm_backward(self, *args):
        return self.ext.lstm_backward(*args, None, None, None, None)[:8]

    def gru_forward(self, xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save):
        return self.ext.gru_forward(xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save, None)[:5]

    def gru_backward(self, *args):
        return self.ext.gru_backward(*args, None, None, None)[:6]

    def lstm_forward_ln(self, xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save, g_ih):
        """-> out, h_n, c_n, *saved, mean_ih, rstd_ih (the last 8 only when ``save``)."""
        return self.ext.lstm_forward(xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save, g_ih)

    def lstm_backward_ln(self, *args):
        """lstm_backward's arguments, then xw, g_ih, mean_ih, rstd_ih -> its results, then d g_ih."""
        return self.ext.lstm_backward(*args)

    def gru_forward_ln(self, xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save, g_ih):
        """-> out, h_n, *saved, stats_ih (T, B, 4): per block (mean, rstd), r/u then n."""
        return self.ext.gru_forward(xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save, g_ih)

    def gru_backward_ln(self, *args):
        """gru_backward's arguments, then xw, g_ih, stats_ih -> its results, then d g_ih."""
        return self.ext.gru_backward(*args)


@functools.lru_cache(maxsize=None)
def _cpp_adapter(ext) -> _CppImpl:
    """The one adapter of the loaded extension (every call of _pick_impl gets the same object)."""
    return _CppImpl(ext)


class _CppLinear(torch.autograd.Function):
    """y = x W^T and its backward through the extension's GEMM (oneDNN where torch exports it, as
    ``nn.LSTM``'s CPU kernel uses; else MKL). x: (N, K) contiguous, w: (M, K)."""

    @staticmethod
    def forward(ctx, x, w, ext):
        ctx.ext = ext
        ctx.save_for_backward(x, w)
        return ext.linear_forward(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw = ctx.ext.linear_backward(dy.contiguous(), x, w, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None


def input_projection(x: Tensor, w_ih: Tensor, impl: Optional[str] = None) -> Tensor:
    """``x W_ih^T`` for all steps at once: x (T, B, I), w_ih (G*H, I) -> (T, B, G*H).

    When the recurrence runs in C++ (float32 on CPU), this GEMM and its two backward GEMMs go through
    the extension's GEMM library, like the recurrence's own; otherwise it is ``torch.matmul``."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w_ih.dtype == torch.float32
            and not torch.compiler.is_compiling() and x.numel() > 0):
        imp = _pick_impl(impl, x)
        if isinstance(imp, _CppImpl):
            T, B, I = x.shape
            return _CppLinear.apply(x.reshape(T * B, I).contiguous(), w_ih.contiguous(), imp.ext).view(T, B, -1)
    return torch.matmul(x, w_ih.t())


def _input_ln(xw: Tensor, g_ih: Tensor, blocks: Tuple[int, ...], eps: float) -> Tensor:
    """LN(xw) over each block of the gate axis (gain g_ih, no shift), for implementations that do
    not fuse it: what the layer module does for the reference recurrence (``rnn._ln_blocks``)."""
    from .rnn import _ln_blocks  # rnn imports this module lazily; import it lazily back

    return _ln_blocks(xw, g_ih, list(blocks), eps)


# ------------------------------------------------------------------------------------------------
# The torch-ops implementation (any device). Mirrors _rnn_cpp/rnn.cpp step by step.
# ------------------------------------------------------------------------------------------------


def _mask(lengths: Optional[Tensor], T: int, device) -> Optional[Tensor]:
    if lengths is None:
        return None
    t = torch.arange(T).unsqueeze(1)                           # (T, 1)
    return (t < lengths.to(torch.int64).unsqueeze(0)).unsqueeze(-1).to(device)  # (T, B, 1)


def _ln_stats(v: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    var, mean = torch.var_mean(v, -1, keepdim=True, correction=0)  # (B, 1) each
    return mean, (var + eps).rsqrt()


def _ln_bwd(dy_hat: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    """dx of x_hat = (x - mean) * rstd given d x_hat, rows over the last dim."""
    m1 = dy_hat.mean(-1, keepdim=True)
    m2 = (dy_hat * x_hat).mean(-1, keepdim=True)
    return rstd * (dy_hat - m1 - x_hat * m2)


class _TorchImpl:
    @staticmethod
    def lstm_forward(xw, lengths, h0, c0, w, g, bias, wc, bc, eps, cell_norm, save):
        T, B, H4 = xw.shape
        H = H4 // 4
        mask = _mask(lengths, T, xw.device)
        out = xw.new_empty(T, B, H)
        h, c = h0.clone(), c0.clone()
        hw = xw.new_empty(B, H4)
        if save:
            hw_hat, gates, cs = xw.new_empty(T, B, H4), xw.new_empty(T, B, H4), xw.new_empty(T, B, H)
            rstd1, mean2, rstd2 = (xw.new_zeros(T, B, 1) for _ in range(3))
        wt = w.t()
        for t in range(T):
            torch.mm(h, wt, out=hw)                            # (B, 4H)
            m1, r1 = _ln_stats(hw, eps)
            xh = (hw - m1) * r1                                # (B, 4H)
            a = torch.addcmul(xw[t] if bias is None else xw[t] + bias, xh, g)
            ga = torch.sigmoid(a)
            ga[:, 2 * H:3 * H] = torch.tanh(a[:, 2 * H:3 * H])
            i, f, gg, o = ga.chunk(4, dim=-1)
            c_new = torch.addcmul(f * c, i, gg)                # (B, H)
            if cell_norm:
                m2, r2 = _ln_stats(c_new, eps)
                tc = torch.tanh(torch.addcmul(bc, (c_new - m2) * r2, wc))
            else:
                tc = torch.tanh(c_new)
            h_new = o * tc
            if mask is None:
                h, c = h_new, c_new
                out[t] = h_new
            else:
                m = mask[t]
                h = torch.where(m, h_new, h)
                c = torch.where(m, c_new, c)
                out[t] = h_new * m
            if save:
                hw_hat[t], gates[t], cs[t], rstd1[t] = xh, ga, c, r1
                if cell_norm:
                    mean2[t], rstd2[t] = m2, r2
        if not save:
            return [out, h, c]
        return [out, h, c, hw_hat, gates, cs, rstd1, mean2, rstd2]

    @staticmethod
    def lstm_backward(dout, dhn, dcn, lengths, h0, c0, w, g, wc, bc, out, hw_hat, gates, cs,
                      rstd1, mean2, rstd2, cell_norm):
        T, B, H4 = gates.shape
        H = H4 // 4
        mask = _mask(lengths, T, gates.device)
        dxw = torch.empty_like(gates)
        dhw = torch.empty_like(gates)
        dh, dc = dhn.clone(), dcn.clone()
        dg = torch.zeros_like(g)
        dwc = torch.zeros(H, dtype=gates.dtype, device=gates.device) if cell_norm else None
        dbc = torch.zeros_like(dwc) if cell_norm else None
        for t in range(T - 1, -1, -1):
            i, f, gg, o = gates[t].chunk(4, dim=-1)
            c = cs[t]
            cp = cs[t - 1] if t > 0 else c0
            dhv = dout[t] + dh
            if mask is not None:
                dhv = dhv * mask[t]                            # padding rows contribute nothing
            if cell_norm:
                chat = (c - mean2[t]) * rstd2[t]
                tc = torch.tanh(torch.addcmul(bc, chat, wc))
                dcn_ = dhv * o * (1 - tc * tc)
                dwc += (dcn_ * chat).sum(0)
                dbc += dcn_.sum(0)
                dcv = _ln_bwd(dcn_ * wc, chat, rstd2[t]) + dc
            else:
                tc = torch.tanh(c)
                dcv = dhv * o * (1 - tc * tc) + dc
            dA = torch.cat(
                [dcv * gg * i * (1 - i), dcv * cp * f * (1 - f), dcv * i * (1 - gg * gg), dhv * tc * o * (1 - o)], -1
            )
            if mask is not None:
                m = mask[t]
                dA = dA * m
                dc = torch.where(m, dcv * f, dc)
                direct = dh * ~m
            else:
                dc = dcv * f
                direct = None
            dxw[t] = dA
            dg += (dA * hw_hat[t]).sum(0)
            dhw[t] = _ln_bwd(dA * g, hw_hat[t], rstd1[t])
            dh = dhw[t] @ w if direct is None else torch.addmm(direct, dhw[t], w)
        hprev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
        dw = dhw.reshape(T * B, H4).t() @ hprev.reshape(T * B, H)
        dbias = dxw.reshape(T * B, H4).sum(0)
        return [dxw, dh, dc, dw, dg, dbias, dwc, dbc]

    @staticmethod
    def gru_forward(xw, lengths, h0, w, g, bias_ih, bias_hh, eps, save):
        T, B, H3 = xw.shape
        H = H3 // 3
        mask = _mask(lengths, T, xw.device)
        out = xw.new_empty(T, B, H)
        h = h0.clone()
        hw = xw.new_empty(B, H3)
        bx = xw.new_zeros(H3)
        bn = xw.new_zeros(H)
        if bias_ih is not None:
            bx += bias_ih
        if bias_hh is not None:
            bx[: 2 * H] += bias_hh[: 2 * H]
            bn += bias_hh[2 * H:]
        if save:
            hw_hat, gates = xw.new_empty(T, B, H3), xw.new_empty(T, B, H3)
            rstd = xw.new_zeros(T, B, 2)
        wt = w.t()
        for t in range(T):
            torch.mm(h, wt, out=hw)
            ma, ra = _ln_stats(hw[:, : 2 * H], eps)
            mb, rb = _ln_stats(hw[:, 2 * H:], eps)
            xh = torch.cat([(hw[:, : 2 * H] - ma) * ra, (hw[:, 2 * H:] - mb) * rb], -1)  # (B, 3H)
            xt = xw[t] + bx
            ru = torch.sigmoid(torch.addcmul(xt[:, : 2 * H], xh[:, : 2 * H], g[: 2 * H]))
            r, u = ru.chunk(2, dim=-1)
            n = torch.tanh(torch.addcmul(xt[:, 2 * H:], r, torch.addcmul(bn, xh[:, 2 * H:], g[2 * H:])))
            h_new = torch.lerp(n, h, u)                        # u h + (1 - u) n
            if mask is None:
                h = h_new
                out[t] = h_new
            else:
                m = mask[t]
                h = torch.where(m, h_new, h)
                out[t] = h_new * m
            if save:
                hw_hat[t] = xh
                gates[t, :, : 2 * H] = ru
                gates[t, :, 2 * H:] = n
                rstd[t, :, 0:1], rstd[t, :, 1:2] = ra, rb
        if not save:
            return [out, h]
        return [out, h, hw_hat, gates, rstd]

    @staticmethod
    def gru_backward(dout, dhn, lengths, h0, w, g, bias_hh, out, hw_hat, gates, rstd):
        T, B, H3 = gates.shape
        H = H3 // 3
        mask = _mask(lengths, T, gates.device)
        dxw = torch.empty_like(gates)
        dhw = torch.empty_like(gates)
        dh = dhn.clone()
        dg = torch.zeros_like(g)
        dbn = gates.new_zeros(H)
        bn = bias_hh[2 * H:] if bias_hh is not None else gates.new_zeros(H)
        hprev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)
        for t in range(T - 1, -1, -1):
            r, u, n = gates[t].chunk(3, dim=-1)
            xh = hw_hat[t]
            dhv = dout[t] + dh
            if mask is not None:
                dhv = dhv * mask[t]
            dnp = dhv * (1 - u) * (1 - n * n)
            hn = torch.addcmul(bn, xh[:, 2 * H:], g[2 * H:])
            dhn_ = dnp * r
            dx = torch.cat([dnp * hn * r * (1 - r), dhv * (hprev[t] - n) * u * (1 - u), dnp], -1)
            dxw[t] = dx
            dbn += dhn_.sum(0)
            dxh = torch.cat([dx[:, : 2 * H], dhn_], -1)       # d of the normalized recurrent part, pre-gain
            dg += (dxh * xh).sum(0)
            dyh = dxh * g
            dhw[t, :, : 2 * H] = _ln_bwd(dyh[:, : 2 * H], xh[:, : 2 * H], rstd[t, :, 0:1])
            dhw[t, :, 2 * H:] = _ln_bwd(dyh[:, 2 * H:], xh[:, 2 * H:], rstd[t, :, 1:2])
            direct = dhv * u
            if mask is not None:
                direct = torch.where(mask[t], direct, dh)
            dh = torch.addmm(direct, dhw[t], w)
        dw = dhw.reshape(T * B, H3).t() @ hprev.reshape(T * B, H)
        dbih = dxw.reshape(T * B, H3).sum(0)
        dbhh = dbih.clone()
        dbhh[2 * H:] = dbn
        return [dxw, dh, dw, dg, dbih, dbhh]


# ------------------------------------------------------------------------------------------------
# autograd
# ------------------------------------------------------------------------------------------------


class _LSTMFunction(torch.autograd.Function):
    # g_ih is not None only for an implementation that fuses the input LN (then xw is W_ih x, raw)
    @staticmethod
    def forward(ctx, xw, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih, lengths, eps, cell_norm, impl):
        args = (xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, eps, cell_norm, True)
        if g_ih is None:
            out, h_n, c_n, *saved = impl.lstm_forward(*args)
            ln_saved = ()
        else:
            out, h_n, c_n, *saved = impl.lstm_forward_ln(*args, g_ih)
            saved, ln_saved = saved[:-2], (xw, g_ih, *saved[-2:])
        ctx.save_for_backward(h0, c0, w_hh, g_hh, wc, bc, out, *saved, *ln_saved)
        ctx.n_saved, ctx.fused = len(saved), g_ih is not None
        ctx.lengths, ctx.cell_norm, ctx.impl, ctx.has_bias = lengths, cell_norm, impl, bias is not None
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, dout, dhn, dcn):
        h0, c0, w_hh, g_hh, wc, bc, out, *rest = ctx.saved_tensors
        saved, ln_saved = rest[:ctx.n_saved], rest[ctx.n_saved:]
        args = (dout, dhn, dcn, ctx.lengths, h0, c0, w_hh, g_hh, wc, bc, out, *saved, ctx.cell_norm)
        if ctx.fused:
            dxw, dh0, dc0, dw, dg, db, dwc, dbc, dg_ih = ctx.impl.lstm_backward_ln(*args, *ln_saved)
        else:
            (dxw, dh0, dc0, dw, dg, db, dwc, dbc), dg_ih = ctx.impl.lstm_backward(*args), None
        if not ctx.has_bias:
            db = None
        if not ctx.cell_norm:
            dwc = dbc = None
        return dxw, dh0, dc0, dw, dg, db, dwc, dbc, dg_ih, None, None, None, None


class _GRUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xw, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih, lengths, eps, impl):
        args = (xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, eps, True)
        if g_ih is None:
            out, h_n, *saved = impl.gru_forward(*args)
            ln_saved = ()
        else:
            out, h_n, *saved = impl.gru_forward_ln(*args, g_ih)
            saved, ln_saved = saved[:-1], (xw, g_ih, saved[-1])
        ctx.save_for_backward(h0, w_hh, g_hh, bias_hh, out, *saved, *ln_saved)
        ctx.n_saved, ctx.fused = len(saved), g_ih is not None
        ctx.lengths, ctx.impl = lengths, impl
        ctx.has_bias = (bias_ih is not None, bias_hh is not None)
        return out, h_n

    @staticmethod
    def backward(ctx, dout, dhn):
        h0, w_hh, g_hh, bias_hh, out, *rest = ctx.saved_tensors
        saved, ln_saved = rest[:ctx.n_saved], rest[ctx.n_saved:]
        args = (dout, dhn, ctx.lengths, h0, w_hh, g_hh, bias_hh, out, *saved)
        if ctx.fused:
            dxw, dh0, dw, dg, dbih, dbhh, dg_ih = ctx.impl.gru_backward_ln(*args, *ln_saved)
        else:
            (dxw, dh0, dw, dg, dbih, dbhh), dg_ih = ctx.impl.gru_backward(*args), None
        return (dxw, dh0, dw, dg, dbih if ctx.has_bias[0] else None, dbhh if ctx.has_bias[1] else None,
                dg_ih, None, None, None)


# ------------------------------------------------------------------------------------------------
# public entry points
# ------------------------------------------------------------------------------------------------


def _check(name: str, t: Optional[Tensor], shape: tuple, ref: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, but got {list(t.shape)}")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} must be {ref.dtype} on {ref.device} like xw_ln, but got {t.dtype} on {t.device}")
    return t.contiguous()


def _check_lengths(lengths: Optional[Tensor], T: int, B: int) -> Optional[Tensor]:
    if lengths is None:
        return None
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [{B}], but got {list(lengths.shape)}")
    lengths = lengths.detach().to("cpu", torch.int64)
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, {T}], but got min {int(lengths.min())}, max {int(lengths.max())}")
    return lengths


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


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
    impl: Optional[str] = None,
    ln_ih_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""The LN-LSTM recurrence over ``T`` steps (contract: :func:`layernorm.nn.rnn_reference.lstm_recurrence`).

    .. math::
        a_t = \mathrm{LN}(h_{t-1} W_{hh}^T)\,g_{hh} + x_t + b,\quad
        c_t = \sigma(f) c_{t-1} + \sigma(i)\tanh(g),\quad
        h_t = \sigma(o)\tanh(\mathrm{LN}(c_t)\,g_c + b_c)

    Args:
        xw_ln: (T, B, 4H) the normalized input projection, gates i, f, g, o.
        lengths: int64 (B,) in [0, T], any order, or None (every sequence has T steps).
        h0, c0: (B, H). w_hh: (4H, H). ln_hh_weight: (4H,). bias: (4H,) or None.
        ln_cell_weight, ln_cell_bias: (H,); ignored (may be None) when ``cell_norm`` is False.
        ln_ih_weight: (4H,) or None. Given, ``xw_ln`` is the raw projection ``W_ih x`` and
            ``LN(xw_ln) * ln_ih_weight`` is taken here: inside the C++ time loop, or before it by
            :func:`layernorm.functional.layer_norm` for the other implementations.
        impl: ``"auto"``, ``"cpp"``, ``"torch"``, ``"triton"`` or None (= ``$LAYERNORM_RNN_IMPL`` or auto).

    Returns:
        out (T, B, H), zero past each length; h_n, c_n (B, H), the state after each sequence's last step.
    """
    if xw_ln.dim() != 3 or xw_ln.shape[2] % 4 or xw_ln.shape[0] == 0:
        raise ValueError(f"xw_ln must have shape [T, B, 4*H] with T >= 1, but got {list(xw_ln.shape)}")
    T, B, H4 = xw_ln.shape
    H = H4 // 4
    xw_ln = xw_ln.contiguous()
    h0 = _check("h0", h0, (B, H), xw_ln)
    c0 = _check("c0", c0, (B, H), xw_ln)
    w_hh = _check("w_hh", w_hh, (H4, H), xw_ln)
    ln_hh_weight = _check("ln_hh_weight", ln_hh_weight, (H4,), xw_ln)
    bias = _check("bias", bias, (H4,), xw_ln)
    if cell_norm:
        if ln_cell_weight is None or ln_cell_bias is None:
            raise ValueError("ln_cell_weight and ln_cell_bias are required when cell_norm is True")
        ln_cell_weight = _check("ln_cell_weight", ln_cell_weight, (H,), xw_ln)
        ln_cell_bias = _check("ln_cell_bias", ln_cell_bias, (H,), xw_ln)
    else:
        ln_cell_weight = ln_cell_bias = None
    ln_ih_weight = _check("ln_ih_weight", ln_ih_weight, (H4,), xw_ln)
    if torch.compiler.is_compiling():  # one custom op, which dynamo can trace (see the end of this file)
        return _lstm_compiled(xw_ln, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias,
                              eps, cell_norm, impl, ln_ih_weight)
    lengths = _check_lengths(lengths, T, B)
    eps, cell_norm = float(eps), bool(cell_norm)
    imp = _pick_impl(impl, xw_ln)
    if ln_ih_weight is not None and not getattr(imp, "fuses_input_ln", False):
        xw_ln, ln_ih_weight = _input_ln(xw_ln, ln_ih_weight, (H4,), eps), None
    if not _needs_grad(xw_ln, h0, c0, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias, ln_ih_weight):
        args = (xw_ln, lengths, h0, c0, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias, eps, cell_norm, False)
        with torch.no_grad():  # inference: nothing saved, one step of scratch
            res = imp.lstm_forward(*args) if ln_ih_weight is None else imp.lstm_forward_ln(*args, ln_ih_weight)
        return res[0], res[1], res[2]
    return _LSTMFunction.apply(xw_ln, h0, c0, w_hh, ln_hh_weight, bias, ln_cell_weight, ln_cell_bias, ln_ih_weight,
                               lengths, eps, cell_norm, imp)


def gru_recurrence(
    xw_ln: Tensor,
    lengths: Optional[Tensor],
    h0: Tensor,
    w_hh: Tensor,
    ln_hh_weight: Tensor,
    bias_ih: Optional[Tensor],
    bias_hh: Optional[Tensor],
    eps: float,
    impl: Optional[str] = None,
    ln_ih_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""The LN-GRU recurrence over ``T`` steps (contract: :func:`layernorm.nn.rnn_reference.gru_recurrence`).

    .. math::
        [r, u] = \sigma(x^{ru}_t + b^{ru}_{ih} + \mathrm{LN}(h W^{ru\,T}) g^{ru} + b^{ru}_{hh}),\quad
        n = \tanh(x^n_t + b^n_{ih} + r \odot (\mathrm{LN}(h W^{n\,T}) g^n + b^n_{hh})),\quad
        h_t = u \odot h_{t-1} + (1 - u) \odot n

    Args:
        xw_ln: (T, B, 3H), gates r, u, n. lengths: as :func:`lstm_recurrence`. h0: (B, H).
        w_hh: (3H, H). ln_hh_weight: (3H,). bias_ih, bias_hh: (3H,) or None. impl: as above.
        ln_ih_weight: (3H,) or None: as :func:`lstm_recurrence`, one LN over [0, 2H), one over [2H, 3H).

    Returns:
        out (T, B, H), zero past each length; h_n (B, H).
    """
    if xw_ln.dim() != 3 or xw_ln.shape[2] % 3 or xw_ln.shape[0] == 0:
        raise ValueError(f"xw_ln must have shape [T, B, 3*H] with T >= 1, but got {list(xw_ln.shape)}")
    T, B, H3 = xw_ln.shape
    H = H3 // 3
    xw_ln = xw_ln.contiguous()
    h0 = _check("h0", h0, (B, H), xw_ln)
    w_hh = _check("w_hh", w_hh, (H3, H), xw_ln)
    ln_hh_weight = _check("ln_hh_weight", ln_hh_weight, (H3,), xw_ln)
    bias_ih = _check("bias_ih", bias_ih, (H3,), xw_ln)
    bias_hh = _check("bias_hh", bias_hh, (H3,), xw_ln)
    ln_ih_weight = _check("ln_ih_weight", ln_ih_weight, (H3,), xw_ln)
    if torch.compiler.is_compiling():  # as in lstm_recurrence
        return _gru_compiled(xw_ln, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, eps, impl, ln_ih_weight)
    lengths = _check_lengths(lengths, T, B)
    eps = float(eps)
    imp = _pick_impl(impl, xw_ln)
    if ln_ih_weight is not None and not getattr(imp, "fuses_input_ln", False):
        xw_ln, ln_ih_weight = _input_ln(xw_ln, ln_ih_weight, (2 * H, H), eps), None
    if not _needs_grad(xw_ln, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight):
        args = (xw_ln, lengths, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, eps, False)
        with torch.no_grad():
            res = imp.gru_forward(*args) if ln_ih_weight is None else imp.gru_forward_ln(*args, ln_ih_weight)
        return res[0], res[1]
    return _GRUFunction.apply(xw_ln, h0, w_hh, ln_hh_weight, bias_ih, bias_hh, ln_ih_weight, lengths, eps, imp)


# ------------------------------------------------------------------------------------------------
# torch.compile: each recurrence call as ONE opaque custom op (forward op + backward op)
# ------------------------------------------------------------------------------------------------
#
# The pybind calls of the C++ implementation (and the Python time loops of the others) cannot be
# traced by dynamo, so under torch.compile lstm_recurrence / gru_recurrence call the custom ops
# layernorm::{lstm,gru}_recurrence_{fwd,bwd} instead of the autograd.Function (eager keeps the
# autograd.Function: a custom op's Python dispatch costs more per call). The implementation is
# resolved to a concrete name ("cpp", "torch", "triton") while tracing and crosses the op boundary
# as that string; the op resolves it again with _pick_impl. The input LN of the implementations that
# do not fuse it is applied before the op (through layernorm::norm_fwd), as in eager; g_ih reaches
# the op only for "cpp". Custom ops cannot return None, so the forward op always returns a fixed
# number of saved tensors and the backward op a fixed number of gradients, empty when absent; the
# fake kernels below reproduce the shapes of rnn.cpp / _TorchImpl / _TritonImpl exactly
# (opcheck in tests/test_rnn_compile.py keeps them honest).

_NONE = (0,)  # the shape of an "absent" tensor


class _DeviceDtype:
    """What _pick_impl reads of a tensor, without a tensor."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device_type), dtype


@torch.compiler.assume_constant_result
def _impl_name(impl: Optional[str], device_type: str, dtype: torch.dtype) -> str:
    """The concrete implementation ``impl`` (None/"auto" = environment or auto) picks for tensors of
    this device type and dtype. Evaluated once while tracing, so a later change of
    ``$LAYERNORM_RNN_IMPL`` does not reach an already compiled graph."""
    imp = _pick_impl(impl, _DeviceDtype(device_type, dtype))
    if isinstance(imp, _CppImpl):
        return "cpp"
    return "torch" if imp is _TorchImpl else "triton"


def _op_lengths(lengths: Optional[Tensor], B: int) -> Optional[Tensor]:
    """_check_lengths without its data-dependent range check, which the op does on real values."""
    if lengths is None:
        return None
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [{B}], but got {list(lengths.shape)}")
    return lengths.detach().to("cpu", torch.int64)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(_NONE)


# ---- LSTM


def _lstm_saved_shapes(impl: str, T, B, H, fused: bool) -> list:
    """Shapes of hw_hat, gates, cs, rstd1, mean2, rstd2, mean_ih, rstd_ih as ``impl`` saves them."""
    stat = (T, B) if impl == "cpp" else (T, B, 1)
    ln = [(T, B), (T, B)] if fused else [_NONE, _NONE]
    return [(T, B, 4 * H), (T, B, 4 * H), (T, B, H), stat, stat, stat, *ln]


@torch.library.custom_op(
    "layernorm::lstm_recurrence_fwd", mutates_args=(),
    schema="(Tensor xw, Tensor? lengths, Tensor h0, Tensor c0, Tensor w_hh, Tensor g_hh, Tensor? bias, "
           "Tensor? wc, Tensor? bc, Tensor? g_ih, float eps, bool cell_norm, bool save, str impl) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lstm_recurrence_fwd(xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih, eps, cell_norm, save, impl):
    """-> out, h_n, c_n, then hw_hat, gates, cs, rstd1, mean2, rstd2, mean_ih, rstd_ih for backward
    (all 8 empty without ``save``; the last 2 empty without ``g_ih``, which only "cpp" takes)."""
    T, B, _ = xw.shape
    lengths = _check_lengths(lengths, T, B)
    imp = _pick_impl(impl, xw)
    args = (xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, eps, cell_norm, save)
    if g_ih is None:
        res = list(imp.lstm_forward(*args))[:9]
    elif getattr(imp, "fuses_input_ln", False):
        res = list(imp.lstm_forward_ln(*args, g_ih))
    else:
        raise ValueError(f"layernorm::lstm_recurrence_fwd: impl={impl!r} does not take g_ih (normalize xw first)")
    res = [r if r is not None else _empty(xw) for r in res]
    return tuple(res + [_empty(xw) for _ in range(11 - len(res))])


@lstm_recurrence_fwd.register_fake
def _(xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih, eps, cell_norm, save, impl):
    T, B, H4 = xw.shape
    H = H4 // 4
    saved = _lstm_saved_shapes(impl, T, B, H, g_ih is not None) if save else [_NONE] * 8
    return (xw.new_empty(T, B, H), xw.new_empty(B, H), xw.new_empty(B, H), *(xw.new_empty(s) for s in saved))


@torch.library.custom_op(
    "layernorm::lstm_recurrence_bwd", mutates_args=(),
    schema="(Tensor dout, Tensor dhn, Tensor dcn, Tensor? lengths, Tensor h0, Tensor c0, Tensor w_hh, "
           "Tensor g_hh, Tensor? wc, Tensor? bc, Tensor out, Tensor[] saved, Tensor? xw, Tensor? g_ih, "
           "bool cell_norm, str impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def lstm_recurrence_bwd(dout, dhn, dcn, lengths, h0, c0, w_hh, g_hh, wc, bc, out, saved, xw, g_ih, cell_norm, impl):
    """-> dxw, dh0, dc0, dw_hh, dg_hh, dbias, dwc, dbc, dg_ih; dwc/dbc empty without ``cell_norm``,
    dg_ih empty without ``g_ih``. ``saved``: the forward op's 8 saved outputs; ``xw``: the forward's
    raw projection, needed (and given) only with ``g_ih``."""
    lengths = _check_lengths(lengths, out.shape[0], out.shape[1])
    imp = _pick_impl(impl, out)
    args = (dout, dhn, dcn, lengths, h0, c0, w_hh, g_hh, wc, bc, out, *saved[:6], cell_norm)
    if g_ih is None:
        res = list(imp.lstm_backward(*args)) + [None]
    else:
        res = list(imp.lstm_backward_ln(*args, xw, g_ih, saved[6], saved[7]))
    return tuple(r if r is not None else _empty(out) for r in res)


@lstm_recurrence_bwd.register_fake
def _(dout, dhn, dcn, lengths, h0, c0, w_hh, g_hh, wc, bc, out, saved, xw, g_ih, cell_norm, impl):
    T, B, H = out.shape
    dnorm = (lambda: out.new_empty(H)) if cell_norm else (lambda: _empty(out))
    return (out.new_empty(T, B, 4 * H), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_hh),
            torch.empty_like(g_hh), out.new_empty(4 * H), dnorm(), dnorm(),
            torch.empty_like(g_ih) if g_ih is not None else _empty(out))


def _lstm_setup_context(ctx, inputs, output):
    xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih, eps, cell_norm, save, impl = inputs
    fused = g_ih is not None
    ctx.save_for_backward(lengths, h0, c0, w_hh, g_hh, wc, bc, output[0], xw if fused else None, g_ih, *output[3:])
    ctx.cell_norm, ctx.impl, ctx.save = cell_norm, impl, save
    ctx.has_bias, ctx.fused = bias is not None, fused
    ctx.mark_non_differentiable(*output[3:])


def _lstm_backward(ctx, dout, dhn, dcn, *_):
    if not ctx.save:
        raise RuntimeError("layernorm::lstm_recurrence_fwd ran with save=False: nothing to differentiate with")
    lengths, h0, c0, w_hh, g_hh, wc, bc, out, xw, g_ih, *saved = ctx.saved_tensors
    dxw, dh0, dc0, dw, dg, db, dwc, dbc, dg_ih = lstm_recurrence_bwd(
        dout, dhn, dcn, lengths, h0, c0, w_hh, g_hh, wc, bc, out, saved, xw, g_ih, ctx.cell_norm, ctx.impl
    )
    cn = ctx.cell_norm
    return (dxw, None, dh0, dc0, dw, dg, db if ctx.has_bias else None, dwc if cn else None, dbc if cn else None,
            dg_ih if ctx.fused else None, None, None, None, None)


torch.library.register_autograd("layernorm::lstm_recurrence_fwd", _lstm_backward, setup_context=_lstm_setup_context)


# ---- GRU


@torch.library.custom_op(
    "layernorm::gru_recurrence_fwd", mutates_args=(),
    schema="(Tensor xw, Tensor? lengths, Tensor h0, Tensor w_hh, Tensor g_hh, Tensor? bias_ih, Tensor? bias_hh, "
           "Tensor? g_ih, float eps, bool save, str impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def gru_recurrence_fwd(xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih, eps, save, impl):
    """-> out, h_n, then hw_hat, gates, rstd, stats_ih for backward (all 4 empty without ``save``;
    stats_ih empty without ``g_ih``, which only "cpp" takes)."""
    T, B, _ = xw.shape
    lengths = _check_lengths(lengths, T, B)
    imp = _pick_impl(impl, xw)
    args = (xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, eps, save)
    if g_ih is None:
        res = list(imp.gru_forward(*args))[:5]
    elif getattr(imp, "fuses_input_ln", False):
        res = list(imp.gru_forward_ln(*args, g_ih))
    else:
        raise ValueError(f"layernorm::gru_recurrence_fwd: impl={impl!r} does not take g_ih (normalize xw first)")
    res = [r if r is not None else _empty(xw) for r in res]
    return tuple(res + [_empty(xw) for _ in range(6 - len(res))])


@gru_recurrence_fwd.register_fake
def _(xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih, eps, save, impl):
    T, B, H3 = xw.shape
    H = H3 // 3
    if save:
        saved = [(T, B, H3), (T, B, H3), (T, B, 2), (T, B, 4) if g_ih is not None else _NONE]
    else:
        saved = [_NONE] * 4
    return (xw.new_empty(T, B, H), xw.new_empty(B, H), *(xw.new_empty(s) for s in saved))


@torch.library.custom_op(
    "layernorm::gru_recurrence_bwd", mutates_args=(),
    schema="(Tensor dout, Tensor dhn, Tensor? lengths, Tensor h0, Tensor w_hh, Tensor g_hh, Tensor? bias_hh, "
           "Tensor out, Tensor[] saved, Tensor? xw, Tensor? g_ih, str impl) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def gru_recurrence_bwd(dout, dhn, lengths, h0, w_hh, g_hh, bias_hh, out, saved, xw, g_ih, impl):
    """-> dxw, dh0, dw_hh, dg_hh, dbias_ih, dbias_hh, dg_ih (empty without ``g_ih``); ``saved``: the
    forward op's 4 saved outputs; ``xw``: the forward's raw projection, only with ``g_ih``."""
    lengths = _check_lengths(lengths, out.shape[0], out.shape[1])
    imp = _pick_impl(impl, out)
    args = (dout, dhn, lengths, h0, w_hh, g_hh, bias_hh, out, *saved[:3])
    if g_ih is None:
        res = list(imp.gru_backward(*args)) + [None]
    else:
        res = list(imp.gru_backward_ln(*args, xw, g_ih, saved[3]))
    return tuple(r if r is not None else _empty(out) for r in res)


@gru_recurrence_bwd.register_fake
def _(dout, dhn, lengths, h0, w_hh, g_hh, bias_hh, out, saved, xw, g_ih, impl):
    T, B, H = out.shape
    return (out.new_empty(T, B, 3 * H), torch.empty_like(h0), torch.empty_like(w_hh), torch.empty_like(g_hh),
            out.new_empty(3 * H), out.new_empty(3 * H), torch.empty_like(g_ih) if g_ih is not None else _empty(out))


def _gru_setup_context(ctx, inputs, output):
    xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih, eps, save, impl = inputs
    fused = g_ih is not None
    ctx.save_for_backward(lengths, h0, w_hh, g_hh, bias_hh, output[0], xw if fused else None, g_ih, *output[2:])
    ctx.impl, ctx.save, ctx.fused = impl, save, fused
    ctx.has_bias = (bias_ih is not None, bias_hh is not None)
    ctx.mark_non_differentiable(*output[2:])


def _gru_backward(ctx, dout, dhn, *_):
    if not ctx.save:
        raise RuntimeError("layernorm::gru_recurrence_fwd ran with save=False: nothing to differentiate with")
    lengths, h0, w_hh, g_hh, bias_hh, out, xw, g_ih, *saved = ctx.saved_tensors
    dxw, dh0, dw, dg, dbih, dbhh, dg_ih = gru_recurrence_bwd(
        dout, dhn, lengths, h0, w_hh, g_hh, bias_hh, out, saved, xw, g_ih, ctx.impl
    )
    return (dxw, None, dh0, dw, dg, dbih if ctx.has_bias[0] else None, dbhh if ctx.has_bias[1] else None,
            dg_ih if ctx.fused else None, None, None, None)


torch.library.register_autograd("layernorm::gru_recurrence_fwd", _gru_backward, setup_context=_gru_setup_context)


# ---- the compiled paths of the public entry points (arguments already validated by them)


def _lstm_compiled(xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, eps, cell_norm, impl, g_ih):
    _, B, H4 = xw.shape
    lengths = _op_lengths(lengths, B)
    name = _impl_name(impl, xw.device.type, xw.dtype)
    eps, cell_norm = float(eps), bool(cell_norm)
    if g_ih is not None and name != "cpp":
        xw, g_ih = _input_ln(xw, g_ih, (H4,), eps), None
    save = _needs_grad(xw, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih)
    res = lstm_recurrence_fwd(xw, lengths, h0, c0, w_hh, g_hh, bias, wc, bc, g_ih, eps, cell_norm, save, name)
    return res[0], res[1], res[2]


def _gru_compiled(xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, eps, impl, g_ih):
    _, B, H3 = xw.shape
    lengths = _op_lengths(lengths, B)
    name = _impl_name(impl, xw.device.type, xw.dtype)
    eps = float(eps)
    if g_ih is not None and name != "cpp":
        xw, g_ih = _input_ln(xw, g_ih, (2 * H3 // 3, H3 // 3), eps), None
    save = _needs_grad(xw, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih)
    res = gru_recurrence_fwd(xw, lengths, h0, w_hh, g_hh, bias_ih, bias_hh, g_ih, eps, save, name)
    return res[0], res[1]


# ------------------------------------------------------------------------------------------------
# benchmark: python -m layernorm.nn.rnn_fast [--quick]
# ------------------------------------------------------------------------------------------------


def _saved_bytes(f) -> int:  # pragma: no cover - measurement
    """Bytes of distinct storages autograd keeps for backward while ``f()`` builds its graph."""
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = f()
    del y
    return sum(seen.values())


def _bench_main(argv=None) -> None:  # pragma: no cover - measurement, run by hand
    """Forward+backward time of one layer (input GEMM + input LN + recurrence) vs nn.LSTM / nn.GRU.

    Every variant runs interleaved in one process and the minimum over rounds is reported (on a
    shared machine other processes only ever add time), so the ratios are meaningful even when
    the machine is noisy.
    """
    import argparse
    import time

    from torch import nn

    from . import rnn_reference

    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-naive", action="store_true")
    a = p.parse_args(argv)
    T, H, I = a.T, a.H, a.H
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} T={T} I=H={H}; fwd+bwd ms (min of {a.rounds}); ratio vs nn.*")
    for mode, G in (("LSTM", 4), ("GRU", 3)):
        ref_mod = (nn.LSTM if mode == "LSTM" else nn.GRU)(I, H)
        w_ih = nn.Parameter(torch.randn(G * H, I) / I ** 0.5)
        w_hh = nn.Parameter(torch.randn(G * H, H) / H ** 0.5)
        g_ih = nn.Parameter(torch.ones(G * H))
        g_hh = nn.Parameter(torch.ones(G * H))
        b_ih = nn.Parameter(torch.zeros(G * H))
        b_hh = nn.Parameter(torch.zeros(G * H))
        wc, bc = nn.Parameter(torch.ones(H)), nn.Parameter(torch.zeros(H))
        blocks = [4 * H] if mode == "LSTM" else [2 * H, H]

        def layer(fns, x, **kw):
            xw = x @ w_ih.t()                                   # (T, B, GH)
            if fns is rnn_reference:  # LN of the projection first, as the module does for the reference
                parts = [torch.nn.functional.layer_norm(v, (v.shape[-1],), gw, None, 1e-5)
                         for v, gw in zip(xw.split(blocks, -1), g_ih.split(blocks))]
                xw_ln = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
            else:  # as the module calls the fast path: raw projection, LN inside (fused in C++)
                xw_ln, kw = xw, {**kw, "ln_ih_weight": g_ih}
            h0 = x.new_zeros(x.shape[1], H)
            if mode == "LSTM":
                out, hn, cn = fns.lstm_recurrence(xw_ln, None, h0, h0, w_hh, g_hh, b_ih + b_hh, wc, bc, 1e-5, True, **kw)
            else:
                out, hn = fns.gru_recurrence(xw_ln, None, h0, w_hh, g_hh, b_ih, b_hh, 1e-5, **kw)
            return out

        import sys

        fast = sys.modules[__name__]
        for B in a.batches:
            x = torch.randn(T, B, I, requires_grad=True)
            variants = {
                f"nn.{mode}": lambda: ref_mod(x)[0],
                "fast[cpp]": lambda: layer(fast, x, impl="cpp"),
                "fast[torch]": lambda: layer(fast, x, impl="torch"),
            }
            if not a.no_naive:
                variants["naive loop"] = lambda: layer(rnn_reference, x)
            mem = {k: _saved_bytes(f) for k, f in variants.items()}
            times = {k: [] for k in variants}
            for r in range(a.rounds + 1):
                for k, f in variants.items():
                    t0 = time.perf_counter()
                    f().sum().backward()
                    dt = time.perf_counter() - t0
                    if r:  # first round: warm-up
                        times[k].append(dt)
            base = min(times[f"nn.{mode}"])
            row = []
            for k, v in times.items():
                med = min(v)
                row.append(f"{k} {med * 1e3:7.1f} ms ({med / base:4.2f}x, saved {mem[k] / 2**20:5.1f} MiB)")
            print(f"{mode} B={B:3d}: " + " | ".join(row), flush=True)


if __name__ == "__main__":  # pragma: no cover
    _bench_main()
