r"""Layer-normalized LSTM and GRU with the API of ``nn.LSTM`` / ``nn.GRU``, and their cells.

- :class:`LayerNormLSTM`, :class:`LayerNormGRU`: whole sequences: ``num_layers``, ``bias``,
  ``batch_first``, ``dropout``, ``bidirectional``, ``proj_size`` (LSTM), unbatched input,
  ``PackedSequence``; parameter names of ``nn.LSTM`` plus the LN gains and shifts; keyword-only
  extras: ``cell_norm``, ``eps``, the regularizers (``input_dropout``, ``output_dropout``,
  ``recurrent_dropout``, ``zoneout``, ``zoneout_cell``) and ``backend``.
- :class:`LayerNormLSTMCell`, :class:`LayerNormGRUCell`: one step, the API of ``nn.LSTMCell`` /
  ``nn.GRUCell``.

Per layer and direction the input projection of all steps is one GEMM; the rest is one call of
:func:`~layernorm.rnn.lstm_recurrence` / :func:`~layernorm.rnn.gru_recurrence`. Equations and
where each option acts: ``docs/rnn.md``.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import reference
from .contract import GRUArgs, LSTMArgs, check_lengths
from .dispatch import check_backend
from .recurrence import _GRU, _LSTM, gru_recurrence, lstm_recurrence, resolved_backend

__all__ = ["LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]


# ---------------------------------------------------------------- argument checks (nn.RNNBase's texts)


def check_sizes(input_size, hidden_size, num_layers=1, dropout=0.0) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
            f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}"
        )
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if input_size <= 0:
        raise ValueError("input_size must be greater than zero")
    if hidden_size <= 0:
        raise ValueError("hidden_size must be greater than zero")
    if num_layers <= 0:
        raise ValueError("num_layers must be greater than zero")


def check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (float(eps) >= 0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, but got eps={eps!r}")
    return float(eps)


def _probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"{name} must be a number in [0, 1), but got {name}={p!r}")
    return float(p)


def check_input_tensor(input: Tensor, input_size: int, weight: Tensor) -> None:
    if input.size(-1) != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensor at {weight.device}"
        )
    if input.dtype != weight.dtype:
        raise ValueError(f"input must have the type {weight.dtype}, got type {input.dtype}")


def check_state(name: str, h: Tensor, expected: Tuple[int, ...], input: Tensor) -> None:
    if tuple(h.shape) != tuple(expected):
        raise RuntimeError(f"Expected {name} size {tuple(expected)}, got {list(h.shape)}")
    if h.dtype != input.dtype:
        raise ValueError(f"Expected {name} to have the input's dtype {input.dtype}, got {h.dtype}")
    if h.device != input.device:
        raise RuntimeError(f"Expected {name} on the input's device {input.device}, got {h.device}")


def unpack_input(input, batch_first: bool, name: str):
    """-> (x time-major (T, B, I), lengths int64 CPU (B,) or None, the PackedSequence or None, is_batched)."""
    if isinstance(input, PackedSequence):
        x, lengths = pad_packed_sequence(input, batch_first=False)  # original batch order
        return x, lengths.to(torch.int64), input, True
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
    if input.dim() not in (2, 3):
        raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
    is_batched = input.dim() == 3
    if not is_batched:
        x = input.unsqueeze(1)                                 # (L, 1, I)
    elif batch_first:
        x = input.transpose(0, 1)                              # (T, B, I)
    else:
        x = input
    if x.shape[0] == 0:
        raise ValueError(f"{name}: expected sequences of length >= 1, but got input of size {list(input.shape)} "
                         "with an empty time dimension")
    return x, None, None, is_batched


def repack(out: Tensor, lengths: Tensor, packed: PackedSequence) -> PackedSequence:
    """Padded time-major output in the original batch order -> a PackedSequence laid out like ``packed``."""
    if packed.sorted_indices is not None:
        out = out.index_select(1, packed.sorted_indices.to(out.device))  # (T, B, *) decreasing lengths
        lengths = lengths.index_select(0, packed.sorted_indices.cpu())
    data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


def tuple_state_error(hx, is_batched: bool) -> Optional[str]:
    """nn.LSTM's message for an ``hx`` that is not a pair of tensors (e.g. one tensor), or None."""
    if isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(s, Tensor) for s in hx):
        return None
    if isinstance(hx, Tensor):
        got = f"a single {hx.dim()}-D Tensor"
    elif isinstance(hx, (tuple, list)):
        got = f"a {type(hx).__name__} of {len(hx)} " + ", ".join(type(s).__name__ for s in hx)
    else:
        got = type(hx).__name__
    shape = "(D*num_layers, N, H_out) and (D*num_layers, N, H_cell)" if is_batched else "(D*num_layers, H_out) and (D*num_layers, H_cell)"
    return f"hx must be a tuple (h_0, c_0) of two tensors of sizes {shape}, but got {got}"


