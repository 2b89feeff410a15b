"""The experiments of ``layernorm lab``, one file each, in report order.

Each module holds one experiment end to end: its data choice, model, training job, criteria (constants
at the top, fixed before the run), claim text and figure; see ``layernorm.lab.experiment`` for the
interface (``NAME``, ``TITLE``, ``plan(ctx)``, ``analyze(ctx, results)``). ``choose`` reads the others'
results, so it comes last.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, List

from . import batch_size, choose, cnn, parallel, rnn_mnist, rnn_text, train_test, variable_length, what_ln_computes

__all__ = ["EXPERIMENTS", "ORDER", "TITLES"]

_MODULES: List[ModuleType] = [what_ln_computes, batch_size, train_test, variable_length, parallel, rnn_text,
                              rnn_mnist, cnn, choose]
EXPERIMENTS: Dict[str, ModuleType] = {m.NAME: m for m in _MODULES}
ORDER: List[str] = [m.NAME for m in _MODULES]
TITLES: Dict[str, str] = {m.NAME: f"{i + 1}. {m.TITLE}" for i, m in enumerate(_MODULES)}
