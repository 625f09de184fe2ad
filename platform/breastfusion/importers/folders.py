"""A generic folder layout -> manifest: ``ROOT/<label>/**/<image>`` with optional masks.

``<label>`` is ``benign`` or ``malignant`` (case-insensitive); other folders are reported
and left out. Images are PNG, JPEG, TIFF, BMP, PGM or DICOM, found at any depth below the
label folder. With ``mask_suffix`` (e.g. ``_mask``), ``x_mask.png`` and ``x_mask_1.png``
are masks of ``x.<ext>`` in the same folder, and the image's box is the bounding box of
their union. Patient id = file stem unless a mapping CSV (``image,patient_id``) is given.
Exact and near-duplicate images are handled as in the BUSI importer
(``importers.duplicates``): by default each group of copies becomes one patient.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from breastfusion.errors import UserError
from breastfusion.importers.common import (
    IMAGE_SUFFIXES,
    LABELS,
    ImportReport,
    Row,
    _ImageProblem,
    apply_patient_map,
    check_source_dir,
    image_dims,
    load_patient_map,
    masks_box,
    safe_id,
    write_manifest,
)
from breastfusion.importers.duplicates import handle_duplicates

MODALITIES = ("DM", "US")


def import_folders(
    source: Path,
    out: Path,
    *,
    modality: str,
    mask_suffix: str | None = None,
    patient_map: Path | None = None,
    duplicates: str = "group",
    near_duplicates: str = "group",
) -> ImportReport:
    """Write a manifest for ``source/<label>/...`` at ``out``; returns the report."""
    modality = modality.upper()
    if modality not in MODALITIES:
        raise UserError(
            f"folders: option 'modality' must be one of {', '.join(MODALITIES)} (got {modality!r})"
        )
    root = check_source_dir(Path(source), "folders")
    label_dirs = _label_dirs(root)
    mapping = load_patient_map(patient_map) if patient_map else None
    report = ImportReport(format="folders", source=str(root))
    mask_re = (
        re.compile(rf"^(?P<base>.+){re.escape(mask_suffix)}(?:_\d+)?$") if mask_suffix else None
    )
    rows: list[Row] = []
    for name, folder in label_dirs.items():
        if name not in LABELS:
            _skip_folder(folder, root, report)
            continue
        images, masks = _scan(folder, root, mask_re, report)
        for key, image in images.items():
            row = _row(image, root, name, modality, masks.pop(key, []), mask_re, report)
            if row is not None:
                rows.append(row)
        for _key, orphan in sorted(masks.items()):
            for m in orphan:
                report.read += 1
                report.skip(m.relative_to(root).as_posix(), "mask without its image")
    if mapping is None:
        shared = [pid for pid, n in Counter(r.patient_id for r in rows).items() if n > 1]
        if shared:
            report.warn(
                f"{len(shared)} file stem(s) occur more than once and are treated as one "
                f"patient each ({', '.join(sorted(shared)[:5])})"
            )
    apply_patient_map(rows, mapping, root, report)
    rows = handle_duplicates(
        rows,
        duplicates,
        report,
        near=near_duplicates,
        name_of=lambda r: r.image.relative_to(root).as_posix(),
    )
    write_manifest(rows, Path(out), report)
    return report


def _label_dirs(root: Path) -> dict[str, Path]:
    label_dirs = {
        p.name.lower(): p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }
    if not any(lbl in label_dirs for lbl in LABELS):
        raise UserError(
            f"folders: {root} has no benign/ or malignant/ folder (expected ROOT/<label>/*.png); "
            f"found folders: {', '.join(sorted(label_dirs)) or 'none'}"
        )
    return label_dirs


def _skip_folder(folder: Path, root: Path, report: ImportReport) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            report.read += 1
            report.skip(
                p.relative_to(root).as_posix(),
                f"folder '{folder.name}' is not a label (benign|malignant)",
            )


def _scan(
    folder: Path, root: Path, mask_re: re.Pattern | None, report: ImportReport
) -> tuple[dict[Path, Path], dict[Path, list[Path]]]:
    """Images by (dir/stem) and their mask files, at any depth below a label folder."""
    images: dict[Path, Path] = {}
    masks: dict[Path, list[Path]] = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(root).as_posix()
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            report.read += 1
            report.skip(rel, f"unsupported file type '{p.suffix or '(none)'}'")
            continue
        m = mask_re.match(p.stem) if mask_re else None
        if m:
            masks.setdefault(p.parent / m.group("base"), []).append(p)
            continue
        key = p.parent / p.stem
        report.read += 1
        if key in images:
            report.skip(rel, f"second image with the stem of {images[key].name}")
            continue
        images[key] = p
    return images, masks


def _row(
    image: Path,
    root: Path,
    label: str,
    modality: str,
    masks: list[Path],
    mask_re: re.Pattern | None,
    report: ImportReport,
) -> Row | None:
    rel = image.relative_to(root).as_posix()
    try:
        size = image_dims(image)
    except _ImageProblem:
        report.skip(rel, "unreadable image")
        return None
    box = None
    if mask_re is not None:
        box, problem = masks_box(masks, size)
        if problem:
            report.flag(rel, problem)
    return Row(patient_id=safe_id(image.stem), modality=modality, image=image, label=label, box=box)
