r"""Layer-normalized recurrent layers with ``nn.LSTM``'s API, and the recurrent BatchNorm baseline.

- :class:`LayerNormLSTMCell`, :class:`LayerNormGRUCell`: one step, the API of ``nn.LSTMCell`` /
  ``nn.GRUCell``.
- :class:`LayerNormLSTM`, :class:`LayerNormGRU`: whole sequences, the API of ``nn.LSTM`` / ``nn.GRU``
  (``num_layers``, ``bidirectional``, ``batch_first``, inter-layer ``dropout``, unbatched input,
  ``PackedSequence``), parameter names of ``nn.LSTM`` plus the layer-norm gains and shifts.
- :class:`BatchNormLSTM`: Cooijmans et al. (2016), statistics per time step.

Equations: ``docs/rnn.md``. How a layer runs: per layer and direction the input projection of all
steps is one GEMM plus one batched layer norm; the sequential rest is the *recurrence*, a function
of the interface documented in :mod:`layernorm.nn.rnn_reference`. ``backend="reference"`` runs the
reference recurrence (a Python loop, autograd backward); the default uses the fast path
``layernorm.nn.rnn_fast`` when it is importable, else the reference.
"""
from __future__ import annotations

import importlib
import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .. import functional as LF
from . import rnn_reference
from .rnn_reference import reverse_padded

__all__ = [
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
    "LayerNormLSTM",
    "LayerNormGRU",
    "BatchNormLSTM",
    "reverse_padded",
    "recurrence_backend",
]

_RNN_BACKENDS = ("reference", "fast", "auto")


def _check_rnn_backend(backend: Optional[str]) -> Optional[str]:
    if backend is not None and backend not in _RNN_BACKENDS:
        raise ValueError(f"backend must be one of {list(_RNN_BACKENDS)} or None, but got backend={backend!r}")
    return backend


def recurrence_backend(backend: Optional[str] = None):
    """The module providing ``lstm_recurrence`` / ``gru_recurrence`` for ``backend``.

    ``"reference"`` -> :mod:`layernorm.nn.rnn_reference`; ``"fast"`` -> ``layernorm.nn.rnn_fast``
    (error if it cannot be imported); None / ``"auto"`` -> the fast path if importable, else the
    reference.
    """
    _check_rnn_backend(backend)
    if backend == "reference":
        return rnn_reference
    fast, why = _load_fast()
    if fast is None:
        if backend == "fast":
            raise RuntimeError(f"backend='fast' is not available: {why}")
        return rnn_reference
    return fast


_FAST: list = []  # [(module or None, why)] once loaded; a plain list, which torch.compile traces as a constant


def _load_fast():
    """Import the fast recurrence once (a failed import is not retried at every forward)."""
    if not _FAST:
        try:
            _FAST.append((importlib.import_module("layernorm.nn.rnn_fast"), ""))
        except ImportError as exc:
            _FAST.append((None, f"{type(exc).__name__}: {exc}"))
    return _FAST[0]


def _check_sizes(input_size, hidden_size, num_layers=1, dropout=0.0) -> None:
    """The checks (and texts) of ``nn.RNNBase.__init__``."""
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


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (float(eps) >= 0) or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, but got eps={eps!r}")
    return float(eps)


def _check_input_tensor(input: Tensor, input_size: int, weight: Tensor) -> None:
    if input.size(-1) != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {input.size(-1)}")
    if input.device != weight.device:
        raise RuntimeError(
            "Input and parameter tensors are not at the same device, found input tensor at "
            f"{input.device} and parameter tensor at {weight.device}"
        )
    if input.dtype != weight.dtype:
        raise ValueError(f"input must have the type {weight.dtype}, got type {input.dtype}")


