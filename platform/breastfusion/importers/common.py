"""Shared pieces of the importers: rows, manifest writing, boxes, ids and patient maps.

Every importer turns a public data set's own layout into the manifest contract
(``patient_id, modality, path, label, view, laterality, box_x0..box_y1``; see
CONTRIBUTING.md) and says what it read, what it skipped and why. Boxes are half-open pixel
boxes of the image they belong to: ``box_x1``/``box_y1`` are one past the last lesion
column/row, so a mask covering the whole image gives ``(0, 0, width, height)``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from breastfusion.data.imaging import box_of, union_boxes  # noqa: F401 (re-exported)
from breastfusion.data.manifest import BOX_COLUMNS, KNOWN_COLUMNS, LABELS  # noqa: F401
from breastfusion.data.near_duplicates import PAIR_COLUMNS, pairs_csv_text
from breastfusion.errors import OutputError, UserError
from breastfusion.importers.report import ImportReport
from breastfusion.io import atomic_write_text, portable_path

log = logging.getLogger(__name__)

# The manifest contract is owned by data/manifest.py; re-exported here for the importers.
MANIFEST_COLUMNS: tuple[str, ...] = KNOWN_COLUMNS
RASTER_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm"}
)
IMAGE_SUFFIXES: frozenset[str] = RASTER_SUFFIXES | {".dcm"}

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# rows and writing


@dataclass
class Row:
    """One manifest row before writing; ``extra`` holds format-specific columns."""

    patient_id: str
    modality: str
    image: Path
    label: str
    view: str = ""
    laterality: str = ""
    box: Box | None = None
    extra: dict[str, str] = field(default_factory=dict)


def manifest_path(image: Path, manifest_dir: Path) -> str:
    """The path to store: relative (POSIX) when the image lies under the manifest's folder.

    Otherwise absolute, so the manifest never holds ``..`` segments (which break when the
    manifest is moved and hide where the data really is). See ``io.portable_path``.
    """
    return portable_path(image, manifest_dir)


def harmonise_patient_labels(rows: Sequence[Row], report: ImportReport) -> None:
    """One label per patient, as the manifest requires: malignant if any image is.

    The study predicts per patient, and a woman with a malignant finding in one image is a
    malignant case; her other images (a benign film of the other breast, a normal view)
    take that label. The image's own finding stays in the ``image_label`` column and each
    relabelled row is counted in the report.
    """
    malignant = {r.patient_id for r in rows if r.label == "malignant"}
    for r in rows:
        r.extra.setdefault("image_label", r.label)
        if r.label != "malignant" and r.patient_id in malignant:
            report.flag(r.image.name, "relabelled malignant: the patient has a malignant image")
            r.label = "malignant"


def write_manifest(
    rows: Sequence[Row],
    out: Path,
    report: ImportReport,
    extra_columns: Sequence[str] = (),
) -> Path:
    """Write the manifest CSV atomically and fill the report's totals."""
    if not rows:
        raise UserError(
            f"{report.format}: nothing to write from {report.source}: no usable image "
            f"({report.n_skipped} skipped)",
            details=[f"{n} × {reason}" for reason, n in report.skipped.most_common()],
        )
    out = Path(out)
    check_output_file(out)
    harmonise_patient_labels(rows, report)
    manifest_dir = out.parent if str(out.parent) else Path(".")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    extra = ["image_label", *extra_columns]
    columns = list(MANIFEST_COLUMNS) + [c for c in extra if c not in MANIFEST_COLUMNS]
    writer.writerow(columns)
    for r in rows:
        box = [str(v) for v in r.box] if r.box is not None else ["", "", "", ""]
        values = [
            r.patient_id,
            r.modality,
            manifest_path(r.image, manifest_dir),
            r.label,
            r.view,
            r.laterality,
            *box,
        ] + [r.extra.get(c, "") for c in columns[len(MANIFEST_COLUMNS) :]]
        writer.writerow(values)
    _write_near_duplicates(out, report)
    atomic_write_text(out, buf.getvalue())  # last: the file later stages trust
    report.out = str(out)
    report.written = len(rows)
    report.labels = dict(Counter(r.label for r in rows))
    report.patients = len({r.patient_id for r in rows})
    report.boxes = sum(r.box is not None for r in rows)
    return out


NEAR_COLUMNS = (*PAIR_COLUMNS, "action", "patient")


def check_output_file(path: Path) -> None:
    """Refuse an output file that cannot be one, before anything is written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create folder {path.parent}: {parent} is a file")
            break


def near_duplicates_path(manifest: Path) -> Path:
    """Where the near-duplicate pairs of an imported manifest are listed."""
    return manifest.with_name(f"{manifest.stem}.near_duplicates.csv")


def _write_near_duplicates(out: Path, report: ImportReport) -> None:
    """List the pairs next to the manifest; with the check off, remove a stale list of ours
    (one left by an earlier import would describe another manifest)."""
    path = near_duplicates_path(out)
    if report.near_duplicates != "off":
        atomic_write_text(path, pairs_csv_text(report.near_duplicate_pairs, NEAR_COLUMNS))
        report.near_duplicates_csv = str(path)
        return
    try:
        with open(path, encoding="utf-8") as fh:
            ours = fh.readline().rstrip("\n") == ",".join(NEAR_COLUMNS)
    except (OSError, UnicodeDecodeError):
        return
    if ours:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# images, masks and boxes


def read_pixels(path: Path) -> np.ndarray:
    """Grey float32 pixels through the project's reader (so PGM, 16-bit, DICOM all work)."""
    from breastfusion.data.imaging import read_grey
    from breastfusion.errors import ImageError

    try:
        return read_grey(path)
    except ImageError as exc:
        raise _ImageProblem(str(exc)) from exc


