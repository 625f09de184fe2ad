"""The detector's training data: which patients, and the YOLO data-set folder.

Light (numpy, pandas, Pillow): exporting the data set needs neither torch nor ultralytics, so
it is tested on its own. :data:`DETECTOR_POLICY` is written to the detector's
``metrics.json`` and ``patients.json``; see :func:`plan_detector_patients`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.manifest import BOX_COLUMNS
from breastfusion.errors import ConfigError, ManifestError, UserError
from breastfusion.io import dumps_json
from breastfusion.roi.files import row_box, safe_name, save_png
from breastfusion.roi.geometry import detector_image

CLASS_NAME = "lesion"
DETECTOR_POLICY: dict[str, str] = {
    "classes": (
        f"one class, '{CLASS_NAME}': the detector localises lesions and never sees benign/"
        "malignant labels"
    ),
    "train": "development patients (not in the holdout) with US boxes, minus the detector-"
    "validation slice",
    "validation": "a seeded, label-stratified slice of development patients "
    "(roi.train.val_fraction); "
    "ultralytics also selects best.pt on it, so its metrics are mildly optimistic",
    "holdout": "holdout patients are never used: not for training, validation or metrics, so "
    "their crops come from a detector that has never seen them",
    "evaluation_folds": "cross-validation fold patients are development patients, so their "
    "boxes are in the detector's training data. Boxes are localisation annotations, not the "
    "benign/malignant labels, so no label leaks; but crops of fold-validation patients may be "
    "slightly better localised than crops of unseen patients, which can make fold estimates "
    "mildly optimistic about ROI quality. Holdout estimates are unaffected. Removing this "
    "would need one detector per fold (K times the cost).",
}


@dataclass(frozen=True)
class DetectorPatients:
    """Which patients' boxes train and validate the detector, and which are kept out."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    excluded_holdout: tuple[str, ...]
    splits_used: bool


