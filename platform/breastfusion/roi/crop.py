"""Ultrasound ROI cropping of a whole manifest: the cropped manifest, crops.csv, the summary.

Nothing here imports torch or ultralytics: the detector is any callable that maps a batch of
8-bit grey images to at most one box each (``roi.yolo.YoloDetector`` is the real one), so the
policy and the manifest rewriting are tested with a fake detector. The crop rule itself is
:func:`breastfusion.roi.geometry.crop_image`, shared with ``predict``.

The output folder is self-contained and relocatable: every path it stores is relative to
the folder (US crops under ``crops/``, DM images hard-linked under ``dm/``), so a study folder
moved with ``mv`` still works; ``source_path`` (traceability only) is relative to the folder
too, climbing out with ``..`` where the source lies outside. Where a DM file cannot be
hard-linked (another file system, no permission) its absolute path is kept and the summary
warns that the folder is not relocatable.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from breastfusion.data.manifest import BOX_COLUMNS, DERIVED_COLUMNS
from breastfusion.errors import ConfigError, UserError
from breastfusion.io import dumps_json, relative_ref
from breastfusion.roi.files import (  # noqa: F401  (save_png etc. re-exported: old API)
    relative_path,
    row_box,
    safe_name,
    save_png,
)
from breastfusion.roi.geometry import (  # noqa: F401  (re-exported: the module's old API)
    ROI_SOURCES,
    Detection,
    Detector,
    Window,
    box_in_window,
    box_iou,
    centre_window,
    crop_image,
    detector_image,
    encode_crop,
    expand_box,
    to_uint8,
)
from breastfusion.roi.settings import FALLBACKS, CropSettings
from breastfusion.roi.summary import CropSummary, summarise_crops
from breastfusion.roi.workdir import build_dir

logger = logging.getLogger(__name__)

Fallback = Literal["centre", "whole", "drop"]
__all__ = ["FALLBACKS", "ROI_SOURCES", "CropResult", "crop_manifest"]
ROI_COLUMNS: tuple[str, ...] = (
    "roi_source",
    "roi_confidence",
    "roi_x0",
    "roi_y0",
    "roi_x1",
    "roi_y1",
    "source_path",
)
CROPS_CSV_COLUMNS: tuple[str, ...] = (
    "row", "patient_id", "path", "source_path", "roi_source", "confidence",
    "det_x0", "det_y0", "det_x1", "det_y1", "roi_x0", "roi_y0", "roi_x1", "roi_y1",
    "box_x0", "box_y0", "box_x1", "box_y1", "iou",
)  # fmt: skip
SUMMARY_FILE = "roi_summary.json"


@dataclass
class CropResult:
    """What ``crop_manifest`` wrote (paths inside the output folder) and its summary."""

    manifest: Path
    summary: CropSummary
    crops_csv: Path
    summary_json: Path

    @property
    def counts(self) -> dict[str, int]:
        """US rows per ``roi_source`` plus ``dropped``."""
        return dict(self.summary.counts)

    @property
    def dropped_rows(self) -> list[int]:
        return list(self.summary.dropped_rows)


# ------------------------------------------------------------------------------ small helpers


def _rows_text(rows: list[int], limit: int = 20) -> str:
    text = ", ".join(str(r) for r in rows[:limit])
    return text + (f" … and {len(rows) - limit} more" if len(rows) > limit else "")


def _crop_settings(settings: CropSettings | None, **overrides: Any) -> CropSettings:
    settings = settings or CropSettings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return settings.replace(**given) if given else settings


# ------------------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class _Plan:
    """The US rows, their manifest boxes, which need the detector, and rows per image."""

    boxes: dict[int, tuple[float, float, float, float] | None]
    needs_detection: frozenset[int]
    images: dict[str, list[int]]


def _plan(df: pd.DataFrame, use_boxes: bool, has_detector: bool) -> _Plan:
    is_us = df["modality"].astype(str).str.upper().eq("US")
    has_box_col = all(c in df.columns for c in BOX_COLUMNS)
    boxes = {int(i): (row_box(df.loc[i]) if has_box_col else None) for i in df.index[is_us]}
    needs = frozenset(i for i in boxes if not (use_boxes and boxes[i] is not None))
    if needs and not has_detector:
        rows = sorted(int(df.at[i, "row"]) for i in needs)
        raise UserError(
            f"{len(rows)} US row(s) need a detector but none was given (rows {_rows_text(rows)});"
            " give trained detector weights, or crop around manifest boxes (roi.mode: boxes) "
            "with a box on every US row"
        )
    # Rows grouped by image: an image listed twice (two lesions) is read and detected once.
    images: dict[str, list[int]] = {}
    for i in boxes:
        images.setdefault(str(df.at[i, "abs_path"]), []).append(i)
    return _Plan(boxes, needs, images)


def crop_manifest(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    detector: Detector | None,
    settings: CropSettings | None = None,
    *,
    margin: float | None = None,
    fallback: Fallback | None = None,
    centre_fraction: float | None = None,
    use_boxes: bool = False,
    batch: int = 16,
    holdout: Sequence[str] | None = None,
    source_manifest: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    extra_summary: dict | None = None,
) -> CropResult:
    """Crop every US image of a loaded manifest into ``out_dir``.

    Writes ``manifest.csv`` (a valid manifest: US rows point to ``crops/``, DM rows to
    ``dm/``), ``crops.csv`` (per US row: the raw detection in source pixels, its confidence,
    the crop window, the ROI source, the manifest box and its IoU with the detection) and
    ``roi_summary.json`` (:class:`~breastfusion.roi.summary.CropSummary`, plus the settings
    and provenance). The window comes from the manifest box (``use_boxes`` and the row has
    one), else the detector's best box, else ``settings.fallback``. ``margin``/``fallback``/
    ``centre_fraction`` override ``settings``. ``holdout`` (patient ids) adds IoU statistics
    of patients the detector never saw. The folder appears only when complete.
    """
    settings = _crop_settings(
        settings, margin=margin, fallback=fallback, centre_fraction=centre_fraction
    )
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"crop batch size must be an integer >= 1, got {batch!r}")
    out = Path(out_dir).absolute()
    df = df.reset_index(drop=True)
    plan = _plan(df, use_boxes, detector is not None)
    with build_dir(out, marker=SUMMARY_FILE) as tmp:
        records = _crop_all(df, plan, detector, settings, tmp, batch)
        summary = summarise_crops(
            [records[i] for i in sorted(records)], settings, use_boxes=use_boxes, holdout=holdout
        )
        out_df, link_warnings = _rewrite_manifest(df, records, tmp, out)
        summary.warnings.extend(link_warnings)
        provenance = {
            "source_manifest": relative_ref(source_manifest, out) if source_manifest else None,
            "weights": relative_ref(weights, out) if weights else None,
            **(extra_summary or {}),
        }
        _write_outputs(tmp, out, out_df, records, summary, provenance)
    _log_summary(summary, records)
    return CropResult(out / "manifest.csv", summary, out / "crops.csv", out / SUMMARY_FILE)


def _crop_all(
    df: pd.DataFrame,
    plan: _Plan,
    detector: Detector | None,
    settings: CropSettings,
    tmp: Path,
    batch: int,
) -> dict[int, dict[str, Any]]:
    """Read, detect (in batches of images) and crop every US row; one record per row."""
    from breastfusion.data.imaging import read_grey

    records: dict[int, dict[str, Any]] = {}
    paths = list(plan.images)
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        raws = [read_grey(p) for p in chunk]
        ran = [
            k for k, p in enumerate(chunk) if any(i in plan.needs_detection for i in plan.images[p])
        ]
        found: dict[int, Detection | None] = {}
        if ran:
            inputs = [detector_image(raws[k], source=chunk[k]) for k in ran]
            results = detector(inputs)  # type: ignore[misc]
            if len(results) != len(inputs):
                raise RuntimeError("detector returned a different number of results")
            found = dict(zip(ran, results, strict=True))
        for k, p in enumerate(chunk):
            for i in plan.images[p]:
                detected = i in plan.needs_detection
                roi = found.get(k) if detected else plan.boxes[i]
                crop, info = crop_image(raws[k], roi, settings)
                name = f"{safe_name(df.at[i, 'patient_id'])}_r{int(df.at[i, 'row'])}.png"
                if crop is not None:
                    save_png(crop, tmp / "crops" / name)
                records[i] = _record(df, i, info, plan.boxes[i], detected, crop is not None, name)
    return records


def _record(
    df: pd.DataFrame,
    i: int,
    info: dict[str, Any],
    manifest_box: tuple[float, float, float, float] | None,
    detector_ran: bool,
    saved: bool,
    name: str,
) -> dict[str, Any]:
    det_box = info["det_box"]
    return {
        **info,
        "row": int(df.at[i, "row"]),
        "patient_id": str(df.at[i, "patient_id"]),
        "abs_path": str(df.at[i, "abs_path"]),
        "path": f"crops/{name}" if saved else None,
        "manifest_box": manifest_box,
        "detector_ran": detector_ran,
        "iou": box_iou(det_box, manifest_box) if det_box and manifest_box else None,
    }


def _link_dm(
    df: pd.DataFrame, i: int, tmp: Path, linked: dict[str, str], copied: list[int]
) -> str | None:
    """Hard-link a DM image into ``dm/`` (relative path); copy it when it cannot be linked
    (another file system: the folder must stay relocatable); None when neither works."""
    source = str(df.at[i, "abs_path"])
    if source in linked:
        return linked[source]
    name = f"dm/{safe_name(df.at[i, 'patient_id'])}_r{int(df.at[i, 'row'])}{Path(source).suffix}"
    (tmp / "dm").mkdir(exist_ok=True)
    try:
        os.link(source, tmp / name)
    except OSError:
        try:
            shutil.copy2(source, tmp / name)
        except OSError:
            return None
        copied.append(int(df.at[i, "row"]))
    linked[source] = name
    return name


def _rewrite_manifest(
    df: pd.DataFrame, records: dict[int, dict[str, Any]], tmp: Path, out_dir: Path
) -> tuple[pd.DataFrame, list[str]]:
    """The new manifest: the original columns (paths inside the folder) + ROI columns.

    US boxes are moved into crop coordinates (a box is "pixels of that image"); the crop
    window in source pixels and the source path are kept for traceability.
    """
    dropped = [i for i, r in records.items() if r["path"] is None]
    keep = [c for c in df.columns if c not in DERIVED_COLUMNS and c not in ROI_COLUMNS]
    out = df.loc[~df.index.isin(dropped), keep].copy()
    for col in ROI_COLUMNS:
        out[col] = pd.Series([None] * len(out), index=out.index, dtype=object)
    linked: dict[str, str] = {}
    unlinked: list[int] = []
    copied: list[int] = []
    for i in out.index:
        if i in records:
            continue
        name = _link_dm(df, int(i), tmp, linked, copied)
        if name is None:
            unlinked.append(int(df.at[i, "row"]))
            name = Path(os.path.abspath(df.at[i, "abs_path"])).as_posix()
        out.at[i, "path"] = name
    has_box_col = all(c in df.columns for c in BOX_COLUMNS)
    for i, r in records.items():
        if r["path"] is None:
            continue
        x0, y0, x1, y1 = r["window"]
        out.at[i, "path"] = r["path"]
        out.at[i, "roi_source"] = r["roi_source"]
        out.at[i, "roi_confidence"] = r["confidence"]
        out.at[i, "roi_x0"], out.at[i, "roi_y0"] = x0, y0
        out.at[i, "roi_x1"], out.at[i, "roi_y1"] = x1, y1
        out.at[i, "source_path"] = relative_ref(r["abs_path"], out_dir)
        if has_box_col:
            box = r["manifest_box"]
            moved = box_in_window(box, r["window"]) if box is not None else None
            for col, v in zip(BOX_COLUMNS, moved or (None,) * 4, strict=True):
                out.at[i, col] = v
    warnings = []
    if copied:
        warnings.append(
            f"{len(copied)} DM image(s) could not be hard-linked into the crop folder (another "
            f"file system; rows {_rows_text(copied)}): copied instead, so they take disk space"
        )
    if unlinked:
        warnings.append(
            f"{len(unlinked)} DM image(s) could not be hard-linked into the crop folder (no permission"
            f" to link or copy; rows {_rows_text(unlinked)}): the manifest names "
            "them by absolute path, so the folder is not relocatable"
        )
    return out, warnings


def _write_outputs(
    tmp: Path,
    out_dir: Path,
    out_df: pd.DataFrame,
    records: dict[int, dict[str, Any]],
    summary: CropSummary,
    provenance: dict[str, Any],
) -> None:
    (tmp / "crops").mkdir(exist_ok=True)
    (tmp / "manifest.csv").write_text(out_df.to_csv(index=False), encoding="utf-8")
    rows = []
    for i in sorted(records):
        r = records[i]
        det = r["det_box"] or (None,) * 4
        win = r["window"] or (None,) * 4
        box = r["manifest_box"] or (None,) * 4
        rows.append(
            [r["row"], r["patient_id"], r["path"], relative_ref(r["abs_path"], out_dir),
             r["roi_source"], r["confidence"], *det, *win, *box, r["iou"]]
        )  # fmt: skip
    table = pd.DataFrame(rows, columns=list(CROPS_CSV_COLUMNS))
    (tmp / "crops.csv").write_text(table.to_csv(index=False), encoding="utf-8")
    record = {
        **summary.to_dict(),
        "files": {"manifest": "manifest.csv", "crops": "crops.csv", "crop_images": "crops/"},
        "provenance": provenance,
    }
    (tmp / SUMMARY_FILE).write_text(dumps_json(_json_safe(record)), encoding="utf-8")


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); floats otherwise at full precision."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _log_summary(summary: CropSummary, records: dict[int, dict]) -> None:
    dropped = [r for r in records.values() if r["roi_source"] == "dropped"]
    if dropped:
        who = ", ".join(f"row {r['row']} (patient {r['patient_id']})" for r in dropped)
        logger.warning(
            "no lesion detected; dropped %d US row(s) (roi.crop.fallback: drop): %s",
            len(dropped),
            who,
        )
    for warning in summary.warnings:
        logger.warning("%s", warning)