def _check_state(name: str, h: Tensor, expected: Tuple[int, ...], input: Tensor) -> None:
    if tuple(h.shape) != tuple(expected):
        raise RuntimeError(f"Expected {name} size {tuple(expected)}, got {list(h.shape)}")
    if h.dtype != input.dtype:
        raise ValueError(f"Expected {name} to have the input's dtype {input.dtype}, got {h.dtype}")
    if h.device != input.device:
        raise RuntimeError(f"Expected {name} on the input's device {input.device}, got {h.device}")


def _ln_blocks(xw: Tensor, gain: Tensor, blocks: List[int], eps: float, ln_backend=None) -> Tensor:
    """LN over each block of the gate axis (gain ``gain``, no shift); (..., sum(blocks)) contiguous.

    One batched layer_norm call per block: the LSTM has one block of 4H; the GRU has 2H for r/u and
    H for the candidate. Also the input LN of the fast recurrences that do not fuse it."""
    if len(blocks) == 1:
        return LF.layer_norm(xw, (blocks[0],), gain, None, eps, backend=ln_backend).contiguous()
    parts, start = [], 0
    for size in blocks:
        part = xw[..., start:start + size]
        parts.append(LF.layer_norm(part, (size,), gain[start:start + size], None, eps, backend=ln_backend))
        start += size
    return torch.cat(parts, dim=-1)


def _project(x: Tensor, w_ih: Tensor, gain: Tensor, blocks: List[int], eps: float, ln_backend) -> Tensor:
    """xw = x W_ih^T for all steps in one GEMM, then :func:`_ln_blocks`. x: (T, B, I) -> (T, B, sum(blocks))."""
    return _ln_blocks(torch.matmul(x, w_ih.t()), gain, blocks, eps, ln_backend)   # (T, B, G*H)


def _unpack_input(input, batch_first: bool, name: str):
    """-> (x time-major (T, B, I), lengths int64 CPU (B,) or None, packed or None, is_batched)."""
    if isinstance(input, PackedSequence):
        x, lengths = pad_packed_sequence(input, batch_first=False)  # original batch order
        if lengths.numel() and int(lengths.min()) < 1:
            raise ValueError(f"{name}: every sequence must have length >= 1, but got lengths {lengths.tolist()}")
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
        raise ValueError(
            f"{name}: expected sequences of length >= 1, but got input of size {list(input.shape)} "
            "with an empty time dimension"
        )
    return x, None, None, is_batched


def _repack(out: Tensor, lengths: Tensor, packed: PackedSequence) -> PackedSequence:
    """Padded time-major output in original batch order -> PackedSequence laid out like ``packed``."""
    if packed.sorted_indices is not None:
        idx = packed.sorted_indices.to(out.device)
        out = out.index_select(1, idx)                         # (T, B, *) in decreasing-length order
        lengths = lengths.index_select(0, packed.sorted_indices.cpu())
    data = pack_padded_sequence(out, lengths, enforce_sorted=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)


