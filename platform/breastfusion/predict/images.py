"""Raw input images → the images a bundle's model reads, with a status per image.

Each image is read (``data.imaging.read_grey``) and checked (a constant image cannot be
normalised). US images then go through the bundle's ROI step exactly as the study's
``roi crop`` did: the bundle's own detector on ``roi.geometry.detector_image(raw)``, the crop
rule ``roi.geometry.crop_image`` with the bundle's ``CropSettings``, the crop saved losslessly
as PNG (``roi.crop.save_png``) in a private work folder — so the preprocessing that follows
(the engine's datasets, the bundle's ``PreprocessSpec``) sees the very pixels the study's
model saw. An image that cannot be used gets a status saying why; it never stops the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import ImageError, UserError

log = logging.getLogger(__name__)

OK = "used"
IMAGE_COLUMNS = [
    "row", "patient_id", "modality", "path", "status", "roi_source", "confidence",
    "det_x0", "det_y0", "det_x1", "det_y1", "crop_x0", "crop_y0", "crop_x1", "crop_y1",
]  # fmt: skip
BATCH = 16


@dataclass
class Prepared:
    table: pd.DataFrame  # usable rows: row, patient_id, modality, abs_path, y (for datasets)
    images: pd.DataFrame  # IMAGE_COLUMNS, one row per input row


def load_detector(folder: Path, device: str | None, work_dir: Path) -> tuple[Any, Any]:
    """The bundle's detector and crop rule (``roi.bundle.load_detector``)."""
    from breastfusion.roi.bundle import load_detector as load

    return load(folder, device=device, work_dir=work_dir)


def _read(path: str) -> tuple[np.ndarray | None, str]:
    from breastfusion.data.imaging import minmax, read_grey

    try:
        raw = read_grey(path)
        minmax(raw, source=path)
    except ImageError as exc:
        return None, f"unreadable: {exc}"
    except OSError as exc:
        return None, f"unreadable: {path}: {exc.strerror or exc}"
    return raw, OK


def _record(row: Any, status: str, info: dict[str, Any] | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {c: None for c in IMAGE_COLUMNS}
    rec.update(row=int(row.row), patient_id=row.patient_id, modality=row.modality, path=row.path)
    rec["status"] = status
    if info:
        rec["roi_source"] = info.get("roi_source")
        rec["confidence"] = info.get("confidence")
        for name, box in (("det", info.get("det_box")), ("crop", info.get("window"))):
            if box is not None:
                for k, v in zip(("x0", "y0", "x1", "y1"), box, strict=True):
                    rec[f"{name}_{k}"] = float(v)
    return rec


def _box(row: Any) -> tuple[float, ...] | None:
    values = [getattr(row, c) for c in ("box_x0", "box_y0", "box_x1", "box_y1")]
    return None if any(pd.isna(v) for v in values) else tuple(float(v) for v in values)


class RoiStep:
    """The bundle's ROI step (``mode``: detect | boxes | none) for one prediction run."""

    def __init__(self, roi: dict[str, Any], bundle: Path, work: Path, device: str | None):
        from breastfusion.roi.settings import CropSettings

        self.mode = roi.get("mode", "none")
        self.work = work
        self.detector = None
        self.crop = CropSettings.from_dict(roi.get("crop")) if roi.get("crop") else None
        if self.mode == "detect":
            self.detector, self.crop = load_detector(
                bundle / str(roi["detector"]), device, work / "detector"
            )
        elif self.mode not in ("boxes", "none"):
            raise UserError(f"{bundle}: unknown roi mode {self.mode!r} in metadata.json")

    def detect(self, raws: Sequence[np.ndarray]) -> list[Any]:
        if self.detector is None:
            return [None] * len(raws)
        from breastfusion.roi.geometry import detector_image

        return list(self.detector([detector_image(r) for r in raws]))

    def crop_one(self, row: Any, raw: np.ndarray, found: Any) -> tuple[str | None, dict]:
        """The crop's path (None: not usable) and the crop facts."""
        from breastfusion.data.imaging import minmax
        from breastfusion.roi.crop import save_png
        from breastfusion.roi.geometry import crop_image

        roi = found if self.mode == "detect" else _box(row)
        array, info = crop_image(raw, roi, self.crop)
        if array is None:
            return None, {**info, "status": "dropped: no lesion found (roi fallback: drop)"}
        try:
            minmax(array, source=f"US crop of line {row.row}")
        except ImageError:
            return None, {**info, "status": "unusable: the US crop is a constant image"}
        path = self.work / "crops" / f"r{int(row.row)}.png"
        save_png(array, path)
        return str(path), {**info, "status": OK}


def prepare(table: pd.DataFrame, modalities: Sequence[str], step: RoiStep) -> Prepared:
    """Read, check and (US) crop the rows of ``modalities``; the others are 'not used'."""
    records: dict[int, dict[str, Any]] = {}
    usable: list[dict[str, Any]] = []
    wanted = {m.upper() for m in modalities}
    rows = list(table.itertuples(index=False))
    for row in rows:
        if row.modality not in wanted:
            records[row.row] = _record(
                row, f"not used: this model reads {'+'.join(sorted(wanted))}"
            )
    todo = [r for r in rows if r.modality in wanted]
    for start in range(0, len(todo), BATCH):
        chunk = todo[start : start + BATCH]
        read = [_read(r.abs_path) for r in chunk]
        crop_us = step.mode != "none"
        need = [
            i for i, (raw, _) in enumerate(read) if raw is not None and chunk[i].modality == "US"
        ]
        found = (
            dict(zip(need, step.detect([read[i][0] for i in need]), strict=True)) if crop_us else {}
        )
        for i, row in enumerate(chunk):
            raw, status = read[i]
            path, info = row.abs_path, None
            if raw is not None and row.modality == "US" and crop_us:
                path, info = step.crop_one(row, raw, found.get(i))
                status = info.pop("status")
            records[row.row] = _record(row, status, info)
            if status == OK:
                y = 0 if pd.isna(row.y) else int(row.y)
                usable.append({"row": row.row, "patient_id": row.patient_id,
                               "modality": row.modality, "abs_path": path, "y": y})  # fmt: skip
    images = pd.DataFrame([records[r.row] for r in rows], columns=IMAGE_COLUMNS)
    cols = ["row", "patient_id", "modality", "abs_path", "y"]
    return Prepared(pd.DataFrame(usable, columns=cols), images)
