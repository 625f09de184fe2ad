"""``breastfusion report``: the command-line face of the HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from breastfusion.errors import UserError
from breastfusion.evaluate.settings import MIN_BOOTSTRAP


@click.command("report")
@click.argument("study_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the page (default: STUDY_DIR/09_report/index.html).",
)
@click.option("--bootstrap", default=1000, show_default=True, type=int, help="ROC band resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
def report_command(study_dir: Path, out: Path | None, bootstrap: int, seed: int) -> None:
    """Write a self-contained HTML report of the study in STUDY_DIR."""
    from breastfusion.report.html import write_page
    from breastfusion.report.inputs import read_study

    if bootstrap < MIN_BOOTSTRAP:
        raise UserError(f"--bootstrap must be at least {MIN_BOOTSTRAP}, got {bootstrap}")
    inp = read_study(study_dir)
    inp.n_boot, inp.seed = bootstrap, seed
    path, not_run = write_page(study_dir, inp, out)
    for sid, problem in sorted(inp.problems.items()):
        click.echo(f"warning: {sid}: {problem}", err=True)
    if not_run:
        click.echo(f"sections not run or incomplete: {', '.join(not_run)}")
    click.echo(f"wrote {path}")
