"""Shared pieces of the importers: the report, manifest writing, boxes, ids and duplicates.

Every importer turns a public data set's own layout into the manifest contract
(``patient_id, modality, path, label, view, laterality, box_x0..box_y1``; see
CONTRIBUTING.md) and says what it read, what it skipped and why. Boxes are half-open pixel
boxes of the image they belong to: ``box_x1``/``box_y1`` are one past the last lesion
column/row, so a mask covering the whole image gives ``(0, 0, width, height)``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from breastfusion.data.imaging import box_of, union_boxes  # noqa: F401 (re-exported)
from breastfusion.data.manifest import BOX_COLUMNS, KNOWN_COLUMNS, LABELS  # noqa: F401
from breastfusion.errors import UserError
from breastfusion.io import atomic_write_text, portable_path

log = logging.getLogger(__name__)

# The manifest contract is owned by data/manifest.py; re-exported here for the importers.
MANIFEST_COLUMNS: tuple[str, ...] = KNOWN_COLUMNS
RASTER_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm"}
)
IMAGE_SUFFIXES: frozenset[str] = RASTER_SUFFIXES | {".dcm"}
DUPLICATE_POLICIES: tuple[str, ...] = ("group", "drop", "warn")

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------------
# the report


@dataclass
class ImportReport:
    """What an import read, wrote, skipped (with reasons) and warned about.

    ``read == written + n_skipped``: every item examined is either a manifest row or a
    skip with a reason (for CBIS-DDSM an item is a distinct image, or a CSV row rejected
    before it could name one). ``flagged`` rows are written but incomplete (e.g. no box).

    ``skipped`` maps a short reason to how many items it cost; ``skipped_items`` keeps the
    item names (first ``max_items`` per reason) so a user can look at them.
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
    near_duplicate_pairs: list[tuple[str, str, int]] = field(default_factory=list)
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
            "near_duplicate_pairs": [list(p) for p in self.near_duplicate_pairs],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """Human-readable lines for the terminal."""
        labels = ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())) or "none"
        lines = [
            f"{self.format}: read {self.read}, wrote {self.written} rows "
            f"({labels}; {self.patients} patients; {self.boxes} with a box) to {self.out}",
        ]
        if self.skipped:
            lines.append(f"skipped {self.n_skipped}:")
            for reason, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])):
                examples = self.skipped_items.get(reason, [])[:3]
                more = f" (e.g. {', '.join(examples)})" if examples else ""
                lines.append(f"  {n:5d}  {reason}{more}")
        if self.flagged:
            lines.append(f"kept with issues {sum(self.flagged.values())}:")
            for reason, n in sorted(self.flagged.items(), key=lambda kv: (-kv[1], kv[0])):
                examples = self.flagged_items.get(reason, [])[:3]
                more = f" (e.g. {', '.join(examples)})" if examples else ""
                lines.append(f"  {n:5d}  {reason}{more}")
        if self.duplicate_groups:
            lines.append(f"exact duplicates: {len(self.duplicate_groups)} groups")
            for group in self.duplicate_groups[:5]:
                lines.append("  " + " == ".join(group))
        if self.near_duplicate_pairs:
            lines.append(f"near duplicates (perceptual hash): {len(self.near_duplicate_pairs)}")
            for a, b, d in self.near_duplicate_pairs[:5]:
                lines.append(f"  {a} ~ {b} (distance {d})")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


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
    harmonise_patient_labels(rows, report)
    out = Path(out)
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
    atomic_write_text(out, buf.getvalue())
    report.out = str(out)
    report.written = len(rows)
    report.labels = dict(Counter(r.label for r in rows))
    report.patients = len({r.patient_id for r in rows})
    report.boxes = sum(r.box is not None for r in rows)
    return out


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


# --------------------------------------------------------------------------------------------
# duplicates


