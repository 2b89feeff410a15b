"""The small models the lab trains: an MLP, a CNN and a recurrent classifier/regressor.

Normalization is picked by name so the experiments compare like with like:

- ``"bn"``: ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` (per feature/channel, over the batch);
- ``"ln"``: ``nn.LayerNorm`` over the features of each sample; in the CNN ``nn.GroupNorm(1, C)``, i.e.
  one mean/variance per sample over (C, H, W) with a per-channel gain (as in Wu & He, 2018);
- ``"gn"``: ``nn.GroupNorm`` with 4 groups (channels split into groups, per sample);
- ``"none"``: identity.
- ``"syncbn"`` (parallel experiment only): ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

__all__ = ["NORMS", "make_norm", "MLP", "CNN", "SeqModel", "rnn_classes", "RNN_KINDS"]

NORMS = ("bn", "ln", "gn", "none")
GROUPS = 4


def make_norm(kind: str, features: int, spatial: bool = False) -> nn.Module:
    """A normalization layer for ``features`` channels; ``spatial`` for (N, C, H, W) inputs."""
    if kind == "bn":
        return nn.BatchNorm2d(features) if spatial else nn.BatchNorm1d(features)
    if kind == "syncbn":
        return nn.SyncBatchNorm(features)
    if kind == "ln":
        return nn.GroupNorm(1, features) if spatial else nn.LayerNorm(features)
    if kind == "gn":
        return nn.GroupNorm(GROUPS, features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS + ('syncbn',)}, got {kind!r}")


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


class CNN(nn.Module):
    """Three 3x3 conv blocks (16, 32, 32 channels) with norm + ReLU, a max-pool, global average pool."""

    def __init__(self, in_channels: int, classes: int, norm: str, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"),
                                 make_norm(norm, cout, spatial=True), nn.ReLU())

        self.body = nn.Sequential(block(in_channels, width), block(width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


RNN_KINDS = ("lstm", "ln-lstm", "bn-lstm", "gru", "ln-gru")


def rnn_classes() -> Dict[str, type]:
    """The recurrent layers by kind: torch's and the package's (``layernorm.LayerNormLSTM`` ...)."""
    from layernorm import BatchNormLSTM, LayerNormGRU, LayerNormLSTM

    return {"lstm": nn.LSTM, "ln-lstm": LayerNormLSTM, "bn-lstm": BatchNormLSTM, "gru": nn.GRU,
            "ln-gru": LayerNormGRU}


class SeqModel(nn.Module):
    """A one-layer recurrent net over ``(N, T, F)`` inputs, read out from the last real step's hidden state.

    Args:
        kind: one of ``RNN_KINDS``.
        max_length: steps with their own statistics (BatchNormLSTM only).
    """

    def __init__(self, kind: str, input_size: int, hidden: int, outputs: int, max_length: int = 100) -> None:
        super().__init__()
        classes = rnn_classes()
        if kind not in classes:
            raise ValueError(f"kind must be one of {RNN_KINDS}, got {kind!r}")
        if kind == "bn-lstm":
            self.rnn = classes[kind](input_size, hidden, batch_first=True, max_length=max_length)
        else:
            self.rnn = classes[kind](input_size, hidden, batch_first=True)
        self.kind = kind
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is not None:
            x = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTMs return (h, c), GRUs h
        return self.head(h[-1])