def locked_mask(p: float, shape: Tuple[int, ...], like: Tensor) -> Tensor:
    """Bernoulli(1 - p) / (1 - p) of ``shape``: one dropout mask shared by every time step."""
    return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(1 - p).div_(1 - p)


def zoneout_mask(p: float, shape: Tuple[int, ...], like: Tensor, training: bool) -> Tensor:
    """ζ of ``shape`` (T, B, *): Bernoulli(p) per step and unit in training (1 = keep the previous
    state), the expectation p in evaluation (Krueger et al., 2017)."""
    if training:
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(p)
    return torch.full(shape, p, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------- the layers


class _LNRNNBase(nn.Module):
    _mode = ""
    _gates = 0

    def __init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                 device, dtype, cell_norm, eps, input_dropout, output_dropout, recurrent_dropout, zoneout,
                 zoneout_cell, backend) -> None:
        super().__init__()
        check_sizes(input_size, hidden_size, num_layers, dropout)
        if isinstance(proj_size, bool) or not isinstance(proj_size, numbers.Integral) or proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        factory = {"device": device, "dtype": dtype}
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = int(proj_size)
        self.cell_norm = bool(cell_norm)
        self.eps = check_eps(eps)
        self.input_dropout = _probability("input_dropout", input_dropout)
        self.output_dropout = _probability("output_dropout", output_dropout)
        self.recurrent_dropout = _probability("recurrent_dropout", recurrent_dropout)
        self.zoneout = _probability("zoneout", zoneout)
        self.zoneout_cell = _probability("zoneout_cell", zoneout_cell)
        self.backend = check_backend(backend)
        gates, R = self._gates * hidden_size, self.proj_size or hidden_size
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else R * self.num_directions
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [(f"weight_ih{sfx}", (gates, layer_input)), (f"weight_hh{sfx}", (gates, R))]
                if bias:
                    shapes += [(f"bias_ih{sfx}", (gates,)), (f"bias_hh{sfx}", (gates,))]
                if self.proj_size:
                    shapes += [(f"weight_hr{sfx}", (self.proj_size, hidden_size))]
                shapes += [(f"ln_ih_weight{sfx}", (gates,)), (f"ln_hh_weight{sfx}", (gates,))]
                if self._mode == "LSTM" and cell_norm:
                    shapes += [(f"ln_cell_weight{sfx}", (hidden_size,)), (f"ln_cell_bias{sfx}", (hidden_size,))]
                for name, shape in shapes:
                    setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
                names = [n for n, _ in shapes]
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        """Weights and biases uniform(-1/sqrt(H), 1/sqrt(H)) as ``nn.LSTM``; LN gains 1, shifts 0."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            p = getattr(self, name)
            if name.startswith("ln_") and "_weight" in name:
                nn.init.ones_(p)
            elif name.startswith("ln_"):
                nn.init.zeros_(p)
            else:
                nn.init.uniform_(p, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """No-op, kept for ``nn.LSTM`` API compatibility (there is no cuDNN weight buffer)."""

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, n) for n in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, n) for n in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self._mode == "LSTM" and not self.cell_norm:
            s += ", cell_norm=False"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        for name in ("input_dropout", "output_dropout", "recurrent_dropout", "zoneout", "zoneout_cell"):
            if getattr(self, name) != 0:
                s += f", {name}={getattr(self, name)}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    def __setstate__(self, state):  # modules pickled before the regularizers existed
        super().__setstate__(state)
        for name in ("input_dropout", "output_dropout", "recurrent_dropout", "zoneout", "zoneout_cell"):
            self.__dict__.setdefault(name, 0.0)
        self.__dict__.setdefault("proj_size", 0)

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _prepare_hx(self, hx, x: Tensor, is_batched: bool) -> List[Tensor]:
        """User hx -> list of states (L*D, B, R) [, (L*D, B, H)], validated as nn.LSTM does."""
        B, LD, R = x.shape[1], self.num_layers * self.num_directions, self.proj_size or self.hidden_size
        lstm = self._mode == "LSTM"
        shapes = [(LD, B, R), (LD, B, self.hidden_size)] if lstm else [(LD, B, R)]
        if hx is None:
            return [x.new_zeros(s) for s in shapes]
        want = 3 if is_batched else 2
        kind = "batched 3-D" if is_batched else "unbatched 2-D"
        if lstm:
            msg = tuple_state_error(hx, is_batched)
            if msg is not None:
                raise TypeError(f"{self._name}: {msg}")
            states = list(hx)
            if any(s.dim() != want for s in states):
                raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                                   f"({states[0].dim()}-D, {states[1].dim()}-D) tensors")
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{self._name}: hx must be a Tensor, got {type(hx).__name__}")
            if hx.dim() != want:
                raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
            states = [hx]
        if not is_batched:
            states = [s.unsqueeze(1) for s in states]
        for k, (s, shape) in enumerate(zip(states, shapes)):
            check_state(f"hidden[{k}]" if lstm else "hidden", s, shape, x)
        return [s.contiguous() for s in states]

    def _run(self, input, hx):
        x, lengths, packed, is_batched = unpack_input(input, self.batch_first, self._name)
        check_input_tensor(x, self.input_size, self.weight_ih_l0)
        states = self._prepare_hx(hx, x, is_batched)           # each (L*D, B, *)
        T, B = x.shape[0], x.shape[1]
        lengths = check_lengths(lengths, T, B) if lengths is not None else None
        backend = resolved_backend(self.backend, x.device, x.dtype)
        project = _projection(backend, x)
        train = self.training
        layer_in = x
        if train and self.input_dropout > 0:
            layer_in = layer_in * locked_mask(self.input_dropout, (B, layer_in.shape[2]), x)
        finals: List[List[Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            if layer > 0 and train and self.input_dropout > 0:
                layer_in = layer_in * locked_mask(self.input_dropout, (B, layer_in.shape[2]), x)
            layer_in = layer_in.contiguous()
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                xin = layer_in if direction == 0 else reference.reverse_padded(layer_in, lengths)
                xw = project(xin, getattr(self, f"weight_ih{self._suffix(layer, direction)}"))  # (T, B, G*H)
                out, *fin = self._recurrence(backend, xw, lengths, [s[idx] for s in states], layer, direction)
                outs.append(out if direction == 0 else reference.reverse_padded(out, lengths))
                for k, f in enumerate(fin):
                    finals[k].append(f)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (T, B, D*R)
            if self.dropout > 0 and train and layer < self.num_layers - 1:
                layer_in = nn.functional.dropout(layer_in, self.dropout, True)
        output = layer_in
        if train and self.output_dropout > 0:
            output = output * locked_mask(self.output_dropout, (B, output.shape[2]), x)
        finals_t = [torch.stack(f, 0) for f in finals]         # each (L*D, B, *)
        if packed is not None:
            output = repack(output, lengths if lengths is not None else torch.full((B,), T), packed)
        elif not is_batched:
            output = output.squeeze(1)
            finals_t = [f.squeeze(1) for f in finals_t]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, finals_t

    @staticmethod
    def _suffix(layer: int, direction: int) -> str:
        return f"_l{layer}" + ("_reverse" if direction == 1 else "")

    def _regularizers(self, xw: Tensor, R: int, H: int, with_cell: bool):
        """recurrent_mask (B, R), zoneout_h (T, B, R), zoneout_c (T, B, H) for one layer and direction, or None."""
        T, B = xw.shape[0], xw.shape[1]
        rec = locked_mask(self.recurrent_dropout, (B, R), xw) if self.training and self.recurrent_dropout > 0 else None
        zh = zoneout_mask(self.zoneout, (T, B, R), xw, self.training) if self.zoneout > 0 else None
        zc = None
        if with_cell and self.zoneout_cell > 0:
            zc = zoneout_mask(self.zoneout_cell, (T, B, H), xw, self.training)
        return rec, zh, zc


def _projection(backend: str, x: Tensor):
    """x (T, B, I), w (G, I) -> x Wᵀ: through the extension's GEMM for the cpp backend in float32."""
    if backend == "cpp" and x.dtype == torch.float32 and not torch.compiler.is_compiling() and x.numel() > 0:
        from .impl_cpp import linear

        return linear
    return lambda x, w: torch.matmul(x, w.t())