def box_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The US rows of a loaded manifest that carry a complete box."""
    if not all(c in df.columns for c in BOX_COLUMNS):
        return df.iloc[0:0]
    us = df[df["modality"].astype(str).str.upper().eq("US")]
    return us[us[list(BOX_COLUMNS)].notna().all(axis=1)]


def plan_detector_patients(
    df: pd.DataFrame,
    holdout: Sequence[str] = (),
    *,
    splits_used: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DetectorPatients:
    """Split the patients with US boxes into detector-train and detector-validation sets.

    Holdout patients are removed first and never used. The remaining (development) patients
    are split by patient, stratified by the patient's label so both sets hold benign and
    malignant lesions (their appearance differs), with a seeded permutation of sorted ids so
    the split does not depend on manifest order. See :data:`DETECTOR_POLICY`.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"roi.train.val_fraction must be in (0, 1), got {val_fraction}")
    rows = box_rows(df)
    if rows.empty:
        raise ManifestError(
            "no US rows with a complete box (box_x0, box_y0, box_x1, box_y1) in the manifest: "
            "the detector has nothing to learn from"
        )
    held = {str(p) for p in holdout}
    patients = rows.groupby(rows["patient_id"].astype(str))["y"].max()
    excluded = tuple(sorted(p for p in patients.index if p in held))
    dev = patients[~patients.index.isin(held)]
    if len(dev) < 2:
        raise UserError(
            f"only {len(dev)} development patient(s) have US boxes; the detector needs at "
            "least 2 (one to train, one to validate)"
        )
    rng = np.random.default_rng(seed)
    n_val_total = min(max(1, round(val_fraction * len(dev))), len(dev) - 1)
    groups = {c: sorted(dev.index[dev == c]) for c in sorted(dev.unique())}
    # Largest-remainder allocation of the validation slots over the classes.
    quotas = {c: n_val_total * len(g) / len(dev) for c, g in groups.items()}
    alloc = {c: int(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (alloc[c] - quotas[c], c))[
        : n_val_total - sum(alloc.values())
    ]:
        alloc[c] += 1
    val: list[str] = []
    for c, ids in groups.items():
        perm = rng.permutation(len(ids))
        val.extend(ids[j] for j in perm[: alloc[c]])
    val_set = set(val)
    train = tuple(sorted(p for p in dev.index if p not in val_set))
    return DetectorPatients(train, tuple(sorted(val_set)), excluded, splits_used)


@dataclass(frozen=True)
class ExportSummary:
    data_yaml: Path
    n_images: dict[str, int]
    n_boxes: dict[str, int]
    n_patients: dict[str, int]


def yolo_label(box: Sequence[float], width: int, height: int) -> tuple[float, ...] | None:
    """A pixel box as YOLO's normalised (cx, cy, w, h), clipped to the image; None if empty."""
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def _label_lines(group: pd.DataFrame, width: int, height: int, abs_path: str) -> list[str]:
    """One YOLO label line per manifest row of an image (full precision)."""
    lines = []
    for _, r in group.iterrows():
        label = yolo_label(row_box(r), width, height)  # type: ignore[arg-type]
        if label is None:
            raise ManifestError(
                f"row {int(r['row'])} (patient {r['patient_id']}): box "
                f"{tuple(r[c] for c in BOX_COLUMNS)} lies outside the "
                f"{width}x{height} image {abs_path}"
            )
        lines.append("0 " + " ".join(format(v, ".17g") for v in label))
    return lines


def _write_description(out: Path, patients: DetectorPatients) -> Path:
    data_yaml = out / "data.yaml"
    # No 'path:' key: ultralytics then resolves train/val against the yaml's own folder.
    data_yaml.write_text(
        "# YOLO data set exported by breastfusion roi train\n"
        f"train: images/train\nval: images/val\nnc: 1\nnames:\n  0: {CLASS_NAME}\n",
        encoding="utf-8",
    )
    record = {
        "train": list(patients.train),
        "val": list(patients.val),
        "excluded_holdout": list(patients.excluded_holdout),
        "splits_used": patients.splits_used,
        "policy": DETECTOR_POLICY,
    }
    (out / "patients.json").write_text(dumps_json(record), encoding="utf-8")
    return data_yaml


def export_yolo_dataset(
    df: pd.DataFrame, out_dir: str | os.PathLike, patients: DetectorPatients
) -> ExportSummary:
    """Write ``images/{train,val}``, ``labels/{train,val}``, ``data.yaml`` and ``patients.json``.

    Images are what the detector sees at crop time (``geometry.detector_image``: our reader's
    min-max normalised grey as 8-bit PNG, whatever the source format: 16-bit, DICOM, RGB).
    Rows that share an image (several lesions) become one image with several label lines.
    ``data.yaml`` uses paths relative to itself, so the folder can be moved.
    """
    from breastfusion.data.imaging import read_grey

    out = Path(out_dir)
    rows = box_rows(df)
    where = {p: "train" for p in patients.train} | {p: "val" for p in patients.val}
    n_images = {"train": 0, "val": 0}
    n_boxes = {"train": 0, "val": 0}
    for part in ("train", "val"):
        (out / "images" / part).mkdir(parents=True, exist_ok=True)
        (out / "labels" / part).mkdir(parents=True, exist_ok=True)
    for abs_path, group in rows.groupby("abs_path", sort=True):
        pids = set(group["patient_id"].astype(str))
        if len(pids) > 1:
            raise ManifestError(
                f"{abs_path}: one image listed for several patients ({', '.join(sorted(pids))})"
            )
        part = where.get(pids.pop())
        if part is None:  # holdout patient, or not planned
            continue
        group = group.sort_values("row")
        image = detector_image(read_grey(abs_path), source=str(abs_path))
        lines = _label_lines(group, image.shape[1], image.shape[0], str(abs_path))
        stem = f"{safe_name(group.iloc[0]['patient_id'])}_r{int(group.iloc[0]['row'])}"
        save_png(image, out / "images" / part / f"{stem}.png")
        (out / "labels" / part / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        n_images[part] += 1
        n_boxes[part] += len(lines)
    return ExportSummary(
        _write_description(out, patients),
        n_images,
        n_boxes,
        {"train": len(patients.train), "val": len(patients.val)},
    )
