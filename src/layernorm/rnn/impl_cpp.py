"""The ``"cpp"`` implementation: the whole time loop in the package's C++ extension (``native/csrc/rnn.cpp``).

CPU, float32 and float64. One OpenMP parallel region runs all T steps: the batch rows (or, for small
batches, the hidden units) are split among the threads once, each thread multiplies its part of the
step with a GEMM kernel of its own against a weight packed once per call, and the layer norms, gates
and cell update are fused around it; nothing is dispatched per step. Design and measurements:
``docs/rnn_fast.md``.

Also the layer's input projection ``x W_ihᵀ`` and its backward (:func:`linear`), through the same
GEMM library torch's ``nn.LSTM`` uses on CPU (oneDNN, where torch exports it).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .contract import GRUArgs, LSTMArgs
from .dispatch import native

__all__ = ["CppImpl", "cpp_impl", "linear"]


class CppImpl:
    """The contract's four methods on the extension's entry points (same argument order as the contract)."""

    name = "cpp"

    def __init__(self, ext):
        self.ext = ext

    def lstm_forward(self, a: LSTMArgs, save: bool):
        return tuple(self.ext.lstm_forward(*a, save))

    def lstm_backward(self, a: LSTMArgs, out, hw_hat, gates, cs, stats, dout, dh_n, dc_n):
        return tuple(self.ext.lstm_backward(*a, out, hw_hat, gates, cs, stats, dout.contiguous(), dh_n.contiguous(),
                                            dc_n.contiguous()))

    def gru_forward(self, a: GRUArgs, save: bool):
        return tuple(self.ext.gru_forward(*a, save))

    def gru_backward(self, a: GRUArgs, out, hw_hat, gates, stats, dout, dh_n):
        return tuple(self.ext.gru_backward(*a, out, hw_hat, gates, stats, dout.contiguous(), dh_n.contiguous()))


@functools.lru_cache(maxsize=None)
def _impl(ext) -> CppImpl:
    return CppImpl(ext)


def cpp_impl() -> CppImpl:
    ext = native()
    if ext is None:
        raise RuntimeError("the C++ extension is not built (`layernorm build` says why)")
    return _impl(ext)


class _Linear(torch.autograd.Function):
    """y = x Wᵀ and its backward through the extension's GEMM. x: (N, K) contiguous, w: (M, K)."""

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


def linear(x: Tensor, w: Tensor) -> Tensor:
    """``x Wᵀ`` for x (T, B, I), w (G, I) -> (T, B, G) with the extension's GEMM (float32 CPU only)."""
    T, B, I = x.shape
    return _Linear.apply(x.reshape(T * B, I).contiguous(), w.contiguous(), native()).view(T, B, -1)
