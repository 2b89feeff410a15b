"""A dependency-free check of results.json against the schema documented in docs/lab.md (version 2)."""
from __future__ import annotations

from typing import Dict, List

from .stats import VERDICTS

__all__ = ["validate"]

_TOP = {"schema_version": int, "tool": str, "layernorm_version": str, "torch_version": str, "run": str,
        "preview": bool, "source": str, "config": dict, "verdict_counts": dict, "claims": list, "experiments": dict,
        "choose": list}
_CLAIM = {"id": str, "experiment": str, "short": str, "scope": str, "claim": str, "source": str, "criterion": str,
          "verdict": str, "parts": dict, "evidence": dict}
_EXP = {"title": str, "config": dict, "summary": dict, "claim_ids": list, "figures": list, "metrics_csv": str}
_DIFF = ("n", "mean", "ci95_t", "ci95_bootstrap", "values")


def _need(obj: Dict, spec: Dict, where: str, errors: List[str]) -> None:
    for k, t in spec.items():
        if k not in obj:
            errors.append(f"{where}: missing key {k!r}")
        elif not isinstance(obj[k], t):
            errors.append(f"{where}.{k}: expected {t.__name__}, got {type(obj[k]).__name__}")


def _part(p: Dict, where: str, errors: List[str]) -> None:
    if p.get("verdict") not in VERDICTS or "rule" not in p:
        errors.append(f"{where}: needs 'verdict' in {VERDICTS} and 'rule'")
        return
    if p["rule"] in ("effect", "no_worse"):
        d = p.get("difference", {})
        errors += [f"{where}.difference: missing {k!r}" for k in _DIFF if k not in d]
        if p.get("verdict_bootstrap") not in VERDICTS:
            errors.append(f"{where}.verdict_bootstrap: must be one of {VERDICTS}")
    elif p["rule"] == "either":
        if not isinstance(p.get("measures"), dict) or not p["measures"]:
            errors.append(f"{where}.measures: must be a non-empty object")
            return
        for k, m in p["measures"].items():
            _part(m, f"{where}.measures.{k}", errors)
        if set(p.get("reversed", {})) != set(p["measures"]):
            errors.append(f"{where}.reversed: needs one entry per measure")
    elif p["rule"] == "checks":
        if not isinstance(p.get("checks"), dict) or not p["checks"]:
            errors.append(f"{where}.checks: must be a non-empty object")


def validate(results: Dict) -> List[str]:
    """Return the list of schema violations of a results.json object (empty when it conforms)."""
    errors: List[str] = []
    _need(results, _TOP, "results", errors)
    if errors:
        return errors
    for k in ("quick", "seeds", "data", "criteria", "confidence"):
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
            _part(p, f"{where}.parts.{name}", errors)
    counts = {v: sum(c.get("verdict") == v for c in results["claims"]) for v in VERDICTS}
    if results["verdict_counts"] != counts:
        errors.append(f"verdict_counts {results['verdict_counts']} != counted {counts}")
    for n, e in results["experiments"].items():
        _need(e, _EXP, f"experiments.{n}", errors)
        for cid in e.get("claim_ids", []):
            if cid not in ids:
                errors.append(f"experiments.{n}.claim_ids: {cid!r} is not a claim")
    for i, r in enumerate(results["choose"]):
        for k in ("situation", "recommended", "measured", "tied_with_best"):
            if k not in r:
                errors.append(f"choose[{i}]: missing key {k!r}")
    return errors
