"""BUSI (Breast Ultrasound Images, Al-Dhabyani et al., Data in Brief 2020) -> manifest.

Published layout (the authors' zip and its mirrors)::

    Dataset_BUSI_with_GT/
        benign/     benign (1).png, benign (1)_mask.png, benign (4)_mask_1.png, ...
        malignant/  malignant (1).png, malignant (1)_mask.png, ...
        normal/     normal (1).png, normal (1)_mask.png   (empty masks)

437 benign, 210 malignant and 133 normal images from 600 women; 17 images have several
lesions, one ``_mask_N.png`` each. Choices made here:

- modality ``US``; the box is the bounding box of the union of all masks of an image
  (one box per image, as the manifest holds one). An empty or missing mask -> no box,
  reported.
- ``normal`` images have no lesion and are neither benign nor malignant, so by default they
  are left out (counted in the report). ``normal="benign"`` keeps them with label
  ``benign`` (meaning "not malignant") and ``source_class=normal`` so they can be told apart
  later; they never carry a box.
- BUSI has no patient ids, so each image is its own patient unless a mapping CSV
  (``image,patient_id``) says otherwise. Several images of one woman therefore may land in
  different folds: BUSI is known to hold duplicated and near-duplicated images (Pawłowska et
  al., Data in Brief 2023, PMC10293973: 235 duplicates, 8 lesions in both the benign and the
  malignant folder). Pixel-identical copies are found by hash, resized or re-encoded copies
  by a perceptual hash; by default the images of each group of copies become one
  pseudo-patient and groups filed under both labels are excluded (see
  ``importers.duplicates``; on the real BUSI the perceptual hash finds 135 pairs).
- a mapping that puts benign and malignant images on one patient makes that patient
  malignant (one label per patient); ``image_label`` keeps each image's folder label.
- Images are referenced where they are (relative when under the manifest's folder).
"""

from __future__ import annotations

import re
from pathlib import Path

from breastfusion.errors import UserError
from breastfusion.importers.common import (
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

CLASSES = ("benign", "malignant", "normal")
NORMAL_POLICIES = ("exclude", "benign")
_MASK = re.compile(r"^(?P<base>.+)_mask(?:_(?P<n>\d+))?$", re.IGNORECASE)


def find_busi_root(source: Path) -> Path:
    """SOURCE may be ``Dataset_BUSI_with_GT`` itself or a folder holding it."""
    source = check_source_dir(source, "busi")
    for candidate in (source, source / "Dataset_BUSI_with_GT"):
        if candidate.is_dir() and all((candidate / c).is_dir() for c in ("benign", "malignant")):
            return candidate
    found = sorted(p.name for p in source.iterdir() if p.is_dir())
    raise UserError(
        f"busi: {source} does not look like BUSI: expected benign/ and malignant/ folders "
        f"(with normal/) in it or in {source / 'Dataset_BUSI_with_GT'}; "
        f"found folders: {', '.join(found) or 'none'}"
    )


def import_busi(
    source: Path,
    out: Path,
    *,
    normal: str = "exclude",
    patient_map: Path | None = None,
    duplicates: str = "group",
    near_duplicates: str = "group",
) -> ImportReport:
    """Write a US manifest for BUSI at ``out``; returns the report."""
    if normal not in NORMAL_POLICIES:
        raise UserError(
            f"busi: option 'normal' must be one of {', '.join(NORMAL_POLICIES)} (got {normal!r})"
        )
    root = find_busi_root(Path(source))
    mapping = load_patient_map(patient_map) if patient_map else None
    report = ImportReport(format="busi", source=str(root))
    rows: list[Row] = []
    for cls in CLASSES:
        folder = root / cls
        if not folder.is_dir():
            report.warn(f"no {cls}/ folder in {root}")
            continue
        rows += _class_rows(folder, cls, normal, report)
    apply_patient_map(rows, mapping, root, report)
    rows = handle_duplicates(
        rows,
        duplicates,
        report,
        near=near_duplicates,
        name_of=lambda r: f"{r.extra['source_class']}/{r.image.name}",
    )
    if normal == "benign":
        report.notes.append(
            "normal images are kept with label 'benign' (= not malignant) and "
            "source_class=normal; they have no lesion box"
        )
    report.notes.append(
        "BUSI has no patient ids: each image is its own patient unless option 'patient_map' "
        "is given; copies of one image (exact or near, see option 'near_duplicates') are "
        "joined into one patient, as the published set holds duplicates (Pawłowska et al. "
        "2023)"
    )
    write_manifest(rows, Path(out), report, extra_columns=["source_class"])
    return report


def _class_rows(folder: Path, cls: str, normal: str, report: ImportReport) -> list[Row]:
    """The rows of one class folder (boxes from its masks); skips reported."""
    rows = []
    images, masks = _scan_class(folder, report)
    for stem, image in sorted(images.items(), key=lambda kv: _natural(kv[0])):
        report.read += 1
        item = f"{cls}/{image.name}"
        own_masks = masks.pop(stem, [])  # normal/ masks are empty by design: ignored
        if cls == "normal" and normal == "exclude":
            report.skip(item, "normal image (no lesion; excluded by default)")
            continue
        try:
            size = image_dims(image)
        except _ImageProblem:
            report.skip(item, "unreadable image")
            continue
        box = None
        if cls != "normal":
            box, problem = masks_box(own_masks, size)
            if problem:
                report.flag(item, problem)
        label = "benign" if cls == "normal" else cls
        rows.append(
            Row(
                patient_id=f"busi_{safe_id(stem)}",
                modality="US",
                image=image,
                label=label,
                box=box,
                extra={"source_class": cls},
            )
        )
    for _stem, orphan in sorted(masks.items()):
        for m in orphan:
            report.read += 1
            report.skip(f"{cls}/{m.name}", "mask without its image")
    return rows


def _scan_class(
    folder: Path, report: ImportReport
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    images: dict[str, Path] = {}
    masks: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() != ".png":
            report.read += 1
            report.skip(f"{folder.name}/{p.name}", "not a PNG file")
            continue
        m = _MASK.match(p.stem)
        if m:
            masks.setdefault(m.group("base"), []).append(p)
        else:
            images[p.stem] = p
    return images, masks


def _natural(name: str) -> tuple:
    """Sort "benign (2)" before "benign (10)"."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
