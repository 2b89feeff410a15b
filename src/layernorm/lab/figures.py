"""Figure conventions of the lab: one colour per normalization in every figure, honest axes, safe writes.

- :data:`COLORS`: BatchNorm red, LayerNorm green, GroupNorm purple, SyncBatchNorm blue, no
  normalization grey -- in every panel of every figure. Recurrent kinds take their norm's colour
  (LSTMs solid, GRUs dashed: :func:`rnn_style`).
- Accuracy bars start at 0 (:func:`bars`); small differences are shown on a separate *difference*
  panel with its 0 line and the criterion's minimum effect (:func:`differences`), never by cutting the
  bar axis.
- Every panel gets a title; files are written under a unique temporary name and moved into place.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .files import publish, temporary_path
from .models import RNN_NAMES, RNN_NORM
from .stats import summarize

__all__ = ["COLORS", "NORM_NAMES", "pyplot", "savefig", "bars", "differences", "ci_err", "rnn_style"]

COLORS = {"bn": "#d62728", "ln": "#2ca02c", "gn": "#9467bd", "syncbn": "#1f77b4", "none": "#7f7f7f"}
NORM_NAMES = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm(4)", "syncbn": "SyncBatchNorm",
              "none": "no norm"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rnn_style(kind: str) -> Dict[str, object]:
    """Colour of the kind's normalization; solid for LSTMs, dashed for GRUs; its display name as label."""
    return {"color": COLORS[RNN_NORM[kind]], "ls": "--" if "gru" in kind else "-", "label": RNN_NAMES[kind]}


def savefig(fig, fig_dir: str, name: str) -> str:
    """Write ``fig`` to ``fig_dir/name`` (PNG) atomically under a unique temporary name; returns ``name``."""
    plt = pyplot()
    path = os.path.join(fig_dir, name)
    tmp = temporary_path(path)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
    return name


def ci_err(values_by_x: Sequence[Sequence[float]]) -> Tuple[np.ndarray, np.ndarray]:
    """Means and the (2, n) error-bar array of their 95% t-intervals (zero-width where undefined)."""
    means, lo, hi = [], [], []
    for v in values_by_x:
        s = summarize(v)
        a, b = s["ci95_t"]
        a = s["mean"] if a is None else a  # one seed: no interval
        b = s["mean"] if b is None else b
        means.append(s["mean"])
        lo.append(s["mean"] - a)
        hi.append(b - s["mean"])
    return np.array(means), np.array([lo, hi])


def bars(ax, labels: List[str], values: List[List[float]], colors: List[str], ylabel: str, title: str,
         top: Optional[float] = 100.0) -> None:
    """Mean bars from 0 with 95% t-intervals and every seed's value as a dot."""
    m, err = ci_err(values)
    x = np.arange(len(labels))
    ax.bar(x, m, yerr=err, capsize=4, color=colors, alpha=0.85)
    for i, v in enumerate(values):
        ax.scatter(np.full(len(v), x[i]) + np.linspace(-0.15, 0.15, len(v)), v, s=10, color="black", zorder=3)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, top if top is not None else max(1e-9, float(np.max([max(v) for v in values]))) * 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def differences(ax, rows: List[Tuple[str, Sequence[float], str]], unit: str, title: str,
                min_effect: Optional[float] = None, better: str = "right") -> None:
    """Paired differences, one row each: mean, 95% t-interval, the seeds' values; 0 and ``min_effect`` marked.

    ``rows``: (label, per-seed differences, colour). ``better`` says which side favours the first model.
    """
    for i, (label, vals, color) in enumerate(rows):
        s = summarize(vals)
        lo, hi = s["ci95_t"]
        y = len(rows) - 1 - i
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color=color, lw=3, solid_capstyle="butt")
        ax.plot([s["mean"]], [y], "o", color=color, ms=7)
        ax.scatter(vals, np.full(len(vals), y + 0.18), s=9, color="black", zorder=3)
    ax.axvline(0, color="black", lw=1)
    if min_effect:
        for sgn in (1, -1):
            ax.axvline(sgn * min_effect, color="black", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel(f"difference ({unit}); {better} of 0 favours the first named" if unit else "difference")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(-0.6, len(rows) - 0.4)