class LayerNormLSTM(_LNRNNBase):
    r"""Layer-normalized LSTM (Ba, Kiros & Hinton, 2016) with the API of :class:`torch.nn.LSTM`.

    For each layer, at each step :math:`t`, with LN over the :math:`4H` gate pre-activations of a
    sample and gate order :math:`i, f, g, o` as in ``nn.LSTM``:

    .. math::
        \begin{aligned}
        (i, f, g, o) &= \mathrm{LN}(W_{ih} x_t; \gamma_{ih}) + \mathrm{LN}(W_{hh} h_{t-1}; \gamma_{hh})
                         + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{LN}(c_t; \gamma_c, \beta_c)) \qquad
               (\text{with } \texttt{proj\_size}:\ h_t = W_{hr}(\sigma(o) \odot \tanh(\mathrm{LN}(c_t))))
        \end{aligned}

    :math:`c_t` is carried unnormalized; ``cell_norm=False`` uses :math:`\tanh(c_t)`. With
    ``proj_size`` = P > 0 (LSTMP, as ``nn.LSTM``) the state fed back and returned is the projection
    :math:`h_t` (P units); the LNs stay where they are (over the 4H gates and over :math:`c_t`) and
    the projection itself is not normalized. Gains start at 1, shifts at 0; weights and biases
    uniform :math:`(-1/\sqrt{H}, 1/\sqrt{H})` like ``nn.LSTM``, whose weights load by name.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype: as ``nn.LSTM`` (same positions).
        cell_norm: normalize :math:`c_t` before the output tanh. Default: True.
        eps: added to the variance in every LN. Default: 1e-5.
        input_dropout: variational (locked) dropout on every layer's input: one mask per sequence
            and feature, the same at every step (Gal & Ghahramani, 2016). Default: 0.
        output_dropout: locked dropout on the output sequence (the last layer's). Default: 0.
        recurrent_dropout: locked dropout on :math:`h_{t-1}` where it enters :math:`W_{hh}`
            (Gal & Ghahramani's recurrent dropout; the carried state is not dropped). Default: 0.
        zoneout: probability that a unit of :math:`h` keeps its previous value at a step
            (Krueger et al., 2017); evaluation uses the expectation. Default: 0.
        zoneout_cell: the same for the cell state :math:`c`. Default: 0.
        backend: ``"reference"``, ``"torch"``, ``"cpp"``, ``"triton"`` or None/``"auto"``
            (:mod:`layernorm.rnn.dispatch`). Default: None.

    All regularizers act in training mode only (zoneout's expectation in evaluation); ``dropout`` is
    ``nn.LSTM``'s (a new mask per element, between layers).

    Inputs: ``input, (h_0, c_0)`` exactly as ``nn.LSTM``: (L, N, H_in), (N, L, H_in) with
    ``batch_first``, unbatched (L, H_in), or a ``PackedSequence``; h_0 (D*num_layers, N, P or H),
    c_0 (D*num_layers, N, H).

    Outputs: ``output, (h_n, c_n)``. With a ``PackedSequence``, ``h_n``/``c_n`` hold each sequence's
    state after its own last element (the backward direction starts at that element).

    Example::

        >>> rnn = LayerNormLSTM(10, 20, num_layers=2, proj_size=8)
        >>> output, (hn, cn) = rnn(torch.randn(5, 3, 10))
        >>> output.shape, hn.shape, cn.shape
        (torch.Size([5, 3, 8]), torch.Size([2, 3, 8]), torch.Size([2, 3, 20]))
    """

    _mode = "LSTM"
    _gates = 4

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, cell_norm: bool = True, eps: float = 1e-5, input_dropout: float = 0.0,
                 output_dropout: float = 0.0, recurrent_dropout: float = 0.0, zoneout: float = 0.0,
                 zoneout_cell: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
                         device, dtype, cell_norm, eps, input_dropout, output_dropout, recurrent_dropout, zoneout,
                         zoneout_cell, backend)

    def _recurrence(self, backend, xw, lengths, state, layer, direction):
        sfx = self._suffix(layer, direction)
        g = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        H = self.hidden_size
        rec, zh, zc = self._regularizers(xw, self.proj_size or H, H, True)
        bias = g("bias_ih") + g("bias_hh") if self.bias else None
        args = LSTMArgs(xw, lengths, state[0], state[1], g("weight_hh"), g("ln_hh_weight"), bias, g("ln_ih_weight"),
                        g("ln_cell_weight"), g("ln_cell_bias"), g("weight_hr"), rec, zh, zc, self.eps)
        return _run_lstm(backend, args)

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)


