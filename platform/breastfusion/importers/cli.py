"""``breastfusion import FORMAT SOURCE --out MANIFEST``: public data sets -> manifest CSV.

Thin: parses options, checks that each given option applies to the format, calls the
format's typed importer, prints its report. Importers live in the sibling modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from breastfusion.errors import UserError
from breastfusion.importers.common import check_output_file
from breastfusion.importers.duplicates import DUPLICATE_POLICIES, NEAR_POLICIES
from breastfusion.importers.report import ImportReport

FORMATS = ("busi", "mini-mias", "cbis-ddsm", "folders")

# option -> formats it applies to (anything else given explicitly is a user error)
_APPLIES: dict[str, tuple[str, ...]] = {
    "normal": ("busi", "mini-mias"),
    "patient_map": ("busi", "folders"),
    "duplicates": ("busi", "folders"),
    "near_duplicates": ("busi", "folders"),
    "convert_png": ("mini-mias",),
    "images": ("cbis-ddsm",),
    "abnormality": ("cbis-ddsm",),
    "merge_views": ("cbis-ddsm",),
    "modality": ("folders",),
    "mask_suffix": ("folders",),
}


def run_import(fmt: str, source: Path, out: Path, **options) -> ImportReport:
    """Dispatch to the format's importer (imported lazily: each pulls only what it needs)."""
    if fmt == "busi":
        from breastfusion.importers.busi import import_busi

        return import_busi(
            source,
            out,
            normal=options.get("normal") or "exclude",
            patient_map=options.get("patient_map"),
            duplicates=options.get("duplicates") or "group",
            near_duplicates=options.get("near_duplicates") or "group",
        )
    if fmt == "mini-mias":
        from breastfusion.importers.mini_mias import import_mini_mias

        return import_mini_mias(
            source,
            out,
            normal=options.get("normal") or "exclude",
            convert_png=bool(options.get("convert_png")),
        )
    if fmt == "cbis-ddsm":
        from breastfusion.importers.cbis_ddsm import import_cbis_ddsm

        return import_cbis_ddsm(
            source,
            out,
            images=options.get("images"),
            abnormality=options.get("abnormality") or "both",
            merge_views=options.get("merge_views", True),
        )
    if fmt == "folders":
        modality = options.get("modality")
        if not modality:
            raise UserError("folders: --modality DM|US is required")
        from breastfusion.importers.folders import import_folders

        return import_folders(
            source,
            out,
            modality=modality,
            mask_suffix=options.get("mask_suffix"),
            patient_map=options.get("patient_map"),
            duplicates=options.get("duplicates") or "group",
            near_duplicates=options.get("near_duplicates") or "group",
        )
    raise UserError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


_OPTION = re.compile(r"option '([a-z_]+)'")


def _as_flags(text: str) -> str:
    """The importers name their options (``option 'near_duplicates'``); here they are flags."""
    return _OPTION.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


@click.command("import")
@click.argument("fmt", metavar="FORMAT", type=click.Choice(FORMATS, case_sensitive=False))
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Manifest CSV to write (atomically).",
)
@click.option(
    "--normal",
    type=click.Choice(["exclude", "benign"]),
    default=None,
    help="busi, mini-mias: leave normal images out (default) or keep them as 'benign'.",
)
@click.option(
    "--patient-map",
    type=click.Path(path_type=Path),
    default=None,
    help="busi, folders: CSV with columns image,patient_id.",
)
@click.option(
    "--duplicates",
    type=click.Choice(DUPLICATE_POLICIES),
    default=None,
    help="busi, folders: pixel-identical images: one patient (group, default), "
    "keep the first (drop), or report only (warn).",
)
@click.option(
    "--near-duplicates",
    type=click.Choice(NEAR_POLICIES),
    default=None,
    help="busi, folders: resized/re-encoded copies (perceptual hash) across patients: one "
    "patient per group, groups with both labels excluded (group, default); list only "
    "(report); or skip the check (off). Pairs go to <manifest>.near_duplicates.csv.",
)
@click.option(
    "--convert-png",
    is_flag=True,
    default=None,
    help="mini-mias: write PNG copies next to the manifest instead of using the PGMs.",
)
@click.option(
    "--images",
    type=click.Path(path_type=Path),
    default=None,
    help="cbis-ddsm: DICOM root (default: SOURCE).",
)
@click.option(
    "--abnormality",
    type=click.Choice(["both", "mass", "calc"]),
    default=None,
    help="cbis-ddsm: which description CSVs to read (default both).",
)
@click.option(
    "--merge-views/--no-merge-views",
    default=None,
    help="cbis-ddsm: merge the Mass-/Calc- copies of one breast view (default on).",
)
@click.option(
    "--modality",
    type=click.Choice(["DM", "US"], case_sensitive=False),
    default=None,
    help="folders: modality of every image (required).",
)
@click.option(
    "--mask-suffix",
    default=None,
    help="folders: stem suffix of mask files, e.g. _mask (x_mask.png, x_mask_1.png).",
)
@click.option(
    "--report-json",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the import report as JSON here.",
)
def import_command(fmt: str, source: Path, out: Path, report_json: Path | None, **options) -> None:
    """Build a manifest from a public data set's published layout.

    FORMAT is busi, mini-mias, cbis-ddsm or folders; SOURCE is the data set's folder.
    Prints what was read, written and skipped (with reasons).
    """
    fmt = fmt.lower()
    wrong = [
        "--" + name.replace("_", "-")
        for name, value in options.items()
        if value is not None and fmt not in _APPLIES[name]
    ]
    if wrong:
        raise UserError(f"option(s) {', '.join(wrong)} do not apply to format {fmt}")
    if not source.exists():
        raise UserError(f"{fmt}: SOURCE {source} does not exist")
    # Outputs that cannot be written are refused before any work (nothing half-written).
    check_output_file(out)
    if report_json is not None:
        check_output_file(report_json)
    given = {k: v for k, v in options.items() if v is not None}
    try:
        report = run_import(fmt, source, out, **given)
    except UserError as exc:
        exc.message = _as_flags(exc.message)
        exc.args = (exc.message,)
        exc.details = [_as_flags(d) for d in exc.details]
        raise
    click.echo(_as_flags(report.summary()))
    if report_json is not None:
        from breastfusion.io import atomic_write_json

        atomic_write_json(report_json, report.to_dict())