class _LNRNNBase(nn.Module):
    _mode = ""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        cell_norm: bool = True,
        eps: float = 1e-5,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size, num_layers, dropout)
        factory = {"device": device, "dtype": dtype}
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.cell_norm = bool(cell_norm)
        self.eps = _check_eps(eps)
        self.backend = _check_rnn_backend(backend)
        if self.backend != "reference":
            _load_fast()  # import it now: torch.compile cannot trace the import inside forward
        self.proj_size = 0  # nn.LSTM attribute some user code reads; projections are not supported
        gates = self._gates * hidden_size
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [(f"weight_ih{sfx}", (gates, layer_input)), (f"weight_hh{sfx}", (gates, hidden_size))]
                if bias:
                    shapes += [(f"bias_ih{sfx}", (gates,)), (f"bias_hh{sfx}", (gates,))]
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
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    def _params(self, layer: int, direction: int) -> dict:
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda n: getattr(self, n + sfx, None)  # noqa: E731
        return {k: get(k) for k in (
            "weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight", "ln_hh_weight",
            "ln_cell_weight", "ln_cell_bias",
        )}

    def _prepare_hx(self, hx, x: Tensor, is_batched: bool, n_states: int) -> List[Tensor]:
        """User hx -> list of n_states tensors (L*D, B, H), validated."""
        B = x.shape[1]
        shape = (self.num_layers * self.num_directions, B, self.hidden_size)
        if hx is None:
            return [x.new_zeros(shape) for _ in range(n_states)]
        states = list(hx) if n_states == 2 else [hx]
        if n_states == 2 and (len(states) != 2 or not all(isinstance(s, Tensor) for s in states)):
            raise TypeError(f"{self._name}: hx must be a tuple (h_0, c_0) of two tensors")
        if n_states == 1 and not isinstance(hx, Tensor):
            raise TypeError(f"{self._name}: hx must be a Tensor, got {type(hx).__name__}")
        want = 3 if is_batched else 2
        if any(s.dim() != want for s in states):
            dims = ", ".join(f"{s.dim()}-D" for s in states)
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            what = "hx and cx" if n_states == 2 else "hx"
            got = f"({dims}) tensors" if n_states == 2 else f"{dims} tensor"
            raise RuntimeError(f"For {kind} input, {what} should also be {want}-D but got {got}")
        if not is_batched:
            states = [s.unsqueeze(1) for s in states]
        for k, s in enumerate(states):
            _check_state(f"hidden[{k}]" if n_states == 2 else "hidden", s, shape, x)
        return states

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _run(self, input, hx, n_states: int):
        x, lengths, packed, is_batched = _unpack_input(input, self.batch_first, self._name)
        _check_input_tensor(x, self.input_size, self.weight_ih_l0)
        states = self._prepare_hx(hx, x, is_batched, n_states)  # each (L*D, B, H)
        T = x.shape[0]
        # all full length: the recurrence may skip masking
        run_lengths = None if lengths is None or bool((lengths == T).all()) else lengths
        fns = recurrence_backend(self.backend)
        ln_backend = "reference" if self.backend == "reference" else None
        finals: List[List[Tensor]] = [[] for _ in range(n_states)]
        layer_in = x.contiguous()
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                idx = layer * self.num_directions + direction
                p = self._params(layer, direction)
                xin = layer_in if direction == 0 else reverse_padded(layer_in, run_lengths)
                state = [s[idx] for s in states]
                if fns is rnn_reference:
                    xw_ln = _project(xin, p["weight_ih"], p["ln_ih_weight"], self._blocks, self.eps, ln_backend)
                    out, *fin = self._recurrence(fns, xw_ln.contiguous(), run_lengths, state, p)
                else:  # the fast recurrence normalizes the projection itself (in its time loop, for C++)
                    xw = fns.input_projection(xin, p["weight_ih"])  # (T, B, G*H)
                    out, *fin = self._recurrence(fns, xw, run_lengths, state, p, ln_ih_weight=p["ln_ih_weight"])
                if direction == 1:
                    out = reverse_padded(out, run_lengths)
                outs.append(out)
                for k in range(n_states):
                    finals[k].append(fin[k])
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (T, B, D*H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = nn.functional.dropout(layer_in, self.dropout, True)
        output = layer_in
        finals_t = [torch.stack(f, 0) for f in finals]         # each (L*D, B, H)
        if packed is not None:
            output = _repack(output, lengths, packed)
        elif not is_batched:
            output = output.squeeze(1)
            finals_t = [f.squeeze(1) for f in finals_t]
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, finals_t


class LayerNormLSTM(_LNRNNBase):
    r"""Layer-normalized LSTM (Ba, Kiros & Hinton, 2016) with the API of :class:`torch.nn.LSTM`.

    For each layer, at each step :math:`t`, with LN over the :math:`4H` gate pre-activations of a
    sample and gate order :math:`i, f, g, o` as in ``nn.LSTM``:

    .. math::
        \begin{aligned}
        (i, f, g, o) &= \mathrm{LN}(W_{ih} x_t; \gamma_{ih}) + \mathrm{LN}(W_{hh} h_{t-1}; \gamma_{hh})
                         + b_{ih} + b_{hh} \\
        c_t &= \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g) \\
        h_t &= \sigma(o) \odot \tanh(\mathrm{LN}(c_t; \gamma_c, \beta_c))
        \end{aligned}

    :math:`c_t` is carried unnormalized; ``cell_norm=False`` uses :math:`\tanh(c_t)`. Gains start at
    1, shifts at 0; weights and biases uniform :math:`(-1/\sqrt{H}, 1/\sqrt{H})` like ``nn.LSTM``, so
    weights copied from an ``nn.LSTM`` keep their names.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional: as ``nn.LSTM``
            (``proj_size`` is not supported).
        cell_norm: normalize :math:`c_t` before the output tanh. Default: True.
        eps: added to the variance in every LN. Default: 1e-5.
        backend: ``"reference"`` (Python loop, autograd backward), ``"fast"``, or None/``"auto"``:
            the fast recurrence when available, else the reference.

    Parameters (``k`` = layer, ``_reverse`` suffix for the backward direction): ``weight_ih_lk``
    (4H, in), ``weight_hh_lk`` (4H, H), ``bias_ih_lk``, ``bias_hh_lk`` (4H), ``ln_ih_weight_lk``,
    ``ln_hh_weight_lk`` (4H), ``ln_cell_weight_lk``, ``ln_cell_bias_lk`` (H).

    Inputs: ``input, (h_0, c_0)`` exactly as ``nn.LSTM``: (L, N, H_in), (N, L, H_in) with
    ``batch_first``, unbatched (L, H_in), or a ``PackedSequence``; states (D*num_layers, N, H).

    Outputs: ``output, (h_n, c_n)``. With a ``PackedSequence``, ``h_n``/``c_n`` hold each sequence's
    state after its own last element (the backward direction starts at that element).

    Example::

        >>> rnn = LayerNormLSTM(10, 20, num_layers=2)
        >>> output, (hn, cn) = rnn(torch.randn(5, 3, 10))
        >>> output.shape, hn.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    _mode = "LSTM"
    _gates = 4

    @property
    def _blocks(self) -> List[int]:
        return [4 * self.hidden_size]

    def _recurrence(self, fns, xw_ln, lengths, state, p, **kw):
        h0, c0 = state
        bias = p["bias_ih"] + p["bias_hh"] if self.bias else None
        return fns.lstm_recurrence(
            xw_ln, lengths, h0, c0, p["weight_hh"], p["ln_hh_weight"], bias,
            p["ln_cell_weight"], p["ln_cell_bias"], self.eps, self.cell_norm, **kw,
        )

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        output, (h_n, c_n) = self._run(input, hx, 2)
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
    outputs are those of :class:`LayerNormLSTM` without the cell state (``output, h_n``) and
    without ``cell_norm``. Parameters: ``weight_ih_lk``, ``weight_hh_lk``, ``bias_ih_lk``,
    ``bias_hh_lk``, ``ln_ih_weight_lk``, ``ln_hh_weight_lk`` (3H each).

    Example::

        >>> rnn = LayerNormGRU(10, 20, batch_first=True)
        >>> output, hn = rnn(torch.randn(3, 5, 10))
    """

    _mode = "GRU"
    _gates = 3

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, eps=1e-5, device=None, dtype=None, backend=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         False, eps, device, dtype, backend)

    @property
    def _blocks(self) -> List[int]:
        return [2 * self.hidden_size, self.hidden_size]

    def _recurrence(self, fns, xw_ln, lengths, state, p, **kw):
        (h0,) = state
        return fns.gru_recurrence(
            xw_ln, lengths, h0, p["weight_hh"], p["ln_hh_weight"], p["bias_ih"], p["bias_hh"], self.eps, **kw
        )

    def forward(self, input, hx: Optional[Tensor] = None):
        output, (h_n,) = self._run(input, hx, 1)
        return output, h_n