class LayerNormGRU(_LNRNNBase):
    r"""Layer-normalized GRU (Ba, Kiros & Hinton, 2016) with the API of :class:`torch.nn.GRU`.

    Weights are stored as in ``nn.GRU`` ((3H, in), gate order r, z (= the paper's u), n). LN runs
    over the 2H block of r and u, and separately over the H block of the candidate:

    .. math::
        \begin{aligned}
        (r, u) &= \sigma(\mathrm{LN}(W_{ih}^{ru} x_t) + \mathrm{LN}(W_{hh}^{ru} h_{t-1}) + b_{ih}^{ru} + b_{hh}^{ru}) \\
        n &= \tanh(\mathrm{LN}(W_{ih}^{n} x_t) + b_{ih}^{n} + r \odot (\mathrm{LN}(W_{hh}^{n} h_{t-1}) + b_{hh}^{n})) \\
        h_t &= u \odot h_{t-1} + (1 - u) \odot n
        \end{aligned}

    With every LN replaced by the identity this is exactly ``nn.GRU``. Arguments, inputs and
    outputs are those of :class:`LayerNormLSTM` without the cell state (``output, h_n``), without
    ``proj_size``, ``cell_norm`` and ``zoneout_cell``. Parameters: ``weight_ih_lk``,
    ``weight_hh_lk``, ``bias_ih_lk``, ``bias_hh_lk``, ``ln_ih_weight_lk``, ``ln_hh_weight_lk`` (3H).

    Example::

        >>> rnn = LayerNormGRU(10, 20, batch_first=True, recurrent_dropout=0.25)
        >>> output, hn = rnn(torch.randn(3, 5, 10))
    """

    _mode = "GRU"
    _gates = 3

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None, *, eps: float = 1e-5, input_dropout: float = 0.0, output_dropout: float = 0.0,
                 recurrent_dropout: float = 0.0, zoneout: float = 0.0, backend: Optional[str] = None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, 0, device,
                         dtype, False, eps, input_dropout, output_dropout, recurrent_dropout, zoneout, 0.0, backend)

    def _recurrence(self, backend, xw, lengths, state, layer, direction):
        sfx = self._suffix(layer, direction)
        g = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        rec, zh, _ = self._regularizers(xw, self.hidden_size, self.hidden_size, False)
        args = GRUArgs(xw, lengths, state[0], g("weight_hh"), g("ln_hh_weight"), g("bias_ih"), g("bias_hh"),
                       g("ln_ih_weight"), rec, zh, self.eps)
        return _run_gru(backend, args)

    def forward(self, input, hx: Optional[Tensor] = None):
        output, (h_n,) = self._run(input, hx)
        return output, h_n