def pixel_hash(path: Path) -> str:
    """SHA-256 of the decoded pixels (and shape): re-encoded copies still match."""
    arr = np.ascontiguousarray(read_pixels(path))
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def dhash(path: Path, size: int = 8) -> int:
    """Difference hash (64 bits): cheap perceptual hash for near-duplicate hints."""
    from PIL import Image

    arr = read_pixels(path).astype(np.float32)
    im = Image.fromarray(arr).resize((size + 1, size), Image.Resampling.BILINEAR)
    small = np.asarray(im)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def handle_duplicates(
    rows: list[Row],
    policy: str,
    report: ImportReport,
    *,
    near: bool = False,
    near_threshold: int = 4,
    name_of=lambda r: r.image.name,
) -> list[Row]:
    """Find pixel-identical images and apply the policy; returns the rows to keep.

    Duplicates across patients leak between train and test folds, so the default ``group``
    merges the patients holding copies into one (the first copy's id; copies stay, but all
    land in one fold).
    ``drop`` keeps only the first copy; ``warn`` only reports. Copies whose labels disagree
    (BUSI has lesions in both its benign and malignant folders) carry no trustworthy label:
    under ``group`` and ``drop`` they are all removed and reported.
    Near duplicates (difference hash within ``near_threshold`` bits) are only reported:
    ultrasound frames look alike, so a perceptual match is a hint, not proof.
    """
    if policy not in DUPLICATE_POLICIES:
        raise UserError(f"--duplicates must be one of {', '.join(DUPLICATE_POLICIES)}")
    hashes: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        try:
            hashes.setdefault(pixel_hash(r.image), []).append(i)
        except _ImageProblem:
            continue  # the row's own image check reports unreadable files
    drop: set[int] = set()
    parent: dict[str, str] = {}  # union-find over patient ids joined by shared images

    def root(pid: str) -> str:
        while parent.get(pid, pid) != pid:
            pid = parent[pid]
        return pid

    for idx in hashes.values():
        if len(idx) < 2:
            continue
        group = [rows[i] for i in idx]
        report.duplicate_groups.append([name_of(r) for r in group])
        labels = {r.label for r in group}
        if policy == "warn":
            continue
        if len(labels) > 1:
            for i in idx:
                drop.add(i)
                report.skip(name_of(rows[i]), "exact duplicate with conflicting labels")
            continue
        if policy == "drop":
            for i in idx[1:]:
                drop.add(i)
                report.skip(name_of(rows[i]), "exact duplicate (dropped; first copy kept)")
        else:  # group: every patient holding a copy becomes one patient
            first = root(group[0].patient_id)
            for r in group[1:]:
                other = root(r.patient_id)
                if other != first:
                    parent[other] = first
    if parent:
        for r in rows:
            r.patient_id = root(r.patient_id)
    if report.duplicate_groups:
        report.warn(
            f"{len(report.duplicate_groups)} group(s) of pixel-identical images (policy '{policy}')"
        )
    kept = [r for i, r in enumerate(rows) if i not in drop]
    if near:
        _near_duplicates(kept, report, near_threshold, name_of)
    return kept


def _near_duplicates(rows: list[Row], report: ImportReport, threshold: int, name_of) -> None:
    codes: list[int] = []
    names: list[str] = []
    for r in rows:
        try:
            codes.append(dhash(r.image))
            names.append(name_of(r))
        except _ImageProblem:
            continue
    if len(codes) < 2:
        return
    # 64-bit codes as 8 bytes -> bit matrix; pairwise Hamming distance by XOR popcount.
    exact = {name: gi for gi, g in enumerate(report.duplicate_groups) for name in g}
    bits = np.unpackbits(np.array(codes, dtype=np.uint64).view(np.uint8).reshape(-1, 8), axis=1)
    for i in range(len(codes) - 1):
        dist = np.count_nonzero(bits[i + 1 :] != bits[i], axis=1)
        for j in np.flatnonzero(dist <= threshold):
            a, b = names[i], names[i + 1 + j]
            if a in exact and exact.get(b) == exact[a]:
                continue  # already reported as an exact duplicate
            report.near_duplicate_pairs.append((a, b, int(dist[j])))
    if report.near_duplicate_pairs:
        report.warn(
            f"{len(report.near_duplicate_pairs)} near-duplicate pair(s) by perceptual hash "
            "(reported only; check them by eye)"
        )


def check_source_dir(source: Path, what: str) -> Path:
    source = Path(source)
    if not source.exists():
        raise UserError(f"{what}: SOURCE {source} does not exist")
    if not source.is_dir():
        raise UserError(f"{what}: SOURCE {source} is not a folder")
    return source
