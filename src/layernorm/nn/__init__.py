"""Modules: drop-in norm layers, and (re-exported from :mod:`layernorm.rnn`) the layer-normalized recurrent layers."""
from ..rnn import BatchNormLSTM, LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell
from .normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm", "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell",
           "BatchNormLSTM"]
