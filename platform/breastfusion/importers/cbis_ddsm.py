"""CBIS-DDSM (Curated Breast Imaging Subset of DDSM, TCIA) -> manifest.

Published layout: four description CSVs, one row per abnormality::

    mass_case_description_train_set.csv   mass_case_description_test_set.csv
    calc_case_description_train_set.csv   calc_case_description_test_set.csv

with columns ``patient_id``, ``breast_density`` (mass) / ``breast density`` (calc),
``left or right breast`` (LEFT/RIGHT), ``image view`` (CC/MLO), ``abnormality id``,
``abnormality type``, ``pathology`` (MALIGNANT, BENIGN, BENIGN_WITHOUT_CALLBACK),
``image file path``, ``cropped image file path``, ``ROI mask file path``. The image paths
look like ``Mass-Training_P_00001_LEFT_CC/<study UID>/<series UID>/000000.dcm``, but a TCIA
download (NBIA Data Retriever, "classic" layout) stores that image as
``CBIS-DDSM/Mass-Training_P_00001_LEFT_CC/07-20-2016-DDSM-74994/1.000000-full mammogram
images-24515/1-1.dcm``: only the leading folder (the TCIA Subject ID) matches.

Choices made here:

- one row per full mammogram, keyed by the image path's leading folder: the several
  abnormalities of an image collapse into one row. An image whose abnormalities disagree
  (benign and malignant) is labelled **malignant** (a malignant finding on the film makes
  the film malignant) and reported. BENIGN_WITHOUT_CALLBACK counts as benign.
- one label per patient (the manifest's rule): a woman with any malignant image is
  malignant on all her rows; the image's own label stays in ``image_label``.
- the same breast view can appear in both the mass and the calc CSVs (TCIA stores it twice,
  as ``Mass-...`` and ``Calc-...``); those are merged into one row by (patient, side, view)
  unless ``merge_views=False``.
- ``patient_id`` is the CSV's (``P_00001``), shared by mass and calc rows of one woman.
  ``source_split`` keeps the CSV's train/test origin; a patient present in both is reported
  (the official split is per abnormality type, not per patient).
- image resolution: the CSV path as written under the image root (or its ``CBIS-DDSM/``),
  else the folder named like the path's leading component, anywhere under the root; inside
  it the single ``.dcm`` (or the one under a "full mammogram" series). Anything else is
  reported as unresolved and left out.
- modality ``DM``; view CC/MLO; laterality L/R; no boxes (the ROI masks are separate
  DICOMs and not read here).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from breastfusion.errors import UserError
from breastfusion.importers.common import ImportReport, Row, check_source_dir, write_manifest

CSV_FILES: dict[str, tuple[str, str]] = {
    "mass_case_description_train_set.csv": ("mass", "train"),
    "mass_case_description_test_set.csv": ("mass", "test"),
    "calc_case_description_train_set.csv": ("calc", "train"),
    "calc_case_description_test_set.csv": ("calc", "test"),
}
PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}
REQUIRED = ("patient id", "left or right breast", "image view", "pathology", "image file path")
ABNORMALITY_CHOICES = ("both", "mass", "calc")


def _norm(column: str) -> str:
    """`breast_density` and `breast density` are the same column in the mass/calc CSVs."""
    return " ".join(column.replace("_", " ").strip().lower().split())


@dataclass
class _Image:
    key: str  # leading folder of the CSV path, e.g. Mass-Training_P_00001_LEFT_CC
    patient_id: str
    laterality: str
    view: str
    csv_path: str
    labels: set[str] = field(default_factory=set)
    kinds: set[str] = field(default_factory=set)
    splits: set[str] = field(default_factory=set)
    abnormalities: int = 0


class DicomIndex:
    """Folder-name index of the image root, built once (one walk, no per-row globbing)."""

    def __init__(self, root: Path):
        self.root = root
        self.dirs: dict[str, list[Path]] = defaultdict(list)
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                self.dirs[d].append(Path(dirpath) / d)

    def resolve(self, csv_path: str) -> tuple[Path | None, str]:
        """(file, "") or (None, reason)."""
        rel = csv_path.strip().replace("\\", "/").strip("/")
        if not rel:
            return None, "empty image file path"
        for base in (self.root, self.root / "CBIS-DDSM"):
            candidate = base / rel
            if candidate.is_file():
                return candidate, ""
        lead = rel.split("/")[0]
        folders = self.dirs.get(lead, [])
        if not folders:
            return None, "image folder not found"
        if len(folders) > 1:
            return None, "image folder name is not unique"
        dicoms = sorted(folders[0].rglob("*.dcm"))
        if len(dicoms) > 1:
            full = [d for d in dicoms if "full mammogram" in d.parent.name.lower()]
            dicoms = full or dicoms
        if not dicoms:
            return None, "no DICOM in the image folder"
        if len(dicoms) > 1:
            return None, "several DICOMs in the image folder"
        return dicoms[0], ""


def find_csvs(csv_dir: Path, abnormality: str) -> dict[Path, tuple[str, str]]:
    names = {n: v for n, v in CSV_FILES.items() if abnormality in ("both", v[0])}
    found: dict[Path, tuple[str, str]] = {}
    for p in sorted(csv_dir.rglob("*.csv")):
        info = names.get(p.name.lower())
        if info is None:
            continue
        if info in found.values():
            raise UserError(f"cbis-ddsm: several copies of {p.name} under {csv_dir}")
        found[p] = info
    return found


def import_cbis_ddsm(
    source: Path,
    out: Path,
    *,
    images: Path | None = None,
    abnormality: str = "both",
    merge_views: bool = True,
) -> ImportReport:
    """Write a DM manifest for CBIS-DDSM at ``out``.

    ``source`` holds the description CSVs (searched recursively); ``images`` is the DICOM
    root (default: ``source``).
    """
    if abnormality not in ABNORMALITY_CHOICES:
        raise UserError(
            "cbis-ddsm: option 'abnormality' must be one of "
            f"{', '.join(ABNORMALITY_CHOICES)} (got {abnormality!r})"
        )
    source = check_source_dir(Path(source), "cbis-ddsm")
    image_root = (
        check_source_dir(Path(images), "cbis-ddsm", "option 'images'") if images else source
    )
    csvs = find_csvs(source, abnormality)
    if not csvs:
        wanted = [n for n, v in CSV_FILES.items() if abnormality in ("both", v[0])]
        raise UserError(
            f"cbis-ddsm: none of the description CSVs under {source}",
            details=wanted,
        )
    report = ImportReport(format="cbis-ddsm", source=str(source))
    missing = sorted(
        n for n, v in CSV_FILES.items() if abnormality in ("both", v[0]) and v not in csvs.values()
    )
    if missing:
        report.warn(f"description CSV(s) not found: {', '.join(missing)}")

    by_key: dict[str, _Image] = {}
    for path, (kind, split) in csvs.items():
        _read_csv(path, kind, split, by_key, report)

    groups: dict[tuple[str, str, str], list[_Image]] = defaultdict(list)
    for img in by_key.values():
        key = (img.patient_id, img.laterality, img.view) if merge_views else (img.key, "", "")
        groups[key].append(img)

    index = DicomIndex(image_root)
    rows: list[Row] = []
    conflicts: list[str] = []
    patient_splits: dict[str, set[str]] = defaultdict(set)
    for key in sorted(groups):
        report.read += 1
        members = sorted(groups[key], key=lambda m: m.key)
        made = _view_row(members, index, report)
        if made is None:
            continue
        row, labels, splits = made
        if len(labels) > 1:
            conflicts.append(members[0].key)
        patient_splits[row.patient_id] |= splits
        rows.append(row)
    if conflicts:
        report.warn(
            f"{len(conflicts)} image(s) with benign and malignant abnormalities: labelled "
            f"malignant ({', '.join(conflicts[:5])})"
        )
    both = sorted(p for p, s in patient_splits.items() if len(s) > 1)
    if both:
        report.warn(
            f"{len(both)} patient(s) appear in both the train and the test CSVs "
            f"({', '.join(both[:5])}); split on patients, not on source_split"
        )
    report.notes.append(
        "one row per full mammogram; conflicting pathologies -> malignant; "
        "BENIGN_WITHOUT_CALLBACK -> benign; no boxes"
    )
    write_manifest(
        rows,
        Path(out),
        report,
        extra_columns=["source_split", "abnormality_type", "abnormalities", "source_image"],
    )
    return report


def _view_row(
    members: list[_Image], index: DicomIndex, report: ImportReport
) -> tuple[Row, set[str], set[str]] | None:
    """(row, labels, source splits) for the CSV images merged into one view (the first
    resolvable file is used), or None when no file resolves (a skip)."""
    resolved, reasons = None, []
    for m in members:
        file, reason = index.resolve(m.csv_path)
        if file is not None:
            resolved = file
            break
        reasons.append(reason)
    if resolved is None:
        report.skip(members[0].key, f"unresolved image path: {reasons[0]}")
        return None
    labels = set().union(*(m.labels for m in members))
    splits = set().union(*(m.splits for m in members))
    row = Row(
        patient_id=members[0].patient_id,
        modality="DM",
        image=resolved,
        label="malignant" if "malignant" in labels else "benign",
        view=members[0].view,
        laterality=members[0].laterality,
        extra={
            "source_split": "+".join(sorted(splits, reverse=True)),
            "abnormality_type": "+".join(sorted(set().union(*(m.kinds for m in members)))),
            "abnormalities": str(sum(m.abnormalities for m in members)),
            "source_image": ";".join(m.key for m in members),
        },
    )
    return row, labels, splits


def _read_csv(
    path: Path, kind: str, split: str, by_key: dict[str, _Image], report: ImportReport
) -> None:
    try:
        _read_rows(path, kind, split, by_key, report)
    except UnicodeDecodeError as exc:
        raise UserError(f"cbis-ddsm: {path} is not UTF-8 text ({exc.reason})") from None
    except (OSError, csv.Error) as exc:
        raise UserError(f"cbis-ddsm: cannot read {path} ({exc})") from None


def _read_rows(
    path: Path, kind: str, split: str, by_key: dict[str, _Image], report: ImportReport
) -> None:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise UserError(f"cbis-ddsm: {path} is empty") from None
        columns = {_norm(c): i for i, c in enumerate(header)}
        absent = [c for c in REQUIRED if c not in columns]
        if absent:
            raise UserError(
                f"cbis-ddsm: {path} lacks column(s) {', '.join(repr(c) for c in absent)} "
                f"(found: {', '.join(header)})"
            )
        for lineno, values in enumerate(reader, start=2):
            if not any(v.strip() for v in values):
                continue
            rec = {c: (values[i].strip() if i < len(values) else "") for c, i in columns.items()}
            item = f"{path.name}:{lineno}"
            report.read += 1  # undone below once the row joins an image (counted there)
            pathology = PATHOLOGY.get(rec["pathology"].upper())
            if pathology is None:
                report.skip(item, f"unknown pathology {rec['pathology']!r}")
                continue
            side = {"LEFT": "L", "RIGHT": "R"}.get(rec["left or right breast"].upper())
            view = rec["image view"].upper()
            if side is None or view not in ("CC", "MLO"):
                report.skip(item, "unknown breast side or view")
                continue
            csv_path = rec["image file path"].strip().strip('"')
            lead = csv_path.replace("\\", "/").strip("/").split("/")[0]
            if not rec["patient id"] or not lead:
                report.skip(item, "empty patient_id or image file path")
                continue
            img = by_key.get(lead)
            if img is None:
                img = by_key[lead] = _Image(lead, rec["patient id"], side, view, csv_path)
            elif (img.patient_id, img.laterality, img.view) != (rec["patient id"], side, view):
                report.skip(item, "image listed with another patient, side or view")
                continue
            report.read -= 1
            img.labels.add(pathology)
            img.kinds.add(kind)
            img.splits.add(split)
            img.abnormalities += 1
