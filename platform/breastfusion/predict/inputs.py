"""What ``predict`` scores: a manifest (labels optional) or a folder of images.

**Manifest**: the usual CSV (``patient_id, modality, path``, optional ``label``, ``view``,
``laterality``, ``box_x0, box_y0, box_x1, box_y1``); paths relative to the manifest's folder
or absolute. ``label`` may be missing (new patients) or empty for some patients; it must be
``benign``/``malignant`` where given and one per patient. Unlike training (``load_manifest``)
a missing or unreadable image is not an error of the whole file: it gets a per-image status
and its patient is scored from the images that remain.

**Folder**: every image file directly inside it (``.png .jpg .jpeg .tif .tiff .dcm
.dicom``), named ``<patient>_<DM|US>[_<anything>].<ext>``: the patient id is everything
before the *last* ``_DM``/``_US`` token (case-insensitive), e.g. ``P001_US.png``,
``P001_US_2.png``, ``case_7_DM_cc.dcm`` (patient ``case_7``). Unlabelled. An image file
that does not follow the rule is an error naming it (nothing is silently skipped).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.errors import ManifestError, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom")
LABELS = {"benign": 0, "malignant": 1}
BOXES = ("box_x0", "box_y0", "box_x1", "box_y1")
COLUMNS = ["row", "patient_id", "modality", "path", "abs_path", "y", *BOXES]


@dataclass(frozen=True)
class Inputs:
    table: pd.DataFrame  # COLUMNS; y is 0/1 or NaN (unlabelled)
    source: Path

    @property
    def labelled(self) -> bool:
        return bool(len(self.table)) and bool(self.table["y"].notna().all())

    @property
    def patients(self) -> list[str]:
        return list(dict.fromkeys(self.table["patient_id"]))


def read_inputs(path: str | os.PathLike) -> Inputs:
    p = Path(path)
    if p.is_dir():
        return Inputs(_from_folder(p), p)
    return Inputs(_from_manifest(p), p)


def _check(df: pd.DataFrame, source: Path, line: pd.Series) -> None:
    problems = []
    for i in df.index:
        where = f"line {line[i]}"
        if not df.at[i, "patient_id"]:
            problems.append(f"{where}: empty patient_id")
        if df.at[i, "modality"] not in ("DM", "US"):
            problems.append(f"{where}: modality {df.at[i, 'modality']!r} (expected DM or US)")
        if not df.at[i, "path"]:
            problems.append(f"{where}: empty path")
        if df.at[i, "label"] not in ("", *LABELS):
            problems.append(f"{where}: label {df.at[i, 'label']!r} (expected benign, malignant "
                            "or empty)")  # fmt: skip
    given = df[df["label"] != ""]
    for pid, labels in given.groupby("patient_id")["label"]:
        if labels.nunique() > 1:
            problems.append(f"patient {pid}: two labels ({', '.join(sorted(set(labels)))})")
    if problems:
        raise ManifestError(f"{source}: {problems[0]}", details=problems[1:20])


def _from_manifest(path: Path) -> pd.DataFrame:
    from breastfusion.io import read_csv_table

    cols = ("patient_id", "modality", "path", "label")
    raw = read_csv_table(path, what="manifest", str_columns=cols)
    missing = [c for c in ("patient_id", "modality", "path") if c not in raw.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {', '.join(missing)} (expected "
                            "patient_id, modality, path[, label])")  # fmt: skip
    if raw.empty:
        raise ManifestError(f"{path}: the manifest has a header but no rows: nothing to predict")
    df = pd.DataFrame(
        {
            "row": np.arange(len(raw)) + 2,
            "patient_id": raw["patient_id"].astype(str).str.strip(),
            "modality": raw["modality"].astype(str).str.strip().str.upper(),
            "path": raw["path"].astype(str).str.strip(),
            "label": raw["label"].astype(str).str.strip().str.lower() if "label" in raw else "",
        }
    )
    _check(df, path, df["row"])
    base = path.resolve().parent
    df["abs_path"] = [str(p if os.path.isabs(p) else (base / p)) for p in df["path"]]
    for c in BOXES:
        df[c] = pd.to_numeric(raw[c], errors="coerce") if c in raw else np.nan
    return _finish(df)


def parse_name(stem: str) -> tuple[str, str] | None:
    """``(patient_id, modality)`` of a file name stem under the folder rule, or None."""
    tokens = stem.split("_")
    for i in range(len(tokens) - 1, 0, -1):
        if tokens[i].upper() in ("DM", "US"):
            return "_".join(tokens[:i]), tokens[i].upper()
    return None


def _from_folder(folder: Path) -> pd.DataFrame:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UserError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) to predict")
    parsed = [(f, parse_name(f.stem)) for f in files]
    bad = [f.name for f, p in parsed if p is None or not p[0]]
    if bad:
        raise UserError(
            f"{folder}: {len(bad)} image file(s) not named <patient>_<DM|US>[_...].<ext>: "
            + ", ".join(bad[:5])
            + (" ..." if len(bad) > 5 else "")
        )
    df = pd.DataFrame(
        {
            "row": np.arange(len(files)) + 1,
            "patient_id": [p[0] for _, p in parsed],  # type: ignore[index]
            "modality": [p[1] for _, p in parsed],  # type: ignore[index]
            "path": [f.name for f in files],
            "abs_path": [str(f.resolve()) for f in files],
            "label": "",
        }
    )
    for c in BOXES:
        df[c] = np.nan
    return _finish(df)


def _finish(df: pd.DataFrame) -> pd.DataFrame:
    df["y"] = df["label"].map(LABELS).astype(float)
    # A patient labelled on one row is labelled on all (a label belongs to the patient).
    df["y"] = df.groupby("patient_id")["y"].transform("max")
    return df[COLUMNS].reset_index(drop=True)
