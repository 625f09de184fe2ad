"""The import report: what an import read, wrote, skipped (with reasons) and warned about."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("breastfusion.importers")

_SHOWN = 5  # examples per list on the terminal; the JSON and CSV hold them all


@dataclass
class ImportReport:
    """What an import read, wrote, skipped (with reasons) and warned about.

    ``read == written + n_skipped``: every item examined is either a manifest row or a
    skip with a reason (for CBIS-DDSM an item is a distinct image, or a CSV row rejected
    before it could name one). ``flagged`` rows are written but incomplete (e.g. no box).

    ``skipped`` maps a short reason to how many items it cost; ``skipped_items`` keeps the
    item names (first ``max_items`` per reason) so a user can look at them.

    ``near_duplicate_pairs`` holds one record per near-duplicate pair across patients
    (``data.near_duplicates.PAIR_COLUMNS`` plus ``action`` and the resulting ``patient``);
    ``near_duplicates`` is the policy applied (``off`` when not checked).
    """

    format: str
    source: str
    out: str = ""
    read: int = 0
    written: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    patients: int = 0
    boxes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_items: dict[str, list[str]] = field(default_factory=dict)
    flagged: Counter[str] = field(default_factory=Counter)
    flagged_items: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    duplicate_groups: list[list[str]] = field(default_factory=list)
    near_duplicates: str = "off"
    near_duplicate_pairs: list[dict[str, Any]] = field(default_factory=list)
    near_groups: int = 0
    near_excluded_groups: int = 0
    near_duplicates_csv: str = ""
    notes: list[str] = field(default_factory=list)
    max_items: int = 20

    def skip(self, item: str, reason: str) -> None:
        self.skipped[reason] += 1
        items = self.skipped_items.setdefault(reason, [])
        if len(items) < self.max_items:
            items.append(item)
        log.debug("skipped %s: %s", item, reason)

    def flag(self, item: str, reason: str) -> None:
        """A row that is written but incomplete (e.g. no box), counted by reason."""
        self.flagged[reason] += 1
        items = self.flagged_items.setdefault(reason, [])
        if len(items) < self.max_items:
            items.append(item)
        log.debug("kept %s with an issue: %s", item, reason)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.debug(message)  # printed once, by the summary

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain types only (no NaN)."""
        return {
            "format": self.format,
            "source": self.source,
            "out": self.out,
            "read": self.read,
            "written": self.written,
            "labels": dict(self.labels),
            "patients": self.patients,
            "boxes": self.boxes,
            "skipped": dict(self.skipped),
            "skipped_items": {k: list(v) for k, v in self.skipped_items.items()},
            "flagged": dict(self.flagged),
            "flagged_items": {k: list(v) for k, v in self.flagged_items.items()},
            "warnings": list(self.warnings),
            "duplicate_groups": [list(g) for g in self.duplicate_groups],
            "near_duplicates": self.near_duplicates,
            "near_duplicate_pairs": [dict(p) for p in self.near_duplicate_pairs],
            "near_duplicate_groups": self.near_groups,
            "near_duplicate_excluded_groups": self.near_excluded_groups,
            "near_duplicates_csv": self.near_duplicates_csv,
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Human-readable lines for the terminal."""
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())) or "none"
        lines = [
            f"{self.format}: read {self.read}, wrote {self.written} rows "
            f"({labels}; {self.patients} patients; {self.boxes} with a box) to {self.out}",
        ]
        lines += _counted("skipped", self.skipped, self.skipped_items)
        lines += _counted("kept with issues", self.flagged, self.flagged_items)
        if self.duplicate_groups:
            lines.append(f"exact duplicates: {len(self.duplicate_groups)} groups")
            for group in self.duplicate_groups[:_SHOWN]:
                lines.append("  " + " == ".join(group))
        lines += self._near_lines()
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def _near_lines(self) -> list[str]:
        if self.near_duplicates == "off":
            return []
        pairs = self.near_duplicate_pairs
        line = f"near duplicates across patients: {len(pairs)} pair(s)"
        if self.near_duplicates == "group":
            line += (
                f"; {self.near_groups} group(s) made one patient each, "
                f"{self.near_excluded_groups} group(s) with conflicting labels excluded"
            )
        lines = [line]
        for p in pairs[:_SHOWN]:
            lines.append(
                f"  {p['image_a']} ~ {p['image_b']} (distance {p['distance']}, {p['action']})"
            )
        if self.near_duplicates_csv:
            lines.append(f"  all pairs: {self.near_duplicates_csv}")
        return lines


def _counted(title: str, counts: Counter[str], items: dict[str, list[str]]) -> list[str]:
    if not counts:
        return []
    lines = [f"{title} {sum(counts.values())}:"]
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        examples = items.get(reason, [])[:3]
        more = f" (e.g. {', '.join(examples)})" if examples else ""
        lines.append(f"  {n:5d}  {reason}{more}")
    return lines
