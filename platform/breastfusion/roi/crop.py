"""Ultrasound ROI cropping: geometry, fallback policy and the cropped manifest.

Nothing here imports torch or ultralytics: the detector is any callable that maps a batch of
8-bit grey images to at most one box each (``roi.yolo.YoloDetector`` is the real one), so the
geometry, the fallback policy and the manifest rewriting are tested with a fake detector.

Conventions:

- Boxes are ``(x0, y0, x1, y1)`` in pixels of the source image, x1/y1 exclusive (the manifest's
  convention). A crop window is the same tuple in integer pixels, clipped to the image.
- ``margin`` is a fraction of the box's own width/height added on *each* side, so a 0.1 margin
  around a 100 x 50 box gives a 120 x 60 window (before clipping). Context around the lesion
  edge (posterior shadowing, margins) is diagnostic in ultrasound; a tight box would cut it.
- Detection sees the same 8-bit image that the detector was trained on (per-image min-max of
  ``read_grey``), but crops are cut from the raw intensities and saved with their bit depth,
  so the later min-max normalisation runs on the crop itself, as in the study.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from breastfusion.data.manifest import BOX_COLUMNS, DERIVED_COLUMNS
from breastfusion.errors import ConfigError, UserError
from breastfusion.io import atomic_dir, dumps_json, portable_path

logger = logging.getLogger(__name__)

Fallback = Literal["centre", "whole", "drop"]
FALLBACKS: tuple[str, ...] = ("centre", "whole", "drop")
ROI_SOURCES: tuple[str, ...] = ("detected", "box", "fallback")
ROI_COLUMNS: tuple[str, ...] = (
    "roi_source",
    "roi_confidence",
    "roi_x0",
    "roi_y0",
    "roi_x1",
    "roi_y1",
    "source_path",
)

Window = tuple[int, int, int, int]


@dataclass(frozen=True)
class Detection:
    """The best box the detector found in one image (pixels of that image) and its score."""

    x0: float
    y0: float
    x1: float
    y1: float
    confidence: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


# A detector takes 8-bit grey H x W arrays and returns, per image, its best box or None.
Detector = Callable[[Sequence[np.ndarray]], list[Detection | None]]


@dataclass
class CropResult:
    """What ``crop_manifest`` wrote; ``counts`` is per ``roi_source`` (plus ``dropped``)."""

    manifest: Path
    counts: dict[str, int]
    dropped_rows: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------- geometry


def expand_box(box: Sequence[float], width: int, height: int, margin: float = 0.1) -> Window:
    """The integer crop window around ``box`` with ``margin`` per side, clipped to the image.

    Rounds outwards (floor/ceil) so the window always contains the whole box, and never
    returns an empty window: a degenerate box still yields at least one pixel.
    """
    if margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {margin}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0:
        x0, x1 = x1, x0
    if y1 < y0:
        y0, y1 = y1, y0
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    wx0 = min(max(0, math.floor(x0 - dx)), width - 1)
    wy0 = min(max(0, math.floor(y0 - dy)), height - 1)
    wx1 = max(min(width, math.ceil(x1 + dx)), wx0 + 1)
    wy1 = max(min(height, math.ceil(y1 + dy)), wy0 + 1)
    return (wx0, wy0, wx1, wy1)


def centre_window(width: int, height: int, fraction: float = 0.6) -> Window:
    """The central ``fraction`` of each side: US lesions are usually scanned near the centre,
    while text, calipers and colour bars sit at the borders."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--centre-fraction must be in (0, 1], got {fraction}")
    cw, ch = max(1, round(width * fraction)), max(1, round(height * fraction))
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return (x0, y0, x0 + cw, y0 + ch)


def box_in_window(box: Sequence[float], window: Window) -> tuple[float, ...] | None:
    """``box`` in the coordinates of a crop ``window`` (clipped); None if nothing is left."""
    wx0, wy0, wx1, wy1 = window
    x0 = min(max(box[0] - wx0, 0.0), wx1 - wx0)
    y0 = min(max(box[1] - wy0, 0.0), wy1 - wy0)
    x1 = min(max(box[2] - wx0, 0.0), wx1 - wx0)
    y1 = min(max(box[3] - wy0, 0.0), wy1 - wy0)
    if x1 <= x0 or y1 <= y0:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


# ------------------------------------------------------------------------------- pixel data


