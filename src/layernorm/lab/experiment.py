"""What every experiment file shares: the run context, the claim record, and the source of the claims.

An experiment is one module in ``layernorm/lab/experiments/`` with::

    NAME = "batch-size"               # its id (``--only NAME``)
    TITLE = "Batch size"              # its heading in the report
    def plan(ctx) -> list[Job]        # the training jobs (module-level functions of plain arguments)
    def analyze(ctx, results) -> dict # results[i] is what job i returned; builds the record below

``analyze`` returns ``{"config", "summary", "claims", "metrics", "figures"}`` and optionally
``"timings"`` (kept out of results.json: not reproducible). Everything else is a pure function of the
seeds, the data and the code. A claim is built with :func:`claim`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .stats import combine

__all__ = ["SOURCE", "Context", "claim", "labelled"]

# The claims come from this lecture; the lab cites it by its title.
SOURCE = 'AssemblyAI, "What is Layer Normalization?" (Deep Learning Fundamentals video, transcript and description)'


@dataclass
class Context:
    """What an experiment needs: seeds, mode, data option, where figures go, other experiments' results."""

    seeds: List[int]
    quick: bool
    data: str = "mnist"
    fig_dir: str = "."
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def figure_path(self, name: str) -> str:
        return os.path.join(self.fig_dir, name)


def labelled(part: Dict[str, Any], label: str, unit: str = "") -> Dict[str, Any]:
    """Attach the words a reader needs to a decision: what the difference is (``label``) and its ``unit``."""
    return {**part, "label": label, "unit": unit}


def claim(cid: str, experiment: str, short: str, quote: str, criterion: str, parts: Dict[str, Dict[str, Any]],
          evidence: Optional[Dict[str, Any]] = None, note: str = "", scope: str = "") -> Dict[str, Any]:
    """One claim of the lecture with its verdict: every part must hold (:func:`layernorm.lab.stats.combine`).

    Args:
        cid: stable identifier, e.g. ``"bn-small-batch"``.
        short: the claim in a few plain words, for the top table.
        quote: the lecture's words.
        criterion: the rule, in words, with its thresholds (fixed in code before the run).
        parts: name -> decision (``stats.decide_*``), each optionally :func:`labelled`.
        scope: where it was tested (data, model, sequence length), for the top table.
    """
    out = {"id": cid, "experiment": experiment, "short": short, "scope": scope, "claim": quote, "source": SOURCE,
           "criterion": criterion, "verdict": combine([p["verdict"] for p in parts.values()]), "parts": parts,
           "evidence": evidence or {}}
    if note:
        out["note"] = note
    return out
