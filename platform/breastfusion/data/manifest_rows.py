"""Row-level manifest checks and the column schema (see ``data.manifest``).

Each check takes the normalised string frame and returns ``Problem``s naming the CSV line,
column, patient and file, so validation can collect every problem before failing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS = ("patient_id", "modality", "path", "label")
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")
OPTIONAL_COLUMNS = ("view", "laterality", *BOX_COLUMNS)
KNOWN_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
# Added by load_manifest; recomputed if a saved frame is read back as a manifest.
DERIVED_COLUMNS = ("row", "abs_path", "y")
MODALITIES = ("DM", "US")
LABELS = ("benign", "malignant")
LABEL_TO_Y = {"benign": 0, "malignant": 1}


@dataclass(frozen=True)
class Problem:
    """One manifest problem; ``str()`` gives the user-facing line."""

    message: str
    row: int | None = None
    column: str | None = None
    patient: str | None = None
    file: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column:
            where.append(f"column {self.column}")
        if self.patient is not None:
            where.append(f"patient {self.patient!r}")
        if self.file:
            where.append(f"file {self.file!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


# --------------------------------------------------------------------------------------------
# Row checks (vectorised over the frame)


def _problems_where(
    df: pd.DataFrame, mask: pd.Series, column: str | None, message, file: bool = False
) -> list[Problem]:
    """One Problem per row where ``mask``; ``message`` is a str or a function of the row."""
    out = []
    # Only the known columns: extra column names need not be valid identifiers.
    for rec in df.loc[mask, ["row", *KNOWN_COLUMNS]].itertuples(index=False):
        r = rec._asdict()
        text = message(r) if callable(message) else message
        out.append(
            Problem(
                text,
                row=int(r["row"]),
                column=column,
                patient=r["patient_id"] or None,
                file=(r["path"] or None) if file else None,
            )
        )
    return out


def normalise(df: pd.DataFrame) -> None:
    for col in df.columns:
        if col in KNOWN_COLUMNS:
            df[col] = df[col].astype(str).str.strip()
    df["modality"] = df["modality"].str.upper()
    df["label"] = df["label"].str.lower()


def value_problems(df: pd.DataFrame) -> list[Problem]:
    problems = _problems_where(df, df["patient_id"] == "", "patient_id", "empty patient id")
    problems += _problems_where(
        df,
        ~df["modality"].isin(MODALITIES),
        "modality",
        lambda r: (
            "empty modality (expected DM or US)"
            if not r["modality"]
            else f"unknown modality {r['modality']!r} (expected DM or US)"
        ),
    )
    problems += _problems_where(
        df,
        ~df["label"].isin(LABELS),
        "label",
        lambda r: (
            "empty label (expected benign or malignant)"
            if not r["label"]
            else f"unknown label {r['label']!r} (expected benign or malignant)"
        ),
    )
    problems += _problems_where(df, df["path"] == "", "path", "empty path")
    return problems


def resolve_paths(df: pd.DataFrame, base: Path, allow_outside: bool) -> list[Problem]:
    """Fill ``abs_path``; refuse paths that lead out of the manifest's folder.

    Out means: a relative path climbing out via ``..``, an absolute path elsewhere, or a
    path (or a folder on it) that is a symbolic link resolving elsewhere. A manifest whose
    images lie elsewhere silently changes meaning when it is copied or the link moves, so
    this needs the explicit ``data.allow_outside`` setting.
    """
    base = Path(os.path.abspath(base))
    real_base = os.path.realpath(base)
    abs_paths, reasons = [], []
    for p in df["path"]:
        absolute = bool(p) and os.path.isabs(p)
        abs_path = os.path.normpath(p if absolute else os.path.join(base, p)) if p else ""
        abs_paths.append(abs_path)
        reasons.append(
            None if allow_outside or not p else _outside_reason(p, abs_path, base, real_base)
        )
    df["abs_path"] = abs_paths
    bad = pd.Series([r is not None for r in reasons], index=df.index)
    by_row = dict(zip(df["row"], reasons, strict=True))
    return _problems_where(
        df,
        bad,
        "path",
        lambda r: f"{by_row[r['row']]} (set data.allow_outside to permit it)",
        file=True,
    )


def _outside_reason(path: str, abs_path: str, base: Path, real_base: str) -> str | None:
    real = os.path.realpath(abs_path)
    if _within(real, real_base):
        return None
    if _within(abs_path, str(base)) or _within(abs_path, real_base):
        return f"resolves through a symbolic link to {real}, outside the manifest's folder {base}"
    if not os.path.isabs(path):
        return f"relative path leaves the manifest's folder {base} via '..'"
    return f"absolute path outside the manifest's folder {base}"


def _within(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive, or a mix of absolute and relative
        return False


def duplicate_problems(df: pd.DataFrame) -> list[Problem]:
    valid = df[df["abs_path"] != ""]
    dup = valid[valid.duplicated("abs_path", keep=False)]
    if dup.empty:
        return []
    keys = [c for c in KNOWN_COLUMNS if c in df.columns and c != "path"] + ["abs_path"]
    problems = []
    for _, group in dup.groupby("abs_path", sort=False):
        first = group.iloc[0]
        for _, r in group.iloc[1:].iterrows():
            same = all(r[k] == first[k] for k in keys)
            what = "duplicate of row" if same else "same file as row"
            problems.append(
                Problem(
                    f"{what} {int(first['row'])} (each image must be listed once)",
                    row=int(r["row"]),
                    column="path",
                    patient=r["patient_id"] or None,
                    file=r["path"],
                )
            )
    return problems


def label_conflicts(df: pd.DataFrame) -> list[Problem]:
    ok = df[(df["patient_id"] != "") & df["label"].isin(LABELS)]
    counts = ok.groupby("patient_id", sort=False)["label"].nunique()
    problems = []
    for pid in counts.index[counts > 1]:
        rows = ok[ok["patient_id"] == pid]
        parts = [
            f"{label} ({_rows_text(g['row'])})" for label, g in rows.groupby("label", sort=True)
        ]
        problems.append(
            Problem(
                f"conflicting labels: {'; '.join(parts)}",
                row=int(rows["row"].iloc[0]),
                column="label",
                patient=pid,
            )
        )
    return problems


def _rows_text(rows: Iterable[int]) -> str:
    rows = [str(r) for r in rows]
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(rows)


def box_values(df: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """Parse box columns to floats; report partially filled and non-numeric boxes."""
    problems: list[Problem] = []
    filled = pd.DataFrame({c: df[c] != "" for c in BOX_COLUMNS})
    n_filled = filled.sum(axis=1)
    partial = (n_filled > 0) & (n_filled < len(BOX_COLUMNS))
    problems += _problems_where(
        df,
        partial,
        "box",
        lambda r: (
            "box partially filled: "
            + ", ".join(c for c in BOX_COLUMNS if not r[c])
            + " empty (fill all four or none)"
        ),
    )
    values = pd.DataFrame(index=df.index)
    for c in BOX_COLUMNS:
        num = pd.to_numeric(df[c].where(df[c] != ""), errors="coerce").astype(float)
        bad = filled[c] & ~np.isfinite(num)
        problems += _problems_where(df, bad, c, lambda r, c=c: f"{r[c]!r} is not a number")
        values[c] = num.where(~bad)
    return values, problems


def box_geometry_problems(df: pd.DataFrame, boxes: pd.DataFrame) -> list[Problem]:
    complete = boxes.notna().all(axis=1)
    x0, y0, x1, y1 = (boxes[c] for c in BOX_COLUMNS)
    inverted = complete & ((x1 < x0) | (y1 < y0))
    empty = complete & ~inverted & ((x1 == x0) | (y1 == y0))
    problems = _problems_where(
        df,
        inverted,
        "box",
        lambda r: f"inverted box ({_box_text(r)}): need box_x0 < box_x1 and box_y0 < box_y1",
        file=True,
    )
    problems += _problems_where(
        df, empty, "box", lambda r: f"empty box with zero area ({_box_text(r)})", file=True
    )
    return problems


def _box_text(r: dict) -> str:
    return ", ".join(f"{c}={r[c]}" for c in BOX_COLUMNS)