class _ImageProblem(Exception):
    """An unreadable file: importers turn it into a skip with a reason, not a crash."""


def image_dims(path: Path) -> tuple[int, int]:
    """(width, height) from the header only, through the project's reader."""
    from breastfusion.data.imaging import image_size
    from breastfusion.errors import ImageError

    try:
        return image_size(path)
    except ImageError as exc:
        raise _ImageProblem(str(exc)) from exc


def mask_foreground(array: np.ndarray) -> np.ndarray:
    """Boolean foreground of a mask: non-zero grey (any non-zero colour has non-zero luma)."""
    return np.asarray(array) != 0


def masks_box(masks: Sequence[Path], image_size: tuple[int, int]) -> tuple[Box | None, str]:
    """Box around the union of several mask files of one image, or (None, reason).

    A mask of another size than its image cannot be placed on it: that image gets no box
    rather than a box in the wrong coordinates.
    """
    if not masks:
        return None, "no mask file: no box"
    union: np.ndarray | None = None
    for mask in masks:
        try:
            fg = mask_foreground(read_pixels(mask))
        except _ImageProblem:
            return None, "unreadable mask: no box"
        if (fg.shape[1], fg.shape[0]) != tuple(image_size):
            return None, "mask size differs from the image: no box"
        union = fg if union is None else (union | fg)
    box = None if union is None else box_of(union)
    return box, "" if box is not None else "empty mask: no box"


# --------------------------------------------------------------------------------------------
# ids and mapping files


def safe_id(text: str) -> str:
    """A patient id without spaces or brackets ("benign (12)" -> "benign_12")."""
    out = re.sub(r"[^0-9A-Za-z._-]+", "_", text).strip("_")
    return out or "unnamed"


def load_patient_map(path: Path) -> dict[str, str]:
    """Read an image -> patient mapping CSV (columns ``image`` and ``patient_id``).

    ``image`` may be the file name, its stem, or its path relative to SOURCE; all three are
    looked up, so the user can write whichever is at hand.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"patient mapping file not found: {path}")
    try:
        return _read_patient_map(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: the patient mapping is not UTF-8 text ({exc.reason})") from None
    except (OSError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read the patient mapping ({exc})") from None


def _read_patient_map(path: Path) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        image_col = next((f for f in ("image", "path", "file", "filename") if f in fields), None)
        if image_col is None or "patient_id" not in fields:
            raise UserError(
                f"{path}: a patient mapping needs the columns 'image' and 'patient_id' "
                f"(found: {', '.join(fields) or 'none'})"
            )
        mapping: dict[str, str] = {}
        problems: list[str] = []
        for lineno, rec in enumerate(reader, start=2):
            rec = {(k or "").strip(): (v or "").strip() for k, v in rec.items()}
            key, pid = rec.get(image_col, ""), rec.get("patient_id", "")
            if not key or not pid:
                problems.append(f"line {lineno}: empty {image_col!r} or 'patient_id'")
                continue
            key = key.replace("\\", "/")
            if key in mapping and mapping[key] != pid:
                problems.append(f"line {lineno}: {key!r} maps to both {mapping[key]!r} and {pid!r}")
            mapping[key] = pid
    if problems:
        raise UserError(f"{path}: invalid patient mapping", details=problems)
    if not mapping:
        raise UserError(f"{path}: the patient mapping is empty")
    return mapping


def lookup_patient(mapping: dict[str, str], image: Path, source: Path) -> str | None:
    try:
        rel = image.relative_to(source).as_posix()
    except ValueError:
        rel = image.name
    for key in (rel, image.name, image.stem):
        if key in mapping:
            return mapping[key]
    return None


def apply_patient_map(
    rows: list[Row], mapping: dict[str, str] | None, source: Path, report: ImportReport
) -> None:
    """Replace default patient ids by the mapping's; unmapped images keep their own id."""
    if mapping is None:
        return
    unmapped = []
    for r in rows:
        pid = lookup_patient(mapping, r.image, source)
        if pid is None:
            unmapped.append(r.image.name)
        else:
            r.patient_id = pid
    if unmapped:
        report.warn(
            f"{len(unmapped)} image(s) are not in the patient mapping and stay their own "
            f"patient (e.g. {', '.join(unmapped[:3])})"
        )


def check_source_dir(source: Path, what: str, role: str = "SOURCE") -> Path:
    """The folder an importer reads; ``role`` names it (SOURCE or an option)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{what}: {role} {source} does not exist")
    if not source.is_dir():
        raise UserError(f"{what}: {role} {source} is not a folder")
    return source
