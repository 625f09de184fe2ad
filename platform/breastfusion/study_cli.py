"""``breastfusion run``: the whole study, stage by stage (see breastfusion.study)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
@click.argument("study", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Study folder (default: the study file's `out`, else ./<name>_out).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted search stage in place.")
@click.option(
    "--debug",
    is_flag=True,
    help="Same stages, minutes: fold 0 only, <= 2 trials per search, 1 epoch.",
)
def run_command(study: Path, out: Path | None, resume: bool, debug: bool) -> None:
    """Run the study in STUDY.yaml from data to report; finished stages are skipped."""
    from breastfusion.study import run_study

    run_study(study, out=out, resume=resume, debug=debug, echo=click.echo)
