"""The manifest: schema, loading and validation with row-level messages.

A manifest is a CSV with one row per image::

    patient_id, modality (DM|US), path, label (benign|malignant)
    [, view, laterality, box_x0, box_y0, box_x1, box_y1] [, any extra columns]

``path`` is relative to the manifest's folder or absolute. Paths must stay inside that folder
(no ``..`` out of it, no absolute path or symbolic link leading elsewhere) unless
``allow_outside`` (the study's ``data.allow_outside``) is set. A box is in pixels of that image
(US boxes train the ROI detector) with slice semantics: ``box_x0``/``box_y0`` inclusive,
``box_x1``/``box_y1`` exclusive, so ``(0, 0, width, height)`` is the whole image and
``image[y0:y1, x0:x1]`` is the lesion. The synthetic generator, the importers, ``roi.crop``
and ``roi.yolo`` all use this convention. Validation collects *every* problem before failing, so a
user fixes a manifest in one round, and each problem names the CSV line (header = line 1),
column, patient and file involved. Patients with a single modality are only a warning:
single-modal models use them, fusion cannot.

Normalisation: surrounding whitespace is stripped, ``modality`` is upper-cased and ``label``
lower-cased, known column names match case-insensitively. ``patient_id`` and extra columns
stay strings verbatim (``"007"`` keeps its zeros); box columns become floats (NaN = no box).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from breastfusion.data.manifest_rows import (  # noqa: F401 (the schema is re-exported)
    BOX_COLUMNS,
    DERIVED_COLUMNS,
    KNOWN_COLUMNS,
    LABEL_TO_Y,
    LABELS,
    MODALITIES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Problem,
    box_geometry_problems,
    box_values,
    duplicate_problems,
    label_conflicts,
    normalise,
    resolve_paths,
    value_problems,
)
from breastfusion.errors import ImageError, ManifestError

_MAX_IDS_IN_WARNING = 20
_IO_THREADS = 4  # file checks wait on disk more than on CPU


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_manifest`.

    ``frame`` (the normalised DataFrame) and ``summary`` are set only when there are no
    problems, so nothing downstream can use a manifest that failed validation.
    """

    path: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: dict | None = None
    frame: pd.DataFrame | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def error(self) -> ManifestError:
        n = len(self.problems)
        return ManifestError(
            f"{self.path}: {n} problem{'s' if n != 1 else ''} in manifest",
            details=[str(p) for p in self.problems],
        )

    def raise_for_problems(self) -> None:
        if self.problems:
            raise self.error()


# --------------------------------------------------------------------------------------------
# Reading the CSV


