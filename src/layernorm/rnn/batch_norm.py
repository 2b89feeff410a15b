r"""Recurrent batch normalization (Cooijmans et al., 2016): the BatchNorm baseline of the LN-LSTM.

One module, :class:`BatchNormLSTM`, run by its own Python loop over time (statistics per step make it
a different model from the LN-LSTM: it has no fast path).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .contract import check_lengths
from .modules import (check_eps, check_input_tensor, check_sizes, check_state, repack, tuple_state_error,
                      unpack_input)
from .reference import step_mask

__all__ = ["BatchNormLSTM"]


def masked_moments(x: Tensor, running: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of x (B, C) over the rows where ``running`` (B, 1) is True, and their count.

    With no row counted (an empty batch, or a step past every sequence's end) the mean and variance
    are 0, not 0/0: those rows are masked out of the output anyway, and a NaN here would reach every
    gradient through 0 * NaN."""
    if running is None:
        n = torch.full((), x.shape[0], dtype=x.dtype, device=x.device)
        total = x.sum(0, keepdim=True)
        mean = total / n.clamp(min=1)
        var = (x - mean).square().sum(0, keepdim=True) / n.clamp(min=1)
        return mean, var, n
    m = running.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum(0, keepdim=True) / n.clamp(min=1)
    var = ((x - mean).square() * m).sum(0, keepdim=True) / n.clamp(min=1)
    return mean, var, n


