"""A dependency-free check of results.json against the schema documented in docs/lab.md."""
from __future__ import annotations

from typing import Dict, List

from .stats import VERDICTS

__all__ = ["validate"]

_TOP = {"schema_version": int, "tool": str, "layernorm_version": str, "torch_version": str, "run": str,
        "config": dict, "verdict_counts": dict, "claims": list, "experiments": dict, "choose": list}
_CLAIM = {"id": str, "experiment": str, "claim": str, "source": str, "criterion": str, "verdict": str,
          "parts": dict, "evidence": dict}
_EXP = {"title": str, "config": dict, "summary": dict, "claim_ids": list, "figures": list, "metrics_csv": str}


def _need(obj: Dict, spec: Dict, where: str, errors: List[str]) -> None:
    for k, t in spec.items():
        if k not in obj:
            errors.append(f"{where}: missing key {k!r}")
        elif not isinstance(obj[k], t):
            errors.append(f"{where}.{k}: expected {t.__name__}, got {type(obj[k]).__name__}")


def validate(results: Dict) -> List[str]:
    """Return the list of schema violations of a results.json object (empty when it conforms)."""
    errors: List[str] = []
    _need(results, _TOP, "results", errors)
    if errors:
        return errors
    for k in ("quick", "seeds", "data", "criteria"):
        if k not in results["config"]:
            errors.append(f"results.config: missing key {k!r}")
    ids = set()
    for i, c in enumerate(results["claims"]):
        where = f"claims[{i}]"
        _need(c, _CLAIM, where, errors)
        if c.get("verdict") not in VERDICTS:
            errors.append(f"{where}.verdict: {c.get('verdict')!r} not in {VERDICTS}")
        if c.get("id") in ids:
            errors.append(f"{where}.id: duplicate {c.get('id')!r}")
        ids.add(c.get("id"))
        for name, p in c.get("parts", {}).items():
            if p.get("verdict") not in VERDICTS or "rule" not in p:
                errors.append(f"{where}.parts.{name}: needs 'verdict' in {VERDICTS} and 'rule'")
            if p.get("rule") in ("effect", "no_worse"):
                d = p.get("difference", {})
                for k in ("n", "mean", "ci95_t", "ci95_bootstrap", "values"):
                    if k not in d:
                        errors.append(f"{where}.parts.{name}.difference: missing {k!r}")
    counts = {v: sum(c.get("verdict") == v for c in results["claims"]) for v in VERDICTS}
    if results["verdict_counts"] != counts:
        errors.append(f"verdict_counts {results['verdict_counts']} != counted {counts}")
    for n, e in results["experiments"].items():
        _need(e, _EXP, f"experiments.{n}", errors)
        for cid in e.get("claim_ids", []):
            if cid not in ids:
                errors.append(f"experiments.{n}.claim_ids: {cid!r} is not a claim")
    for i, r in enumerate(results["choose"]):
        for k in ("situation", "recommended", "measured"):
            if k not in r:
                errors.append(f"choose[{i}]: missing key {k!r}")
    return errors