def _run_lstm(backend: str, a: LSTMArgs):
    """lstm_recurrence for arguments the module built itself (valid and contiguous by construction)."""
    if backend == "reference" or torch.compiler.is_compiling():
        return lstm_recurrence(*a[:10], w_hr=a.w_hr, recurrent_mask=a.recurrent_mask, zoneout_h=a.zoneout_h,
                               zoneout_c=a.zoneout_c, eps=a.eps, backend=backend)
    from .dispatch import implementation

    impl = implementation(backend)
    if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in a)):
        with torch.no_grad():
            res = impl.lstm_forward(a, False)
        return res[0], res[1], res[2]
    return _LSTM.apply(impl, a.lengths, a.eps, a.xw, *a[2:14])


def _run_gru(backend: str, a: GRUArgs):
    if backend == "reference" or torch.compiler.is_compiling():
        return gru_recurrence(*a[:8], recurrent_mask=a.recurrent_mask, zoneout_h=a.zoneout_h, eps=a.eps,
                              backend=backend)
    from .dispatch import implementation

    impl = implementation(backend)
    if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in a)):
        with torch.no_grad():
            res = impl.gru_forward(a, False)
        return res[0], res[1]
    return _GRU.apply(impl, a.lengths, a.eps, a.xw, *a[2:10])


# ---------------------------------------------------------------- cells