def to_uint8(normalised: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 (the detector's input, in training and detection alike)."""
    return np.clip(np.rint(np.asarray(normalised, dtype=np.float32) * 255.0), 0, 255).astype(
        np.uint8
    )


def encode_crop(raw: np.ndarray) -> np.ndarray:
    """Pick a lossless PNG dtype for a crop of raw intensities.

    8-bit sources stay 8-bit and 16-bit sources (DICOM, 16-bit PNG/TIFF) stay 16-bit, so no
    grey levels are lost. Values PNG cannot hold (negative, fractional, > 65535, e.g. a DICOM
    with rescale slope/intercept) are min-max scaled to 16 bits: a monotone rescale that the
    per-image min-max normalisation downstream undoes anyway.
    """
    raw = np.asarray(raw)
    finite = np.nan_to_num(raw.astype(np.float64), nan=0.0)
    lo, hi = float(finite.min()), float(finite.max())
    integral = bool(np.all(finite == np.round(finite)))
    if integral and lo >= 0 and hi <= 255:
        return finite.astype(np.uint8)
    if integral and lo >= 0 and hi <= 65535:
        return finite.astype(np.uint16)
    if hi <= lo:
        return np.zeros(finite.shape, dtype=np.uint16)
    return np.rint((finite - lo) / (hi - lo) * 65535.0).astype(np.uint16)


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a 2-D uint8/uint16 array as a grey PNG (mode L or I;16)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype != np.uint16:
        array = array.astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")


def safe_name(text: str) -> str:
    """A file-name-safe version of a patient id (ids are free text in the manifest)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._") or "patient"


def row_box(row: pd.Series) -> tuple[float, float, float, float] | None:
    """The manifest box of a row, or None if any coordinate is missing."""
    values = []
    for col in BOX_COLUMNS:
        v = row.get(col)
        if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v):
            return None
        values.append(float(v))
    return (values[0], values[1], values[2], values[3])


def relative_path(target: str | os.PathLike, start: Path) -> str:
    """``target`` as the new manifest (in ``start``) should name it, so that it stays valid.

    Inside ``start``: relative (the folder can move). Outside: absolute, because
    ``load_manifest`` refuses relative paths that climb out with ``..`` by default, and
    because another drive has no relative path at all.
    """
    return portable_path(target, start)


# ------------------------------------------------------------------------------ the manifest


def crop_manifest(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    detector: Detector | None,
    *,
    margin: float = 0.1,
    fallback: Fallback = "centre",
    use_boxes: bool = False,
    centre_fraction: float = 0.6,
    batch: int = 16,
    extra_summary: dict | None = None,
) -> CropResult:
    """Crop every US image of a loaded manifest and write ``out_dir/manifest.csv``.

    ``df`` is ``load_manifest``'s frame. For each US row the crop window comes from the
    manifest box (``use_boxes`` and the row has one: ``roi_source=box``), else from the
    detector's best box (``detected``), else from the fallback policy (``centre`` or ``whole``:
    ``fallback``; ``drop``: the row is left out and named in a warning). DM rows are copied
    with their paths rewritten relative to ``out_dir``. The folder is built under a temporary
    name and appears only when complete.
    """
    from breastfusion.data.imaging import minmax, read_grey

    if fallback not in FALLBACKS:
        raise ConfigError(f"--fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if margin < 0:
        raise ConfigError(f"--margin must be >= 0, got {margin}")
    centre_window(1, 1, centre_fraction)  # validates the fraction before any work
    if batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {batch}")

    out_dir = Path(out_dir).absolute()
    df = df.reset_index(drop=True)
    is_us = df["modality"].astype(str).str.upper().eq("US")
    has_box_col = all(c in df.columns for c in BOX_COLUMNS)

    # Which US rows need the detector: all of them, or only those without a trusted box.
    boxes: dict[int, tuple[float, float, float, float] | None] = {}
    for i in df.index[is_us]:
        boxes[i] = row_box(df.loc[i]) if has_box_col else None
    needs_detection = {i for i in boxes if not (use_boxes and boxes[i] is not None)}
    if needs_detection and detector is None:
        rows = sorted(int(df.at[i, "row"]) for i in needs_detection)
        raise UserError(
            f"{len(rows)} US row(s) need a detector but no --weights were given "
            f"(rows {_rows_text(rows)}); pass --weights, or --use-boxes with boxes on every US row"
        )

    # Group rows by image so an image listed twice (two lesions) is read and detected once.
    images: dict[str, list[int]] = {}
    for i in boxes:
        images.setdefault(str(df.at[i, "abs_path"]), []).append(i)

    decisions: dict[int, dict] = {}
    dropped: list[int] = []
    with atomic_dir(out_dir, owned_marker="roi_summary.json") as tmp:
        crops = tmp / "crops"
        crops.mkdir()
        paths = list(images)
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            raws = [read_grey(p) for p in chunk]
            detect_idx = [
                k for k, p in enumerate(chunk) if any(i in needs_detection for i in images[p])
            ]
            found: dict[int, Detection | None] = {}
            if detect_idx:
                inputs = [to_uint8(minmax(raws[k], source=chunk[k])) for k in detect_idx]
                results = detector(inputs)  # type: ignore[misc]
                if len(results) != len(inputs):
                    raise RuntimeError("detector returned a different number of results")
                found = dict(zip(detect_idx, results, strict=True))
            for k, p in enumerate(chunk):
                raw = raws[k]
                h, w = raw.shape[:2]
                for i in images[p]:
                    decision = _decide(
                        boxes[i], found.get(k), use_boxes, fallback, w, h, margin, centre_fraction
                    )
                    if decision is None:
                        dropped.append(i)
                        continue
                    x0, y0, x1, y1 = decision["window"]
                    name = f"{safe_name(df.at[i, 'patient_id'])}_r{int(df.at[i, 'row'])}.png"
                    save_png(encode_crop(raw[y0:y1, x0:x1]), crops / name)
                    decision["path"] = f"crops/{name}"
                    decisions[i] = decision

        out_df = _rewrite_manifest(df, decisions, dropped, out_dir)
        counts = Counter(d["roi_source"] for d in decisions.values())
        summary_counts = {s: int(counts.get(s, 0)) for s in ROI_SOURCES}
        summary_counts["dropped"] = len(dropped)
        (tmp / "manifest.csv").write_text(out_df.to_csv(index=False), encoding="utf-8")
        summary = {
            "counts": summary_counts,
            "dropped_rows": sorted(int(df.at[i, "row"]) for i in dropped),
            "margin": margin,
            "fallback": fallback,
            "use_boxes": use_boxes,
            "centre_fraction": centre_fraction,
            **(extra_summary or {}),
        }
        (tmp / "roi_summary.json").write_text(dumps_json(summary), encoding="utf-8")

    dropped_rows = sorted(int(df.at[i, "row"]) for i in dropped)
    if dropped:
        who = ", ".join(
            f"row {int(df.at[i, 'row'])} (patient {df.at[i, 'patient_id']})" for i in dropped
        )
        logger.warning(
            "no lesion detected; dropped %d US row(s) (--fallback drop): %s", len(dropped), who
        )
    return CropResult(out_dir / "manifest.csv", summary_counts, dropped_rows)


def _decide(
    box: tuple[float, float, float, float] | None,
    detection: Detection | None,
    use_boxes: bool,
    fallback: str,
    width: int,
    height: int,
    margin: float,
    centre_fraction: float,
) -> dict | None:
    """The crop window and its provenance for one row; None means drop the row."""
    if use_boxes and box is not None:
        return {
            "window": expand_box(box, width, height, margin),
            "roi_source": "box",
            "roi_confidence": float("nan"),
        }
    if detection is not None:
        return {
            "window": expand_box(detection.box, width, height, margin),
            "roi_source": "detected",
            "roi_confidence": float(detection.confidence),
        }
    if fallback == "drop":
        return None
    window = (
        centre_window(width, height, centre_fraction)
        if fallback == "centre"
        else (
            0,
            0,
            width,
            height,
        )
    )
    return {"window": window, "roi_source": "fallback", "roi_confidence": float("nan")}


def _rewrite_manifest(
    df: pd.DataFrame, decisions: dict[int, dict], dropped: list[int], out_dir: Path
) -> pd.DataFrame:
    """The new manifest: the original columns (paths valid from ``out_dir``) + ROI columns.

    US boxes are moved into crop coordinates (a box is "pixels of that image"); the crop
    window in source pixels and the source path are kept for traceability.
    """
    keep = [c for c in df.columns if c not in DERIVED_COLUMNS and c not in ROI_COLUMNS]
    out = df.loc[~df.index.isin(dropped), keep].copy()
    out["path"] = [relative_path(df.at[i, "abs_path"], out_dir) for i in out.index]
    for col in ROI_COLUMNS:
        out[col] = pd.Series([None] * len(out), index=out.index, dtype=object)
    has_box_col = all(c in df.columns for c in BOX_COLUMNS)
    for i, d in decisions.items():
        x0, y0, x1, y1 = d["window"]
        out.at[i, "path"] = d["path"]
        out.at[i, "roi_source"] = d["roi_source"]
        conf = d["roi_confidence"]
        out.at[i, "roi_confidence"] = None if math.isnan(conf) else round(conf, 6)
        out.at[i, "roi_x0"], out.at[i, "roi_y0"] = x0, y0
        out.at[i, "roi_x1"], out.at[i, "roi_y1"] = x1, y1
        out.at[i, "source_path"] = relative_path(df.at[i, "abs_path"], out_dir)
        if has_box_col:
            box = row_box(df.loc[i])
            moved = box_in_window(box, d["window"]) if box is not None else None
            for col, v in zip(BOX_COLUMNS, moved or (None,) * 4, strict=True):
                out.at[i, col] = None if v is None else round(v, 3)
    return out


def _rows_text(rows: list[int], limit: int = 20) -> str:
    text = ", ".join(str(r) for r in rows[:limit])
    return text + (f" … and {len(rows) - limit} more" if len(rows) > limit else "")
