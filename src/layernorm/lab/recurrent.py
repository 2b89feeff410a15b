"""Judging recurrent models as the papers do: better at the end, and faster to converge.

Shared by the recurrent experiments (``rnn-text``, ``rnn-mnist``): every job reports a curve (the
evaluation metric at fixed steps, step 0 included) and the metric at the end.

- *End*: the paired difference of the final metric (one per seed), judged by
  :func:`~layernorm.lab.stats.decide_effect` with the experiment's minimum effect.
- *Speed*: steps to reach a fixed target (linear interpolation between evaluations); a seed that
  never reaches it counts as the whole budget, a lower bound on its true value (noted in the
  evidence). The paired difference in steps is judged with a minimum effect of
  :data:`SPEED_EFFECT_FRACTION` of the budget.
- The two are combined with :func:`~layernorm.lab.stats.decide_either`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from .experiment import labelled
from .figures import rnn_style
from .stats import decide_effect, decide_either

__all__ = ["SPEED_EFFECT_FRACTION", "steps_to_target", "judge_pair", "plot_curves", "divergence"]

# "Faster" must save at least this fraction of the step budget (0.1 = 10% of the steps) on average.
SPEED_EFFECT_FRACTION = 0.10


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float, higher: bool) -> Optional[float]:
    """First step where the curve meets ``target``, interpolated linearly between evaluations; None if never."""
    prev_s, prev_v = None, None
    for s, v in zip(steps, values):
        if v is not None and np.isfinite(v) and (v >= target if higher else v <= target):
            if prev_s is None or prev_v is None or not np.isfinite(prev_v) or prev_v == v:
                return float(s)
            frac = (target - prev_v) / (v - prev_v)
            return float(prev_s + frac * (s - prev_s))
        prev_s, prev_v = s, v
    return None


def judge_pair(by: Dict, first: str, second: str, seeds: Sequence[int], *, higher: bool, min_end: float,
               end_unit: str, budget: int, target: float, metric: str) -> Dict:
    """Is ``first`` better than ``second``? ``by[kind, seed]`` holds ``final``, ``steps_to_target``.

    Differences are oriented so that positive favours ``first``: final metric (first - second when
    higher is better, else second - first) and steps (second's - first's).
    """
    sign = 1.0 if higher else -1.0
    end = [sign * (by[first, s]["final"] - by[second, s]["final"]) for s in seeds]
    reach = {k: [by[k, s]["steps_to_target"] for s in seeds] for k in (first, second)}
    steps = {k: [budget if r is None else r for r in reach[k]] for k in reach}
    speed = [b - a for a, b in zip(steps[first], steps[second])]
    from .models import RNN_NAMES

    a, b = RNN_NAMES[first], RNN_NAMES[second]
    measures = {
        "end": labelled(decide_effect(end, min_end),
                        f"final {metric} {'gained' if higher else 'saved'} by {a} over {b}", end_unit),
        "speed": labelled(decide_effect(speed, SPEED_EFFECT_FRACTION * budget),
                          f"steps saved by {a} over {b} to reach {metric} {'>=' if higher else '<='} {target:g}",
                          "steps"),
    }
    part = decide_either(measures)
    part["seeds_reaching_target"] = {k: sum(r is not None for r in reach[k]) for k in reach}
    part["label"] = f"{a} vs {b}: better at the end or faster, and not significantly worse on the other"
    return part


def divergence(results: List[Dict]) -> Dict[str, List[int]]:
    """Seeds whose training stopped at a non-finite loss or gradient, per kind."""
    out: Dict[str, List[int]] = {}
    for r in results:
        if r.get("diverged_at") is not None:
            out.setdefault(r["kind"], []).append(r["seed"])
    return out


def plot_curves(ax, by: Dict, kinds: Sequence[str], seeds: Sequence[int], key: str, title: str, ylabel: str,
                target: Optional[float] = None, ylim=None) -> None:
    """Mean curve over seeds per kind (norm colour, LSTM solid / GRU dashed), seeds thin; target dotted."""
    for k in kinds:
        st = by[k, seeds[0]]["eval_steps"]
        vals = np.array([by[k, s][key] for s in seeds], dtype=float)
        style = rnn_style(k)
        for row in vals:
            ax.plot(st, row, color=style["color"], ls=style["ls"], lw=0.5, alpha=0.35)
        ax.plot(st, np.nanmean(vals, 0), color=style["color"], ls=style["ls"], lw=2, label=style["label"])
    if target is not None:
        ax.axhline(target, color="black", ls=":", lw=1, label=f"target {target:g}")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
