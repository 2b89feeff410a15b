"""What :func:`layernorm.patch` did: one entry per norm module (and per decoder layer it was asked to
fuse), with the rule that recognised it, the mapping, the verification figures, or why it was left."""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List

__all__ = ["PatchEntry", "PatchReport"]

SWAPPED, LEFT, KEPT, FUSED, NOT_FUSED = "swapped", "left", "kept", "fused", "not fused"


@dataclasses.dataclass
class PatchEntry:
    """One module. ``status``: "swapped", "left" (with ``reason``), "kept" (already ours: a
    layernorm module or patched before), "fused" / "not fused" (decoder layers, ``fuse_residual``).
    ``max_error``: per probe, the largest error relative to the tolerance (<= 1 passes)."""

    name: str
    cls: str
    status: str
    rule: str = ""
    mapping: str = ""
    reason: str = ""
    max_error: Dict[str, float] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PatchReport:
    """The entries of one ``patch()`` call; ``str(report)`` is a summary grouped by class."""

    entries: List[PatchEntry] = dataclasses.field(default_factory=list)

    def _with(self, status: str) -> List[PatchEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def swapped(self) -> List[PatchEntry]:
        return self._with(SWAPPED)

    @property
    def left(self) -> List[PatchEntry]:
        return self._with(LEFT)

    @property
    def kept(self) -> List[PatchEntry]:
        return self._with(KEPT)

    @property
    def fused(self) -> List[PatchEntry]:
        return self._with(FUSED)

    @property
    def not_fused(self) -> List[PatchEntry]:
        return self._with(NOT_FUSED)

    def to_dict(self) -> dict:
        return {"entries": [dataclasses.asdict(e) for e in self.entries]}

    def summary(self) -> str:
        groups: "collections.OrderedDict[tuple, List[PatchEntry]]" = collections.OrderedDict()
        for e in self.entries:
            detail = e.reason if e.status in (LEFT, NOT_FUSED) else e.mapping
            groups.setdefault((e.status, e.cls.rsplit(".", 1)[-1], e.rule, detail), []).append(e)
        counts = collections.Counter(e.status for e in self.entries)
        head = ", ".join(f"{counts[s]} {s}" for s in (SWAPPED, LEFT, KEPT, FUSED, NOT_FUSED) if counts[s])
        lines = [f"layernorm.patch: {head or 'no norm modules found'}"]
        for (status, cls, rule, detail), items in groups.items():
            worst = max((v for e in items for v in e.max_error.values()), default=None)
            figures = f"; worst probe error {worst:.2g} of tolerance" if worst is not None else ""
            names = ", ".join(e.name or "<root>" for e in items[:3]) + (", ..." if len(items) > 3 else "")
            via = f" [{rule}]" if rule else ""
            lines.append(f"  {status:9} {len(items):4} x {cls}{via}: {detail}{figures}  ({names})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