class _LNCellBase(nn.Module):
    def __init__(self, input_size, hidden_size, bias, eps, device, dtype, gates, cell_norm) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        factory = {"device": device, "dtype": dtype}
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.bias = bool(bias)
        self.eps = _check_eps(eps)
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
        _check_input_tensor(input, self.input_size, self.weight_ih)
        is_batched = input.dim() == 2
        x = input if is_batched else input.unsqueeze(0)        # (B, I)
        shape = (x.shape[0], self.hidden_size)
        if hx is None:
            states = [x.new_zeros(shape) for _ in range(n_states)]
        else:
            states = list(hx) if n_states == 2 else [hx]
            if n_states == 2 and len(states) != 2:
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0) of two tensors")
            want = 2 if is_batched else 1
            for k, s in enumerate(states):
                if s.dim() != want:
                    raise RuntimeError(
                        f"{name}: Expected hidden[{k}] to be {want}-D for {input.dim()}-D input, but got {s.dim()}-D"
                    )
            states = [s if is_batched else s.unsqueeze(0) for s in states]
            for k, s in enumerate(states):
                _check_state(f"hidden[{k}]" if n_states == 2 else "hidden", s, shape, x)
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
    if None. Outputs: ``(h', c')``, ``c'`` unnormalized.

    Example::

        >>> cell = LayerNormLSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, cell_norm: bool = True,
                 eps: float = 1e-5, device=None, dtype=None) -> None:
        self.cell_norm = bool(cell_norm)
        super().__init__(input_size, hidden_size, bias, eps, device, dtype, 4, cell_norm)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        x, (h, c), is_batched = self._prepare(input, hx, 2)
        H = self.hidden_size
        xw_ln = LF.layer_norm(x @ self.weight_ih.t(), (4 * H,), self.ln_ih_weight, None, self.eps)  # (B, 4H)
        bias = self.bias_ih + self.bias_hh if self.bias else None
        h1, c1 = rnn_reference.lstm_cell_step(
            xw_ln, h, c, self.weight_hh, self.ln_hh_weight, bias, self.ln_cell_weight, self.ln_cell_bias,
            self.eps, self.cell_norm,
        )
        if not is_batched:
            h1, c1 = h1.squeeze(0), c1.squeeze(0)
        return h1, c1


