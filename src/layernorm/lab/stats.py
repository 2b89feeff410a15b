"""Confidence intervals and the verdict rules of the lab.

Every claim is judged by rules fixed here before any experiment runs:

- :func:`decide_effect` -- "A is better than B": the paired differences (A - B, one per seed) must be
  significantly positive *and* at least ``min_effect`` on average;
- :func:`decide_no_worse` -- "A does not suffer from X": the difference must be confidently above
  ``-margin`` (a one-sided equivalence test);
- :func:`decide_checks` -- exact facts (max |difference| <= tolerance): every check must pass;
- :func:`decide_either` -- "A is better than B" judged on two measures (better at the end, faster to
  converge), as the papers report both: supported when one measure supports it and the other is not
  significantly reversed.

The interval is Student's t 95% interval over seeds; a seeded percentile bootstrap interval is reported
beside it, with the verdict the same rule would give on it (``verdict_bootstrap``), but the verdict
uses the t-interval only. With 5 seeds the percentile bootstrap is known to be too narrow, which is
why it is not the deciding one.

Example::

    >>> decide_effect([2.1, 3.0, 2.4, 2.8, 1.9], min_effect=1.0)["verdict"]
    'supported'
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Sequence

import numpy as np

__all__ = [
    "SUPPORTED",
    "NOT_SUPPORTED",
    "INCONCLUSIVE",
    "VERDICTS",
    "t_interval",
    "bootstrap_interval",
    "summarize",
    "decide_effect",
    "decide_no_worse",
    "decide_checks",
    "decide_either",
    "significance",
    "combine",
]

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)

CONFIDENCE = 0.95


def _r(x: float, nd: int = 6) -> float:
    """Round for the JSON: fixed digits keep results.json byte-identical across runs and readable."""
    if x is None or not math.isfinite(float(x)):
        return None  # type: ignore[return-value]  # JSON has no infinity: an undefined bound is null
    return float(round(float(x), nd))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> List[float]:
    """Two-sided Student-t interval for the mean of ``values``.

    With one value the interval is infinite (nothing is known about the spread; ``summarize`` stores
    its bounds as None); with zero spread it collapses to the mean.
    """
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n == 0:
        raise ValueError("t_interval: values must not be empty")
    mean = float(v.mean())
    if n == 1:
        return [-math.inf, math.inf]
    sd = float(v.std(ddof=1))
    from scipy.stats import t  # scipy comes with scikit-learn, the lab's data dependency

    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return [mean - half, mean + half]


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, n_boot: int = 2000,
                       seed: int = 0) -> List[float]:
    """Percentile bootstrap interval of the mean (seeded, so reproducible)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_interval: values must not be empty")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, 0.5 + confidence / 2])
    return [float(lo), float(hi)]


def summarize(values: Iterable[float]) -> Dict[str, object]:
    """Mean, standard deviation, t- and bootstrap intervals and the raw values, rounded for JSON."""
    v = [float(x) for x in values]
    ti = t_interval(v)
    bi = bootstrap_interval(v)
    return {
        "n": len(v),
        "mean": _r(float(np.mean(v))),
        "std": _r(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0),
        "ci95_t": [_r(ti[0]), _r(ti[1])],
        "ci95_bootstrap": [_r(bi[0]), _r(bi[1])],
        "values": [_r(x) for x in v],
    }


def decide_effect(diffs: Sequence[float], min_effect: float) -> Dict[str, object]:
    """Verdict on "the effect (one paired difference per seed) is positive and at least ``min_effect``".

    - supported: t-interval lower bound > 0 and mean >= ``min_effect``;
    - not supported: t-interval upper bound < ``min_effect`` (the effect is confidently smaller than
      claimed, or reversed);
    - inconclusive: anything else (too few seeds, too much noise).
    """
    if min_effect < 0:
        raise ValueError(f"decide_effect: min_effect must be >= 0, got {min_effect}")
    s = summarize(diffs)
    mean = float(np.mean(diffs))

    def rule(lo: float, hi: float) -> str:
        if lo > 0 and mean >= min_effect:
            return SUPPORTED
        if hi < min_effect:
            return NOT_SUPPORTED
        return INCONCLUSIVE

    return {"verdict": rule(*t_interval(diffs)), "rule": "effect", "min_effect": min_effect, "difference": s,
            "verdict_bootstrap": rule(*bootstrap_interval(diffs))}