class _LNCellBase(nn.Module):
    def __init__(self, input_size, hidden_size, bias, device, dtype, gates, cell_norm, eps) -> None:
        super().__init__()
        check_sizes(input_size, hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.bias = bool(bias)
        self.eps = check_eps(eps)
        G = gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(G, **factory))
            self.bias_hh = nn.Parameter(torch.empty(G, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.ln_ih_weight = nn.Parameter(torch.empty(G, **factory))
        self.ln_hh_weight = nn.Parameter(torch.empty(G, **factory))
        if cell_norm:
            self.ln_cell_weight = nn.Parameter(torch.empty(hidden_size, **factory))
            self.ln_cell_bias = nn.Parameter(torch.empty(hidden_size, **factory))
        else:
            self.register_parameter("ln_cell_weight", None)
            self.register_parameter("ln_cell_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights and biases uniform(-1/sqrt(H), 1/sqrt(H)) as ``nn.LSTMCell``; LN gains 1, shifts 0."""
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith("ln_"):
                (nn.init.ones_ if "weight" in name else nn.init.zeros_)(p)
            else:
                nn.init.uniform_(p, -stdv, stdv)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if getattr(self, "cell_norm", True) is False:
            s += ", cell_norm=False"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        return s

    def _prepare(self, input: Tensor, hx, n_states: int):
        name = type(self).__name__
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        check_input_tensor(input, self.input_size, self.weight_ih)
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)        # (B, I)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            return x, [x.new_zeros(shape) for _ in range(n_states)], is_batched
        if n_states == 2:
            msg = tuple_state_error(hx, is_batched)
            if msg is not None:
                raise TypeError(f"{name}: {msg.replace('D*num_layers, ', '')}")
            states = list(hx)
        else:
            if not isinstance(hx, Tensor):
                raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
            states = [hx]
        want = 2 if is_batched else 1
        for k, s in enumerate(states):
            if s.dim() != want:
                raise RuntimeError(
                    f"{name}: Expected hidden[{k}] to be {want}-D for {input.dim()}-D input, but got {s.dim()}-D")
        states = [s if is_batched else s.unsqueeze(0) for s in states]
        for k, s in enumerate(states):
            check_state(f"hidden[{k}]" if n_states == 2 else "hidden", s, shape, x)
        return x, states, is_batched


class LayerNormLSTMCell(_LNCellBase):
    r"""One step of the layer-normalized LSTM, the API of :class:`torch.nn.LSTMCell`.

    .. math::
        \begin{aligned}
        (i, f, g, o) &= \mathrm{LN}(W_{ih} x; \gamma_{ih}) + \mathrm{LN}(W_{hh} h; \gamma_{hh}) + b_{ih} + b_{hh} \\
        c' &= \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \qquad
        h' = \sigma(o) \odot \tanh(\mathrm{LN}(c'; \gamma_c, \beta_c))
        \end{aligned}

    Inputs: ``input`` (N, input_size) or (input_size,); ``hx = (h, c)`` each (N, H) or (H,), zeros
    if None. Outputs: ``(h', c')``, ``c'`` unnormalized. ``cell_norm`` and ``eps`` as
    :class:`LayerNormLSTM` (keyword-only).

    Example::

        >>> cell = LayerNormLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 cell_norm: bool = True, eps: float = 1e-5) -> None:
        self.cell_norm = bool(cell_norm)
        super().__init__(input_size, hidden_size, bias, device, dtype, 4, cell_norm, eps)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        x, (h, c), is_batched = self._prepare(input, hx, 2)
        x_ln = reference.input_layer_norm(x @ self.weight_ih.t(), self.ln_ih_weight, [4 * self.hidden_size],
                                          self.eps)
        bias = self.bias_ih + self.bias_hh if self.bias else None
        h1, c1 = reference.lstm_cell(x_ln, h, c, self.weight_hh, self.ln_hh_weight, bias, self.ln_cell_weight,
                                     self.ln_cell_bias, None, None, self.eps)
        return (h1, c1) if is_batched else (h1.squeeze(0), c1.squeeze(0))


class LayerNormGRUCell(_LNCellBase):
    r"""One step of the layer-normalized GRU, the API of :class:`torch.nn.GRUCell`.

    See :class:`LayerNormGRU` for the equations (LN over the r/u block and over the candidate block).

    Example::

        >>> cell = LayerNormGRUCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 eps: float = 1e-5) -> None:
        super().__init__(input_size, hidden_size, bias, device, dtype, 3, False, eps)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = self._prepare(input, hx, 1)
        H = self.hidden_size
        x_ln = reference.input_layer_norm(x @ self.weight_ih.t(), self.ln_ih_weight, [2 * H, H], self.eps)
        h1 = reference.gru_cell(x_ln, h, self.weight_hh, self.ln_hh_weight, self.bias_ih, self.bias_hh, None,
                                self.eps)
        return h1 if is_batched else h1.squeeze(0)
