"""``breastfusion synth``: the only click code of the synthetic cohort.

The command checks its own flags (so errors name ``--patients``, not the study key the
library names) and calls :func:`generate_cohort`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from breastfusion.data.synthetic.params import DIFFICULTIES, MIN_SIZE
from breastfusion.data.synthetic.writer import generate_cohort, summarize
from breastfusion.errors import UserError


@click.command("synth")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder."
)
@click.option("--patients", default=790, show_default=True, type=int, help="Number of patients.")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same bytes)."
)
@click.option(
    "--size",
    default=256,
    show_default=True,
    type=int,
    help="Nominal image size in pixels (sizes vary ±25%).",
)
@click.option(
    "--difficulty",
    default="standard",
    show_default=True,
    type=click.Choice(DIFFICULTIES),
    help="Evidence strength, mimic rates, contrast and noise.",
)
@click.option(
    "--workers",
    default=None,
    type=int,
    help="Worker processes (default: 1 for small cohorts, else 2).",
)
def synth_command(
    out_dir: str, patients: int, seed: int, size: int, difficulty: str, workers: int | None
) -> None:
    """Write a synthetic paired DM + US cohort (images + manifest.csv) into OUT."""
    if patients < 1:
        raise UserError(f"--patients must be at least 1 (got {patients})")
    if size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} px (got {size})")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    t0 = time.perf_counter()
    manifest = generate_cohort(out_dir, patients, seed, size, difficulty, workers=workers)
    dt = time.perf_counter() - t0
    c = summarize(manifest)
    click.echo(
        f"Wrote a synthetic cohort of {c['patients']} patients ({c['benign']} benign, "
        f"{c['malignant']} malignant; {c['both']} with both modalities, {c['dm_only']} DM only, "
        f"{c['us_only']} US only) with {c['dm_images']} DM and {c['us_images']} US images "
        f"(~{size} px, difficulty {difficulty}, seed {seed}) in {dt:.1f} s. "
        f"Manifest: {manifest}; latent truth: {Path(manifest).parent / 'cohort_truth.csv'}."
    )