def decide_no_worse(diffs: Sequence[float], margin: float) -> Dict[str, object]:
    """Verdict on "A is not worse than B by more than ``margin``" (diffs = A - B per seed).

    - supported: t-interval lower bound > -margin;
    - not supported: t-interval upper bound < -margin;
    - inconclusive: the interval straddles -margin.
    """
    if margin < 0:
        raise ValueError(f"decide_no_worse: margin must be >= 0, got {margin}")
    s = summarize(diffs)

    def rule(lo: float, hi: float) -> str:
        if lo > -margin:
            return SUPPORTED
        if hi < -margin:
            return NOT_SUPPORTED
        return INCONCLUSIVE

    return {"verdict": rule(*t_interval(diffs)), "rule": "no_worse", "margin": margin, "difference": s,
            "verdict_bootstrap": rule(*bootstrap_interval(diffs))}


def decide_checks(checks: Dict[str, bool]) -> Dict[str, object]:
    """Verdict on exact facts: supported when every named check passed, otherwise not supported."""
    if not checks:
        raise ValueError("decide_checks: need at least one check")
    ok = all(bool(v) for v in checks.values())
    return {"verdict": SUPPORTED if ok else NOT_SUPPORTED, "rule": "checks",
            "checks": {k: bool(v) for k, v in checks.items()}}


def significance(diffs: Sequence[float]) -> int:
    """+1 when the t-interval of the mean difference lies above 0, -1 when below, 0 when it holds 0."""
    lo, hi = t_interval(diffs)
    return 1 if lo > 0 else -1 if hi < 0 else 0


def decide_either(measures: Dict[str, Dict[str, object]]) -> Dict[str, object]:
    """Verdict on "A is better than B" from several effect decisions (e.g. ``{"end": ..., "speed": ...}``).

    Each measure is a :func:`decide_effect` result on A - B (positive = A better). A measure is
    *reversed* when its t-interval lies wholly below 0 (B significantly better on it).

    - supported: some measure is supported and none is reversed;
    - not supported: every measure is not supported (each confidently below its minimum effect, or
      reversed);
    - inconclusive: anything else, including a trade-off (one measure supported, another reversed).

    Example::

        >>> end = decide_effect([0.3, 0.4, 0.2, 0.5, 0.3], 0.05)
        >>> speed = decide_effect([1.0, -2.0, 3.0, 0.0, 1.0], 10.0)
        >>> decide_either({"end": end, "speed": speed})["verdict"]
        'supported'
    """
    if not measures:
        raise ValueError("decide_either: need at least one measure")
    verdicts = {k: m["verdict"] for k, m in measures.items()}
    def below_zero(bound) -> bool:
        return bound is not None and bound < 0

    rev = {k: below_zero(m["difference"]["ci95_t"][1]) for k, m in measures.items()}
    if any(v == SUPPORTED for v in verdicts.values()) and not any(rev.values()):
        verdict = SUPPORTED
    elif all(v == NOT_SUPPORTED for v in verdicts.values()):
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    boot = {k: m.get("verdict_bootstrap", m["verdict"]) for k, m in measures.items()}
    rev_b = {k: below_zero(m["difference"]["ci95_bootstrap"][1]) for k, m in measures.items()}
    if any(v == SUPPORTED for v in boot.values()) and not any(rev_b.values()):
        verdict_b = SUPPORTED
    elif all(v == NOT_SUPPORTED for v in boot.values()):
        verdict_b = NOT_SUPPORTED
    else:
        verdict_b = INCONCLUSIVE
    return {"verdict": verdict, "rule": "either", "measures": measures, "reversed": rev,
            "verdict_bootstrap": verdict_b}


def combine(verdicts: Sequence[str]) -> str:
    """All parts of a claim must hold: any "not supported" wins, then any "inconclusive"."""
    for v in verdicts:
        if v not in VERDICTS:
            raise ValueError(f"combine: unknown verdict {v!r}; expected one of {VERDICTS}")
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    if INCONCLUSIVE in verdicts:
        return INCONCLUSIVE
    return SUPPORTED
