"""``breastfusion validate`` and ``breastfusion split``: parse, call the data library, print.

The library names study keys (``splits.folds``, ``data.allow_outside``); these commands
take flags, so their messages are reworded to name the flag the user typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from breastfusion.errors import UserError

# study key in a library message -> the flag of these commands (longest first)
_FLAGS = (
    ("set data.allow_outside", "pass --allow-outside"),
    ("data.allow_outside", "--allow-outside"),
    ("splits.folds = ", "--folds "),
    ("splits.folds", "--folds"),
    ("splits.holdout: ", "--holdout "),
    ("splits.holdout", "--holdout"),
    ("splits.seed", "--seed"),
    ("splits.near_duplicates", "--near-duplicates"),
    ("near_duplicates.max_distance", "--max-distance"),
)


def _as_flags(text: str) -> str:
    for key, flag in _FLAGS:
        text = text.replace(key, flag)
    return text


class _Flags:
    """Re-raise a library ``UserError`` with the flags named instead of the study keys."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, UserError):
            exc.message = _as_flags(exc.message)
            exc.args = (exc.message,)
            exc.details = [_as_flags(d) for d in exc.details]
        return False


_allow_outside = click.option(
    "--allow-outside",
    is_flag=True,
    help="Accept image paths outside the manifest's folder ('..', absolute paths, symbolic "
    "links leading elsewhere); the study key is data.allow_outside.",
)
_max_distance = click.option(
    "--max-distance",
    type=click.IntRange(0, 64),
    default=4,
    show_default=True,
    help="Near duplicates: most differing bits of the 64-bit perceptual hash.",
)


@click.command("validate")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--check-images",
    is_flag=True,
    help="Decode every image fully (slow): catches corrupt, zero-size and constant images.",
)
@_allow_outside
@click.option(
    "--near-duplicates",
    is_flag=True,
    help="Also look for near-duplicate images of different patients (decodes every image).",
)
@click.option(
    "--splits",
    "splits_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Also check this splits file against the manifest; with --near-duplicates, warn "
    "about near duplicates in different partitions (leakage).",
)
@click.option(
    "--pairs-csv",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --near-duplicates: write every pair found to this CSV.",
)
@_max_distance
def validate_command(
    manifest: Path,
    check_images: bool,
    allow_outside: bool,
    near_duplicates: bool,
    splits_path: Path | None,
    pairs_csv: Path | None,
    max_distance: int,
) -> None:
    """Check MANIFEST (CSV) and print a summary; exit 2 listing every problem if invalid."""
    from breastfusion.data.manifest import format_summary, validate_manifest

    if pairs_csv is not None and not near_duplicates:
        raise UserError("--pairs-csv needs --near-duplicates")
    with _Flags():
        report = validate_manifest(manifest, check_images=check_images, allow_outside=allow_outside)
        report.raise_for_problems()
        splits = None
        if splits_path is not None:
            from breastfusion.data.splits import load_splits
            from breastfusion.io import sha256_file

            splits = load_splits(splits_path, report.frame, manifest_sha256=sha256_file(manifest))
    assert report.summary is not None and report.frame is not None
    click.echo(f"{manifest}: valid")
    click.echo(format_summary(report.summary))
    if splits is not None:
        click.echo(
            f"{splits_path}: matches the manifest ({splits.k} folds, "
            f"{len(splits.holdout)} holdout patients)"
        )
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if near_duplicates:
        with _Flags():
            _report_near_duplicates(manifest, report.frame, splits, pairs_csv, max_distance)


def _report_near_duplicates(manifest, frame, splits, pairs_csv, max_distance) -> None:
    from breastfusion.data import near_duplicates as nd

    pairs = nd.manifest_pairs(frame, max_distance=max_distance, source=str(manifest))
    groups = nd.components((p.a.patient, p.b.patient) for p in pairs)
    conflicting = sum(p.conflicting for p in pairs)
    click.echo(
        f"near duplicates across patients: {len(pairs)} pair(s) joining {len(groups)} "
        f"group(s) of patients, {conflicting} with conflicting labels"
    )
    for line in nd.describe(pairs):
        click.echo(f"  {line}")
    places = {}
    if splits is not None:
        leaks = nd.straddling(pairs, splits)
        places = {id(p): (a, b) for p, a, b in leaks}
        holdout = sum("holdout" in (a, b) for _, a, b in leaks)
        if leaks:
            click.echo(
                f"warning: {len(leaks)} near-duplicate pair(s) straddle partitions of "
                f"{splits.source} ({holdout} across development and holdout): leakage; give "
                "each group one patient id and make new splits",
                err=True,
            )
        else:
            click.echo(f"no near-duplicate pair straddles partitions of {splits.source}")
    if pairs_csv is not None:
        _write_pairs(pairs_csv, pairs, places, with_places=splits is not None)
        click.echo(f"wrote {pairs_csv}")


def _write_pairs(path: Path, pairs: Sequence, places: dict, *, with_places: bool) -> None:
    from breastfusion.data.near_duplicates import PAIR_COLUMNS, pairs_csv_text
    from breastfusion.io import atomic_write_text

    columns = ["row_a", "row_b", *PAIR_COLUMNS] + (["place_a", "place_b"] if with_places else [])
    records = []
    for p in pairs:
        rec = {"row_a": p.a.row, "row_b": p.b.row, **p.record()}
        if with_places:
            rec["place_a"], rec["place_b"] = places.get(id(p), ("same", "same"))
        records.append(rec)
    atomic_write_text(path, pairs_csv_text(records, columns))


@click.command("split")
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option("--folds", default=5, show_default=True, type=int, help="Number of CV folds (K).")
@click.option(
    "--holdout",
    default=0.2,
    show_default=True,
    type=float,
    help="Fraction of patients held out as the test cohort (0 for none).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the splits JSON.",
)
@_allow_outside
@click.option(
    "--near-duplicates",
    is_flag=True,
    help="Refuse when near-duplicate images belong to different patients (they would leak "
    "between partitions); decodes every image.",
)
@_max_distance
def split_command(
    manifest: Path,
    folds: int,
    holdout: float,
    seed: int,
    out: Path,
    allow_outside: bool,
    near_duplicates: bool,
    max_distance: int,
) -> None:
    """Split MANIFEST's patients into a holdout cohort and K stratified folds."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import format_summary, make_splits, summary_rows, write_splits
    from breastfusion.io import sha256_file

    if folds < 2:
        raise UserError(f"--folds must be an integer of at least 2 (got {folds})")
    if not 0.0 <= holdout < 1.0:  # also false for NaN
        raise UserError(f"--holdout must be a fraction in [0, 1) (got {holdout})")
    with _Flags():
        df = load_manifest(manifest, allow_outside=allow_outside)
        if near_duplicates:
            from breastfusion.data import near_duplicates as nd

            pairs = nd.manifest_pairs(df, max_distance=max_distance, source=str(manifest))
            nd.refuse_across_patients(pairs, str(manifest))
        splits = make_splits(
            df, folds=folds, holdout=holdout, seed=seed, manifest_sha256=sha256_file(manifest)
        )
    write_splits(splits, out)
    click.echo(format_summary(summary_rows(splits)))
    if near_duplicates:
        click.echo("near duplicates: none across patients")
    click.echo(f"wrote {out}")
