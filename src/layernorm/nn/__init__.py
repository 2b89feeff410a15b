"""Modules: drop-in norm layers and layer-normalized recurrent layers."""
from .normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]

try:  # recurrent layers (issue 5)
    from .rnn import (  # noqa: F401
        BatchNormLSTM,
        LayerNormGRU,
        LayerNormGRUCell,
        LayerNormLSTM,
        LayerNormLSTMCell,
    )

    __all__ += ["LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell", "BatchNormLSTM"]
except ImportError as _exc:  # pragma: no cover - only while rnn.py is being written
    if "layernorm.nn.rnn" not in str(_exc) and "rnn" not in str(_exc):
        raise
