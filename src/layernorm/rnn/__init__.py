"""Layer-normalized recurrent layers: LN-LSTM (with LSTMP), LN-GRU, their cells, and the BatchNorm baseline.

Modules (``nn.LSTM`` / ``nn.GRU`` API): :class:`LayerNormLSTM`, :class:`LayerNormGRU`,
:class:`LayerNormLSTMCell`, :class:`LayerNormGRUCell`, :class:`BatchNormLSTM`.

Functions (one layer and direction, any backend): :func:`lstm_recurrence`, :func:`gru_recurrence`;
:func:`resolved_backend` says which implementation ``backend=`` picks.

Layout of the package (one job per file):

- :mod:`~layernorm.rnn.reference`: the reference loop, the spec (equations written once);
- :mod:`~layernorm.rnn.contract`: arguments, lengths, saved tensors and gradients of every implementation;
- :mod:`~layernorm.rnn.dispatch`: ``backend=`` and ``$LAYERNORM_RNN_BACKEND``;
- :mod:`~layernorm.rnn.impl_torch`, :mod:`~layernorm.rnn.impl_cpp`, :mod:`~layernorm.rnn.impl_triton`:
  the implementations (torch ops; the C++ extension; Triton kernels);
- :mod:`~layernorm.rnn.recurrence`: the functions above (one autograd node per call);
- :mod:`~layernorm.rnn.ops`: the same as custom operators with fake kernels, for ``torch.compile``;
- :mod:`~layernorm.rnn.modules`, :mod:`~layernorm.rnn.batch_norm`: the modules.

Equations and options: ``docs/rnn.md``; speed and design: ``docs/rnn_fast.md``.
"""
from . import ops as _ops  # noqa: F401  (registers the custom operators)
from .batch_norm import BatchNormLSTM
from .dispatch import BACKENDS
from .modules import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .recurrence import gru_recurrence, lstm_recurrence, resolved_backend
from .reference import reverse_padded

__all__ = [
    "LayerNormLSTM",
    "LayerNormGRU",
    "LayerNormLSTMCell",
    "LayerNormGRUCell",
    "BatchNormLSTM",
    "lstm_recurrence",
    "gru_recurrence",
    "resolved_backend",
    "reverse_padded",
    "BACKENDS",
    "native_gemm_library",
]


def native_gemm_library():
    """The GEMM library the C++ backend's large products use here (``"onednn"`` or ``"aten"``), or None
    without the extension. For benchmark records."""
    from .dispatch import native

    ext = native()
    return None if ext is None else ext.gemm_library()
