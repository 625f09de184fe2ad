"""How good were the ROIs? The typed summary of one ``crop_manifest`` run.

A crop run that silently falls back to the centre for most images yields "ROI" crops that
are not ROIs at all, and every later number inherits that. :func:`summarise_crops` counts
each ROI source, measures the detections against manifest boxes where the manifest has them,
and turns a high fallback share into a warning that travels with the summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from breastfusion.roi.settings import FALLBACK_WARN_SHARE, CropSettings

SUMMARY_SOURCES: tuple[str, ...] = ("detected", "box", "fallback", "dropped")


@dataclass(frozen=True)
class IouStats:
    """Detected boxes against manifest boxes: ``n`` pairs, mean IoU, share with IoU >= 0.5;
    ``missed`` rows with a manifest box where the detector found nothing."""

    n: int
    mean: float | None
    share_ge_050: float | None
    missed: int

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "mean": self.mean, "share_ge_0.5": self.share_ge_050,
                "missed": self.missed}  # fmt: skip


@dataclass(frozen=True)
class CropSummary:
    """What one crop run did to the US rows (written as ``roi_summary.json``)."""

    counts: dict[str, int]
    n_us: int
    fallback_share: float | None
    mean_confidence: float | None
    iou: IouStats | None
    iou_holdout: IouStats | None
    settings: CropSettings
    use_boxes: bool
    dropped_rows: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "n_us": self.n_us,
            "fallback_share": self.fallback_share,
            "mean_confidence": self.mean_confidence,
            "iou_vs_manifest_boxes": self.iou.to_dict() if self.iou else None,
            "iou_vs_manifest_boxes_holdout": (
                self.iou_holdout.to_dict() if self.iou_holdout else None
            ),
            "settings": self.settings.to_dict(),
            "use_boxes": self.use_boxes,
            "dropped_rows": list(self.dropped_rows),
            "warnings": list(self.warnings),
        }

    def lines(self) -> list[str]:
        """Human-readable summary lines for the CLI."""
        c = self.counts
        out = [
            f"US crops: {self.n_us} rows; detected {c['detected']}, manifest box {c['box']}, "
            f"fallback ({self.settings.fallback}) {c['fallback']}, dropped {c['dropped']}"
        ]
        if self.fallback_share is not None:
            conf = "n/a" if self.mean_confidence is None else f"{self.mean_confidence:.3f}"
            out.append(f"no-detection share {self.fallback_share:.1%}; mean confidence {conf}")
        for name, stats in (("all", self.iou), ("holdout", self.iou_holdout)):
            if stats is not None and stats.n:
                out.append(
                    f"IoU vs manifest boxes ({name}): mean {stats.mean:.3f}, "
                    f"{stats.share_ge_050:.1%} >= 0.5 over {stats.n} detections, "
                    f"{stats.missed} missed"
                )
        out += [f"warning: {w}" for w in self.warnings]
        return out


def _iou_stats(records: Sequence[Mapping[str, Any]]) -> IouStats | None:
    """IoU statistics over records that have a manifest box and were sent to the detector."""
    judged = [r for r in records if r.get("manifest_box") is not None and r["detector_ran"]]
    if not judged:
        return None
    ious = [r["iou"] for r in judged if r["iou"] is not None]
    missed = sum(1 for r in judged if r["iou"] is None)
    if not ious:
        return IouStats(0, None, None, missed)
    return IouStats(
        n=len(ious),
        mean=math.fsum(ious) / len(ious),
        share_ge_050=sum(v >= 0.5 for v in ious) / len(ious),
        missed=missed,
    )


def summarise_crops(
    records: Sequence[Mapping[str, Any]],
    settings: CropSettings,
    *,
    use_boxes: bool,
    holdout: Sequence[str] | None = None,
) -> CropSummary:
    """The summary of per-row crop records (one per US row, see ``crop._record``).

    ``fallback_share`` is the share of rows sent to the detector for which it found nothing
    (cropped by the fallback rule, or dropped); rows cropped from a trusted manifest box do
    not count. Above :data:`FALLBACK_WARN_SHARE` it becomes a warning.
    """
    counts = {s: 0 for s in SUMMARY_SOURCES}
    for r in records:
        counts[r["roi_source"]] += 1
    sent = [r for r in records if r["detector_ran"]]
    misses = counts["fallback"] + counts["dropped"]
    share = misses / len(sent) if sent else None
    confs = [r["confidence"] for r in records if r["confidence"] is not None]
    held = {str(p) for p in holdout} if holdout is not None else None
    warnings: list[str] = []
    if share is not None and share > FALLBACK_WARN_SHARE:
        warnings.append(
            f"the detector found no lesion in {misses} of {len(sent)} US images ({share:.0%}, "
            f"above {FALLBACK_WARN_SHARE:.0%}): those crops use the '{settings.fallback}' "
            "fallback, not a lesion ROI; check the detector (metrics.json) or roi.crop.conf"
        )
    return CropSummary(
        counts=counts,
        n_us=len(records),
        fallback_share=share,
        mean_confidence=math.fsum(confs) / len(confs) if confs else None,
        iou=_iou_stats(records),
        iou_holdout=(_iou_stats([r for r in records if r["patient_id"] in held]) if held else None),
        settings=settings,
        use_boxes=use_boxes,
        dropped_rows=sorted(int(r["row"]) for r in records if r["roi_source"] == "dropped"),
        warnings=warnings,
    )