def _read_rows(path: Path) -> tuple[list[str], list[int], list[list[str]]]:
    """Header, CSV line numbers and records; the csv module keeps exact line numbers
    (pandas drops blank lines and loses them) and reads every field as a string."""
    if not path.exists():
        raise ManifestError("manifest not found")
    if not path.is_file():
        raise ManifestError("manifest is not a regular file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            lines, records = [], []
            start = reader.line_num + 1
            for rec in reader:
                if any(v.strip() for v in rec):  # blank and all-empty lines are skipped
                    lines.append(start)
                    records.append(rec)
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest is not UTF-8 text ({exc.reason})") from exc
    except (OSError, csv.Error) as exc:
        raise ManifestError(f"cannot read manifest ({exc})") from exc
    if header is None or not any(h.strip() for h in header):
        raise ManifestError("manifest is empty (no header line)")
    return header, lines, records


def _canonical_header(header: list[str]) -> list[str]:
    known = {c.lower(): c for c in KNOWN_COLUMNS}
    return [known.get(h.strip().lower(), h.strip()) for h in header]


def _header_problems(header: list[str]) -> list[Problem]:
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        hint = ""
        if len(header) == 1 and any(s in header[0] for s in (";", "\t")):
            hint = " (the file does not look comma-separated)"
        problems.append(
            Problem(
                f"missing required column(s): {', '.join(missing)}; found: "
                f"{', '.join(header) or 'none'}{hint}",
                row=1,
            )
        )
    dups = sorted({h for h in header if header.count(h) > 1})
    for name in dups:
        problems.append(Problem(f"column {name!r} appears more than once", row=1))
    present_boxes = [c for c in BOX_COLUMNS if c in header]
    if present_boxes and len(present_boxes) < len(BOX_COLUMNS):
        absent = [c for c in BOX_COLUMNS if c not in header]
        problems.append(Problem(f"incomplete box columns: missing {', '.join(absent)}", row=1))
    return problems


def _frame(header: list[str], lines: list[int], records: list[list[str]]) -> tuple:
    """Build the string DataFrame; rows with too many fields are problems, short rows padded."""
    width = len(header)
    problems = [
        Problem(f"has {len(rec)} fields but the header has {width}", row=line)
        for line, rec in zip(lines, records, strict=True)
        if len(rec) > width
    ]
    rows = [(rec + [""] * width)[:width] for rec in records]
    df = pd.DataFrame(rows, columns=header, dtype=object)
    # A saved load_manifest frame read back: its derived columns are recomputed, not trusted.
    df = df.drop(columns=[c for c in DERIVED_COLUMNS if c in header])
    df.insert(0, "row", np.asarray(lines, dtype=np.int64))
    return df, problems


# --------------------------------------------------------------------------------------------
# File checks


def _inspect_file(abs_path: str, full: bool) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) or an error reason; ``full`` decodes and min-max checks the pixels."""
    from breastfusion.data import imaging

    try:
        if full:
            arr = imaging.load_normalised(abs_path)
            return (int(arr.shape[1]), int(arr.shape[0])), None
        return imaging.image_size(abs_path), None
    except ImageError as exc:
        return None, exc.message


def _file_problems(
    df: pd.DataFrame, skip: pd.Series, boxes: pd.DataFrame, full: bool
) -> list[Problem]:
    """Check each distinct file once (header read, or full decode) and boxes against its size."""
    todo = df.loc[~skip & (df["abs_path"] != "")]
    unique = list(dict.fromkeys(todo["abs_path"]))
    with ThreadPoolExecutor(max_workers=min(_IO_THREADS, max(1, len(unique)))) as pool:
        results = dict(zip(unique, pool.map(lambda p: _inspect_file(p, full), unique), strict=True))
    problems = []
    has_box = boxes.notna().all(axis=1)
    columns = (todo.index, todo["row"], todo["patient_id"], todo["path"], todo["abs_path"])
    for idx, row, patient, rel, abs_path in zip(*columns, strict=True):
        size, reason = results[abs_path]
        where = dict(row=int(row), patient=patient or None, file=rel)
        if reason is not None:
            problems.append(Problem(f"cannot use image: {reason}", column="path", **where))
        elif has_box[idx]:
            problems += _box_outside(boxes.loc[idx], size, where)
    return problems


def _box_outside(box: pd.Series, size: tuple[int, int], where: dict) -> list[Problem]:
    width, height = size
    x0, y0, x1, y1 = (float(box[c]) for c in BOX_COLUMNS)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        return [
            Problem(
                f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the image "
                f"({width}x{height} pixels)",
                column="box",
                **where,
            )
        ]
    return []


# --------------------------------------------------------------------------------------------
# Summary and warnings


def summarize(df: pd.DataFrame) -> dict:
    """Counts a user checks first: patients per class, images per modality, modality overlap."""
    per_patient = df.groupby("patient_id", sort=False)
    modalities = per_patient["modality"].agg(lambda s: frozenset(s))
    labels = per_patient["label"].first()
    has_box = pd.Series(False, index=df.index)
    if all(c in df.columns for c in BOX_COLUMNS):
        has_box = df[list(BOX_COLUMNS)].notna().all(axis=1)
    return {
        "images": int(len(df)),
        "patients": int(len(modalities)),
        "patients_per_class": {lab: int((labels == lab).sum()) for lab in LABELS},
        "images_per_modality": {m: int((df["modality"] == m).sum()) for m in MODALITIES},
        "patients_both": int(sum(m == {"DM", "US"} for m in modalities)),
        "patients_dm_only": int(sum(m == {"DM"} for m in modalities)),
        "patients_us_only": int(sum(m == {"US"} for m in modalities)),
        "boxes": {m: int((has_box & (df["modality"] == m)).sum()) for m in MODALITIES},
    }


def format_summary(summary: dict) -> str:
    cls, mod, box = (
        summary["patients_per_class"],
        summary["images_per_modality"],
        summary["boxes"],
    )
    return "\n".join(
        [
            f"images: {summary['images']} (DM {mod['DM']}, US {mod['US']})",
            f"patients: {summary['patients']} (benign {cls['benign']}, "
            f"malignant {cls['malignant']})",
            f"patients with both modalities: {summary['patients_both']}; "
            f"only DM: {summary['patients_dm_only']}; only US: {summary['patients_us_only']}",
            f"lesion boxes: DM {box['DM']}, US {box['US']}",
        ]
    )


def _id_list(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_MAX_IDS_IN_WARNING])
    more = len(ids) - _MAX_IDS_IN_WARNING
    return shown + (f" and {more} more" if more > 0 else "")


def _single_modality_warnings(df: pd.DataFrame) -> list[str]:
    modalities = df.groupby("patient_id", sort=False)["modality"].agg(frozenset)
    warnings = []
    for only, other in (("DM", "US"), ("US", "DM")):
        ids = [pid for pid, m in modalities.items() if m == {only}]
        if ids:
            warnings.append(
                f"{len(ids)} patient(s) have only {only} images (no {other}): single-modal "
                f"models use them, fusion models cannot: {_id_list(ids)}"
            )
    return warnings


# --------------------------------------------------------------------------------------------
# Public API


def validate_manifest(
    path: str | os.PathLike, *, check_images: bool = False, allow_outside: bool = False
) -> ValidationReport:
    """Check a manifest and collect every problem and warning (never raises for bad input).

    Without ``check_images`` each file is checked for existence and a readable header (its
    size, for the box checks); with it, every image is fully decoded and min-max checked
    (decode failures, zero-size and constant images). Each distinct file is read once.
    """
    path = Path(path)
    report = ValidationReport(path=path)
    try:
        header, lines, records = _read_rows(path)
    except ManifestError as exc:
        report.problems.append(Problem(exc.message))
        return report
    header = _canonical_header(header)
    report.problems += _header_problems(header)
    if not records:
        report.problems.append(Problem("manifest has a header but no rows"))
    if report.problems:
        return report

    df, shape_problems = _frame(header, lines, records)
    report.problems += shape_problems
    for col in OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = ""
    reused = [c for c in DERIVED_COLUMNS if c in header]
    if reused:
        report.warnings.append(f"column(s) {', '.join(reused)} are derived and were recomputed")
    normalise(df)
    report.problems += value_problems(df)
    report.problems += resolve_paths(df, path.parent.absolute(), allow_outside)
    report.problems += duplicate_problems(df)
    report.problems += label_conflicts(df)
    boxes, box_problems = box_values(df)
    report.problems += box_problems
    report.problems += box_geometry_problems(df, boxes)

    # Rows whose path is unusable or escapes the folder are not opened (nothing to learn).
    flagged = {p.row for p in report.problems if p.column == "path"}
    skip = df["row"].isin(flagged)
    report.problems += _file_problems(df, skip, boxes, full=check_images)
    report.problems.sort(key=lambda p: p.row if p.row is not None else 0)
    if report.problems:
        return report

    report.frame = _finish(df, header, boxes)
    report.summary = summarize(report.frame)
    report.warnings += _single_modality_warnings(report.frame)
    return report


def _finish(df: pd.DataFrame, header: list[str], boxes: pd.DataFrame) -> pd.DataFrame:
    """Column order: the user's (optional ones added), then row, abs_path, y."""
    for c in BOX_COLUMNS:
        df[c] = boxes[c].astype(float)
    df["y"] = df["label"].map(LABEL_TO_Y).astype(np.int64)
    first = [c for c in header if c not in DERIVED_COLUMNS]
    first += [c for c in OPTIONAL_COLUMNS if c not in first]
    out = df[first + list(DERIVED_COLUMNS)].reset_index(drop=True)
    for c in out.columns:
        if c not in BOX_COLUMNS and c not in ("row", "y"):
            out[c] = out[c].astype(str)
    return out


def load_manifest(
    path: str | os.PathLike, *, check_images: bool = False, allow_outside: bool = False
) -> pd.DataFrame:
    """Validated manifest: one row per image plus ``row``, ``abs_path`` and ``y``.

    Raises :class:`~breastfusion.errors.ManifestError` whose ``details`` list every problem.
    """
    report = validate_manifest(path, check_images=check_images, allow_outside=allow_outside)
    report.raise_for_problems()
    assert report.frame is not None
    return report.frame
