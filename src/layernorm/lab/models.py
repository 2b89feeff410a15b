"""The models several experiments share: a normalization picked by name, an MLP, and recurrent nets.

Normalization by name, so experiments compare like with like:

- ``"bn"``: ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (per feature/channel, over the batch);
- ``"ln"``: ``nn.LayerNorm`` over the features of each sample; on images ``nn.GroupNorm(1, C)``, i.e.
  one mean/variance per sample over (C, H, W) with a per-channel gain (as in Wu & He, 2018);
- ``"gn"``: ``nn.GroupNorm`` with 4 groups (channels split into groups, per sample);
- ``"none"``: identity.

Recurrent layers by kind (:data:`RNN_KINDS`): torch's ``nn.LSTM`` / ``nn.GRU`` and the package's
``layernorm.LayerNormLSTM``, ``layernorm.LayerNormGRU``, ``layernorm.BatchNormLSTM``, all built
with the same ``(input_size, hidden_size, batch_first=True)`` call. The CNN lives with its experiment
(``experiments/cnn.py``): only that one uses it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["NORMS", "make_norm", "MLP", "RNN_KINDS", "RNN_NAMES", "RNN_NORM", "make_recurrent",
           "SeqClassifier", "CharLM", "parameter_count"]

NORMS = ("bn", "ln", "gn", "none")
GROUPS = 4


def make_norm(kind: str, features: int, spatial: bool = False) -> nn.Module:
    """A normalization layer for ``features`` channels; ``spatial`` for (N, C, H, W) inputs."""
    if kind == "bn":
        return nn.BatchNorm2d(features) if spatial else nn.BatchNorm1d(features)
    if kind == "ln":
        return nn.GroupNorm(1, features) if spatial else nn.LayerNorm(features)
    if kind == "gn":
        return nn.GroupNorm(GROUPS, features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class MLP(nn.Module):
    """``in -> [Linear -> norm -> ReLU] x depth -> Linear(classes)`` on flattened images."""

    def __init__(self, in_features: int, classes: int, norm: str, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        layers = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), make_norm(norm, hidden), nn.ReLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


RNN_KINDS = ("lstm", "ln-lstm", "bn-lstm", "gru", "ln-gru")
RNN_NAMES = {"lstm": "nn.LSTM", "ln-lstm": "LayerNormLSTM", "bn-lstm": "BatchNormLSTM", "gru": "nn.GRU",
             "ln-gru": "LayerNormGRU"}
# The normalization inside each recurrent kind: the figures colour a kind by it.
RNN_NORM = {"lstm": "none", "ln-lstm": "ln", "bn-lstm": "bn", "gru": "none", "ln-gru": "ln"}


def make_recurrent(kind: str, input_size: int, hidden: int, max_length: int) -> nn.Module:
    """One recurrent layer of ``kind``, batch first; ``max_length``: steps with their own statistics (BN only)."""
    import layernorm

    if kind == "lstm":
        return nn.LSTM(input_size, hidden, batch_first=True)
    if kind == "gru":
        return nn.GRU(input_size, hidden, batch_first=True)
    if kind == "ln-lstm":
        return layernorm.LayerNormLSTM(input_size, hidden, batch_first=True)
    if kind == "ln-gru":
        return layernorm.LayerNormGRU(input_size, hidden, batch_first=True)
    if kind == "bn-lstm":
        return layernorm.BatchNormLSTM(input_size, hidden, batch_first=True, max_length=max_length)
    raise ValueError(f"kind must be one of {RNN_KINDS}, got {kind!r}")


class SeqClassifier(nn.Module):
    """A recurrent layer over ``(N, T, F)`` inputs, classified from the last step's output.

    Args:
        kind: one of :data:`RNN_KINDS`.
        max_length: steps with their own statistics (BatchNormLSTM only); use the sequence length.
    """

    def __init__(self, kind: str, input_size: int, hidden: int, classes: int, max_length: int) -> None:
        super().__init__()
        self.rnn = make_recurrent(kind, input_size, hidden, max_length)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class CharLM(nn.Module):
    """A character language model: embedding -> recurrent layer -> logits over the vocabulary at every step.

    ``forward(ids, lengths=None)`` takes ``(N, T)`` int64 ids (padded when ``lengths`` is given) and returns
    ``(N, T, vocab)`` logits; with ``lengths`` the recurrent layer sees a ``PackedSequence``, so padding
    never enters it (the positions past a sequence's length come back as the head's output of zeros).
    """

    def __init__(self, kind: str, vocab: int, hidden: int, max_length: int, embed: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = make_recurrent(kind, embed, hidden, max_length)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        e = self.embed(ids)
        if lengths is None:
            out, _ = self.rnn(e)
        else:
            packed = pack_padded_sequence(e, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        return self.head(out)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (reported beside each comparison: the kinds differ in size)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