class BatchNormLSTM(nn.Module):
    r"""Recurrent batch-normalized LSTM (Cooijmans et al., 2016), the BatchNorm baseline.

    .. math::
        \begin{aligned}
        (i, f, g, o) &= \mathrm{BN}_t(W_{ih} x_t; \gamma_{ih}) + \mathrm{BN}_t(W_{hh} h_{t-1}; \gamma_{hh})
                        + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g), \qquad
        h_t = \sigma(o) \odot \tanh(\mathrm{BN}_t(c_t; \gamma_c, \beta_c))
        \end{aligned}

    :math:`\mathrm{BN}_t` normalizes each feature over the batch with statistics *of step t*.
    In training it uses the batch statistics of the step (only over sequences still running when
    given a ``PackedSequence`` or ``lengths``) and updates running statistics kept per step for
    ``t < max_length``; in evaluation it uses the running statistics of step ``min(t, max_length-1)``
    (steps beyond ``max_length`` reuse the last). Gains :math:`\gamma` start at 0.1 (the paper's
    advice: 1 saturates the tanh and the gradients vanish), :math:`\beta_c` at 0.

    A step with no running sequence (an empty batch, or every sequence already ended) leaves the
    running statistics of that step as they are, like ``nn.BatchNorm1d`` with an empty batch.

    Unidirectional only, no inter-layer dropout (the paper uses neither). Running statistics are
    buffers ``running_mean_{ih,hh,cell}_lk``, ``running_var_{ih,hh,cell}_lk`` of shape
    (max_length, features), so ``state_dict`` holds them. The running variance is updated with the
    unbiased batch variance, as ``nn.BatchNorm1d`` does (a step with a single running sequence uses the
    biased one, i.e. 0).

    Args:
        input_size, hidden_size, num_layers, batch_first, bias: as ``nn.LSTM``.
        max_length: number of time steps with their own statistics. Default: 100.
        momentum: running statistic update ``r = (1 - momentum) r + momentum * batch``. Default: 0.1.
        eps: added to the variance. Default: 1e-5.

    Inputs: ``input, hx=None, lengths=None``: input and ``hx = (h_0, c_0)`` as ``nn.LSTM`` (padded
    tensor or ``PackedSequence``); ``lengths`` (N,) in [0, L] marks the real steps of a padded batch.

    Example::

        >>> rnn = BatchNormLSTM(10, 20, max_length=50)
        >>> output, (hn, cn) = rnn(torch.randn(50, 8, 10))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = False,
        max_length: int = 100,
        momentum: float = 0.1,
        eps: float = 1e-5,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_sizes(input_size, hidden_size, num_layers)
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1, but got max_length={max_length!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be a number in [0, 1], but got momentum={momentum!r}")
        factory = {"device": device, "dtype": dtype}
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.batch_first = bool(batch_first)
        self.max_length = int(max_length)
        self.momentum = float(momentum)
        self.eps = check_eps(eps)
        self.bias = bool(bias)
        G, H = 4 * hidden_size, hidden_size
        for k in range(num_layers):
            layer_input = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G, layer_input, **factory)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G, H, **factory)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G, **factory)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G, **factory)))
            self.register_parameter(f"bn_ih_weight_l{k}", nn.Parameter(torch.empty(G, **factory)))
            self.register_parameter(f"bn_hh_weight_l{k}", nn.Parameter(torch.empty(G, **factory)))
            self.register_parameter(f"bn_cell_weight_l{k}", nn.Parameter(torch.empty(H, **factory)))
            self.register_parameter(f"bn_cell_bias_l{k}", nn.Parameter(torch.empty(H, **factory)))
            for part, width in (("ih", G), ("hh", G), ("cell", H)):
                self.register_buffer(f"running_mean_{part}_l{k}", torch.zeros(max_length, width, **factory))
                self.register_buffer(f"running_var_{part}_l{k}", torch.ones(max_length, width, **factory))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running means to 0, running variances to 1, for every step and layer."""
        for name, buf in self.named_buffers():
            if name.startswith("running_mean"):
                buf.zero_()
            else:
                buf.fill_(1.0)

    def reset_parameters(self) -> None:
        """Weights and biases uniform(-1/sqrt(H), 1/sqrt(H)); BN gains 0.1, shift 0; running stats reset."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("bn_") and "weight" in name:
                nn.init.constant_(p, 0.1)
            elif name.startswith("bn_"):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -stdv, stdv)
        self.reset_running_stats()

    def flatten_parameters(self) -> None:
        """No-op, for ``nn.LSTM`` API compatibility."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.batch_first:
            s += ", batch_first=True"
        s += f", max_length={self.max_length}, momentum={self.momentum}"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        if not self.bias:
            s += ", bias=False"
        return s

    def _update_running(self, name: str, slot: int, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """running[slot] <- (1 - momentum) running[slot] + momentum * batch (unbiased var); kept when n = 0."""
        with torch.no_grad():
            unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
            rm, rv = getattr(self, f"running_mean_{name}"), getattr(self, f"running_var_{name}")
            seen = n > 0
            rm[slot] = torch.where(seen, rm[slot].lerp(mean.detach().to(rm.dtype), self.momentum), rm[slot])
            rv[slot] = torch.where(seen, rv[slot].lerp(unbiased.detach().to(rv.dtype), self.momentum), rv[slot])

    def _bn_step(self, x: Tensor, running: Optional[Tensor], name: str, t: int, weight, bias) -> Tensor:
        """BN of one step x (B, C) over the batch rows where ``running`` (B, 1) is True."""
        slot = min(t, self.max_length - 1)
        if self.training:
            mean, var, n = masked_moments(x, running)           # (1, C), (1, C), count
            if t < self.max_length:
                self._update_running(name, slot, mean[0], var[0], n)
        else:
            mean = getattr(self, f"running_mean_{name}")[slot]
            var = getattr(self, f"running_var_{name}")[slot]
        y = (x - mean) * torch.rsqrt(var + self.eps) * weight  # (B, C)
        return y if bias is None else y + bias

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None):
        name = type(self).__name__
        x, packed_lengths, packed, is_batched = unpack_input(input, self.batch_first, name)
        T, B, H = x.shape[0], x.shape[1], self.hidden_size
        if packed is not None:
            if lengths is not None:
                raise ValueError(f"{name}: pass lengths only with a padded tensor, not with a PackedSequence")
            lengths = packed_lengths
        elif lengths is not None:
            lengths = torch.as_tensor(lengths)
            if lengths.dim() != 1 or lengths.shape[0] != B:
                raise ValueError(f"{name}: lengths must have shape ({B},), got {tuple(lengths.shape)}")
            if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
                raise ValueError(f"{name}: lengths must be in [0, {T}], got {lengths.tolist()}")
        lengths = check_lengths(lengths, T, B)
        check_input_tensor(x, self.input_size, self.weight_ih_l0)
        shape = (self.num_layers, B, H)
        if hx is None:
            h0s = c0s = x.new_zeros(shape)
        else:
            msg = tuple_state_error(hx, is_batched)
            if msg is not None:
                raise TypeError(f"{name}: {msg.replace('D*num_layers', 'num_layers')}")
            h0s, c0s = hx
            if not is_batched:
                h0s, c0s = h0s.unsqueeze(1), c0s.unsqueeze(1)
            check_state("hidden[0]", h0s, shape, x)
            check_state("hidden[1]", c0s, shape, x)
        mask = step_mask(lengths, T, x.device)                 # (T, B, 1) or None
        layer_in = x
        hs, cs = [], []
        for k in range(self.num_layers):
            g = lambda n: getattr(self, f"{n}_l{k}", None)  # noqa: E731
            xw = torch.matmul(layer_in, g("weight_ih").t())   # (T, B, 4H) all steps in one GEMM
            bias = g("bias_ih") + g("bias_hh") if self.bias else None
            h, c = h0s[k], c0s[k]
            outs = []
            for t in range(T):
                m = None if mask is None else mask[t]          # (B, 1)
                gates = self._bn_step(xw[t], m, f"ih_l{k}", t, g("bn_ih_weight"), None)
                gates = gates + self._bn_step(h @ g("weight_hh").t(), m, f"hh_l{k}", t, g("bn_hh_weight"), None)
                if bias is not None:
                    gates = gates + bias                       # (B, 4H)
                i, f, gg, o = gates.chunk(4, dim=-1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)  # (B, H)
                c_bn = self._bn_step(c_new, m, f"cell_l{k}", t, g("bn_cell_weight"), g("bn_cell_bias"))
                h_new = torch.sigmoid(o) * torch.tanh(c_bn)    # (B, H)
                if m is None:
                    h, c = h_new, c_new
                    outs.append(h_new)
                else:
                    h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                    outs.append(torch.where(m, h_new, torch.zeros_like(h_new)))
            layer_in = torch.stack(outs, 0)                    # (T, B, H)
            hs.append(h)
            cs.append(c)
        output, h_n, c_n = layer_in, torch.stack(hs, 0), torch.stack(cs, 0)
        if packed is not None:
            output = repack(output, lengths if lengths is not None else torch.full((B,), T), packed)
        elif not is_batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)