class LayerNormGRUCell(_LNCellBase):
    r"""One step of the layer-normalized GRU, the API of :class:`torch.nn.GRUCell`.

    See :class:`LayerNormGRU` for the equations (LN over the r/u block and over the candidate block).

    Example::

        >>> cell = LayerNormGRUCell(10, 20)
        >>> h = cell(torch.randn(3, 10))
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, bias, eps, device, dtype, 3, False)

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), is_batched = self._prepare(input, hx, 1)
        H = self.hidden_size
        xw_ln = _project(x, self.weight_ih, self.ln_ih_weight, [2 * H, H], self.eps, None)  # (B, 3H)
        h1 = rnn_reference.gru_cell_step(xw_ln, h, self.weight_hh, self.ln_hh_weight, self.bias_ih,
                                         self.bias_hh, self.eps)
        return h1 if is_batched else h1.squeeze(0)


# ----------------------------------------------------------------------------------------------
# Recurrent batch normalization (Cooijmans et al., 2016)
# ----------------------------------------------------------------------------------------------


def _masked_moments(x: Tensor, mask: Optional[Tensor], dim: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Mean, biased variance and count of x over ``dim``, counting only entries where mask is True.

    x: (..., B, C) with the batch at ``dim``; mask broadcastable to x (bool) or None.
    """
    if mask is None:
        n = torch.full((), x.shape[dim], dtype=x.dtype, device=x.device)
        mean = x.mean(dim=dim, keepdim=True)
        var = (x - mean).square().mean(dim=dim, keepdim=True)
        return mean, var, n
    m = mask.to(x.dtype)
    n = m.sum(dim=dim, keepdim=True)                           # rows counted
    mean = (x * m).sum(dim=dim, keepdim=True) / n
    var = ((x - mean).square() * m).sum(dim=dim, keepdim=True) / n
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

    Unidirectional only, no inter-layer dropout (the paper uses neither). Running statistics are
    buffers ``running_mean_{ih,hh,cell}_lk``, ``running_var_{ih,hh,cell}_lk`` of shape
    (max_length, features), so ``state_dict`` holds them. The running variance is updated with the
    unbiased batch variance, as ``nn.BatchNorm1d`` does (a step with one running sequence uses the
    biased one, i.e. 0).

    Args:
        input_size, hidden_size, num_layers, batch_first, bias: as ``nn.LSTM``.
        max_length: number of time steps with their own statistics. Default: 100.
        momentum: running statistic update ``r = (1 - momentum) r + momentum * batch``. Default: 0.1.
        eps: added to the variance. Default: 1e-5.

    Inputs: ``input, hx=None, lengths=None``: input as ``nn.LSTM`` (padded tensor or
    ``PackedSequence``); ``lengths`` (N,) marks the real steps of a padded batch.

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
        _check_sizes(input_size, hidden_size, num_layers)
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
        self.eps = _check_eps(eps)
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

    def _update_running(self, name: str, slot, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """running[slot] <- (1 - momentum) running[slot] + momentum * batch (unbiased var)."""
        with torch.no_grad():
            unbiased = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
            rm, rv = getattr(self, f"running_mean_{name}"), getattr(self, f"running_var_{name}")
            rm[slot].lerp_(mean.detach().to(rm.dtype), self.momentum)
            rv[slot].lerp_(unbiased.detach().to(rv.dtype), self.momentum)

    def _bn_step(self, x: Tensor, mask: Optional[Tensor], name: str, t: int, weight, bias) -> Tensor:
        """BN of one step x (B, C) over the batch rows where mask (B, 1) is True."""
        slot = min(t, self.max_length - 1)
        if self.training:
            mean, var, n = _masked_moments(x, mask, dim=0)     # (1, C), (1, C), count
            if t < self.max_length:
                self._update_running(name, slot, mean[0], var[0], n.reshape(-1)[0])
        else:
            mean = getattr(self, f"running_mean_{name}")[slot]
            var = getattr(self, f"running_var_{name}")[slot]
        y = (x - mean) * torch.rsqrt(var + self.eps) * weight  # (B, C)
        return y if bias is None else y + bias

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None):
        name = type(self).__name__
        x, packed_lengths, packed, is_batched = _unpack_input(input, self.batch_first, name)
        if packed is not None:
            if lengths is not None:
                raise ValueError(f"{name}: pass lengths only with a padded tensor, not with a PackedSequence")
            lengths = packed_lengths
        elif lengths is not None:
            lengths = torch.as_tensor(lengths, dtype=torch.int64).cpu()
            if lengths.shape != (x.shape[1],):
                raise ValueError(f"{name}: lengths must have shape ({x.shape[1]},), got {tuple(lengths.shape)}")
            if int(lengths.min()) < 1 or int(lengths.max()) > x.shape[0]:
                raise ValueError(f"{name}: lengths must be in [1, {x.shape[0]}], got {lengths.tolist()}")
        _check_input_tensor(x, self.input_size, self.weight_ih_l0)
        T, B, H = x.shape[0], x.shape[1], self.hidden_size
        shape = (self.num_layers, B, H)
        if hx is None:
            h0s = c0s = x.new_zeros(shape)
        else:
            h0s, c0s = hx
            if not is_batched:
                h0s, c0s = h0s.unsqueeze(1), c0s.unsqueeze(1)
            _check_state("hidden[0]", h0s, shape, x)
            _check_state("hidden[1]", c0s, shape, x)
        mask = rnn_reference.step_mask(lengths, T, x.device)   # (T, B, 1) or None
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
            output = _repack(output, lengths, packed)
        elif not is_batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)
