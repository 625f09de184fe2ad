"""mini-MIAS (Mammographic Image Analysis Society MiniMammographic Database) -> manifest.

Published layout (``all-mias.tar.gz`` and its mirrors): 322 films ``mdb001.pgm`` ..
``mdb322.pgm`` (8-bit PGM, 1024 x 1024, 200 micron) and ``Info.txt``, one line per
abnormality, optionally after a header line::

    REFNUM BG CLASS SEVERITY X Y RADIUS
    mdb001 G CIRC B 535 425 197
    mdb003 D NORM
    mdb005 F CIRC B 477 133 30
    mdb005 F CIRC B 500 168 26

From the distribution's README: BG is F/G/D (fatty, fatty-glandular, dense-glandular);
CLASS is CALC, CIRC, SPIC, MISC, ARCH, ASYM or NORM; SEVERITY B or M (none for NORM);
X, Y is the centre of the abnormality and RADIUS the radius of a circle enclosing it,
**with the origin at the bottom-left corner**; widely distributed calcifications have no
coordinates; "the list is arranged in pairs of films, where each pair represents the left
(even filename numbers) and right mammograms (odd filename numbers) of a single patient".

Choices made here:

- one manifest row per film (the manifest holds one row per image). The label is the most
  severe abnormality's (any M -> malignant; films with both are reported). The box is the
  union of the circles' bounding boxes of the abnormalities that carry that label, converted
  to top-left pixel rows (``row = height - y``) and clipped to the image; when one of them
  has no coordinates the film gets no box (a partial box would miss a lesion).
- the manifest holds one label per patient, so a pair with one malignant film makes both
  films ``malignant``; each film's own finding stays in ``image_label`` (see
  ``common.harmonise_patient_labels``).
- NORM films have no severity: excluded by default, or kept as ``benign`` (= not
  malignant, ``source_class=NORM``) with ``normal="benign"``.
- patient id per film pair: mdb001 (right) and mdb002 (left) -> ``mias_001-002``;
  laterality R for odd, L for even numbers. The README does not state the view, so
  ``view`` stays empty.
- the PGM files are referenced as they are (PIL reads PGM); ``convert_png=True`` writes
  PNG copies under ``<manifest folder>/mini-mias-png/`` instead, for readers without PGM
  (all at once with the manifest; an existing folder of that name is replaced only if an
  earlier import wrote it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from breastfusion.errors import UserError
from breastfusion.importers.common import (
    ImportReport,
    Row,
    _ImageProblem,
    check_output_file,
    check_source_dir,
    image_dims,
    union_boxes,
    write_manifest,
)
from breastfusion.io import atomic_dir

CLASSES = frozenset({"CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM"})
TISSUES = frozenset({"F", "G", "D"})
NORMAL_POLICIES = ("exclude", "benign")
EXPECTED_SIZE = (1024, 1024)
_REF = re.compile(r"^mdb(\d{3})$", re.IGNORECASE)
_IMAGE_SUFFIXES = (".pgm", ".png", ".tif", ".tiff", ".jpg", ".jpeg")
_PNG_MARKER = ".breastfusion-mini-mias-png"


@dataclass(frozen=True)
class Abnormality:
    """One line of Info.txt (coordinates in the file's bottom-left-origin system)."""

    refnum: str
    tissue: str
    cls: str
    severity: str | None
    x: float | None = None
    y: float | None = None
    radius: float | None = None
    line: int = 0

    @property
    def has_coordinates(self) -> bool:
        return None not in (self.x, self.y, self.radius)


def parse_info(path: Path, report: ImportReport | None = None) -> list[Abnormality]:
    """Parse Info.txt; malformed lines are reported (or raise when no report is given)."""
    out: list[Abnormality] = []
    text = Path(path).read_text(encoding="latin-1")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split()
        if not tokens or tokens[0].upper() == "REFNUM":
            continue
        problem = None
        ref = tokens[0].lower()
        if not _REF.match(ref):
            problem = f"REFNUM {tokens[0]!r} is not mdbNNN"
        elif len(tokens) < 3:
            problem = "fewer than 3 columns"
        elif tokens[1].upper() not in TISSUES:
            problem = f"unknown background tissue {tokens[1]!r}"
        elif tokens[2].upper() not in CLASSES:
            problem = f"unknown class {tokens[2]!r}"
        if problem:
            msg = f"{path.name} line {lineno}: {problem}"
            if report is None:
                raise UserError(msg)
            report.read += 1
            report.skip(f"line {lineno}", "malformed Info.txt line")
            report.warn(msg)
            continue
        cls = tokens[2].upper()
        severity = tokens[3].upper() if len(tokens) > 3 else None
        if severity not in (None, "B", "M"):
            msg = f"{path.name} line {lineno}: unknown severity {tokens[3]!r}"
            if report is None:
                raise UserError(msg)
            report.read += 1
            report.skip(f"line {lineno}", "malformed Info.txt line")
            report.warn(msg)
            continue
        coords = _numbers(tokens[4:7])
        x, y, r = coords if coords is not None else (None, None, None)
        out.append(Abnormality(ref, tokens[1].upper(), cls, severity, x, y, r, lineno))
    return out


def _numbers(tokens: list[str]) -> tuple[float, float, float] | None:
    if len(tokens) < 3:
        return None
    try:
        x, y, r = (float(t) for t in tokens[:3])
    except ValueError:  # e.g. "*NOTE" markers instead of coordinates
        return None
    return x, y, r


def circle_box(a: Abnormality, width: int, height: int) -> tuple[int, int, int, int]:
    """Half-open top-left-origin box of the abnormality's circle, clipped to the image.

    MIAS measures Y up from the bottom edge, so the image row of the centre is
    ``height - y``.
    """
    assert a.x is not None and a.y is not None and a.radius is not None
    cx, cy, r = a.x, height - a.y, a.radius
    x0 = max(0, int(round(cx - r)))
    y0 = max(0, int(round(cy - r)))
    x1 = min(width, int(round(cx + r)))
    y1 = min(height, int(round(cy + r)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def find_info(source: Path) -> Path:
    source = check_source_dir(source, "mini-mias")
    hits = sorted(p for p in source.rglob("*") if p.is_file() and p.name.lower() == "info.txt")
    if not hits:
        raise UserError(
            f"mini-mias: no Info.txt under {source} (the mini-MIAS distribution ships "
            "Info.txt next to mdb001.pgm ... mdb322.pgm)"
        )
    if len(hits) > 1:
        raise UserError(
            f"mini-mias: several Info.txt under {source}; point SOURCE at the one to use",
            details=[str(h) for h in hits],
        )
    return hits[0]


def import_mini_mias(
    source: Path,
    out: Path,
    *,
    normal: str = "exclude",
    convert_png: bool = False,
) -> ImportReport:
    """Write a DM manifest for mini-MIAS at ``out``; returns the report."""
    if normal not in NORMAL_POLICIES:
        raise UserError(
            f"mini-mias: option 'normal' must be one of {', '.join(NORMAL_POLICIES)} (got {normal!r})"
        )
    source = Path(source)
    info = find_info(source)
    report = ImportReport(format="mini-mias", source=str(source))
    abnormalities = parse_info(info, report)
    images = _index_images(source)
    if not images:
        raise UserError(f"mini-mias: no mdbNNN image files (.pgm) under {source}")
    by_ref: dict[str, list[Abnormality]] = {}
    for a in abnormalities:
        by_ref.setdefault(a.refnum, []).append(a)
    for ref in sorted(set(images) - set(by_ref)):
        report.read += 1
        report.skip(images[ref].name, "image not listed in Info.txt")

    out = Path(out)
    png_dir = out.parent / "mini-mias-png"
    rows: list[Row] = []
    mixed = []
    for ref in sorted(by_ref):
        report.read += 1
        row = _film_row(ref, by_ref[ref], images.get(ref), normal, mixed, report)
        if row is not None:
            rows.append(row)
    if mixed:
        report.warn(
            f"{len(mixed)} film(s) list benign and malignant abnormalities; labelled "
            f"malignant, box around the malignant ones ({', '.join(mixed[:5])})"
        )
    if normal == "benign":
        report.notes.append("NORM films kept with label 'benign' (= not malignant), no box")
    report.notes.append(
        "one row per film; patient = film pair (odd = right, even = left); "
        "boxes converted from MIAS's bottom-left origin"
    )
    columns = ["source_class", "tissue"]
    if not convert_png:
        write_manifest(rows, out, report, extra_columns=columns)
        return report
    check_output_file(out)
    # The copies appear all at once, with the manifest, or not at all; a folder of that name
    # that an earlier import did not write is refused, never replaced.
    with atomic_dir(png_dir, owned_marker=_PNG_MARKER) as tmp:
        rows = _convert_rows(rows, tmp, png_dir, report)
        (tmp / _PNG_MARKER).write_text("PNG copies written by breastfusion import mini-mias\n")
        write_manifest(rows, out, report, extra_columns=columns)
    return report


def _film_row(
    ref: str,
    items: list[Abnormality],
    image: Path | None,
    normal: str,
    mixed: list[str],
    report: ImportReport,
) -> Row | None:
    """The row of one film (label from its most severe finding, box from its circles)."""
    if image is None:
        report.skip(ref, "listed in Info.txt but no image file")
        return None
    lesions = [a for a in items if a.cls != "NORM"]
    if not lesions:
        if normal == "exclude":
            report.skip(ref, "NORM film (no severity; excluded by default)")
            return None
        label, carriers = "benign", []
    else:
        if any(a.severity is None for a in lesions):
            report.skip(ref, "abnormality without severity")
            return None
        severities = {a.severity for a in lesions}
        if severities == {"B", "M"}:
            mixed.append(ref)
        label = "malignant" if "M" in severities else "benign"
        want = "M" if label == "malignant" else "B"
        carriers = [a for a in lesions if a.severity == want]
    try:
        width, height = image_dims(image)
    except _ImageProblem:
        report.skip(image.name, "unreadable image")
        return None
    if (width, height) != EXPECTED_SIZE:
        report.flag(image.name, f"not {EXPECTED_SIZE[0]}x{EXPECTED_SIZE[1]} as published")
    box = None
    if carriers:
        if all(a.has_coordinates for a in carriers):
            box = union_boxes(circle_box(a, width, height) for a in carriers)
        else:
            report.flag(ref, "abnormality without coordinates: no box")
    number = int(_REF.match(ref).group(1))  # type: ignore[union-attr]
    first = number if number % 2 == 1 else number - 1
    return Row(
        patient_id=f"mias_{first:03d}-{first + 1:03d}",
        modality="DM",
        image=image,
        label=label,
        laterality="R" if number % 2 == 1 else "L",
        box=box,
        extra={"source_class": ";".join(sorted({a.cls for a in items})), "tissue": items[0].tissue},
    )


def _convert_rows(rows: list[Row], tmp: Path, png_dir: Path, report: ImportReport) -> list[Row]:
    """PNG copies in ``tmp``; rows then point to their final place in ``png_dir``."""
    kept = []
    for r in rows:
        try:
            name = _convert(r.image, tmp)
        except (OSError, ValueError):  # PIL: truncated or undecodable pixel data
            (tmp / f"{r.image.stem.lower()}.png").unlink(missing_ok=True)
            report.skip(r.image.name, "unreadable image")
            continue
        r.image = png_dir / name
        kept.append(r)
    return kept


def _index_images(source: Path) -> dict[str, Path]:
    """mdbNNN -> file, preferring the published PGM when converted copies sit beside it."""
    found: dict[str, Path] = {}
    for p in sorted(source.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in _IMAGE_SUFFIXES:
            continue
        if not _REF.match(p.stem):
            continue
        ref = p.stem.lower()
        old = found.get(ref)
        if old is None or (
            _IMAGE_SUFFIXES.index(p.suffix.lower()) < _IMAGE_SUFFIXES.index(old.suffix.lower())
        ):
            found[ref] = p
    return found


def _convert(image: Path, folder: Path) -> str:
    """Write an 8/16-bit grey PNG copy into ``folder`` (same pixels, lossless); its name."""
    from PIL import Image

    name = f"{image.stem.lower()}.png"
    with Image.open(image) as im:
        (im if im.mode in ("L", "I;16", "I") else im.convert("L")).save(folder / name, "PNG")
    return name
