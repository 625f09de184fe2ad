"""``breastfusion search``: Ray Tune + Optuna over patient-level folds."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("search")
@click.option(
    "--space",
    "space_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Search-space YAML (see search_spaces/).",
)
@click.option("--manifest", required=True, type=click.Path(path_type=Path))
@click.option("--splits", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Experiment folder.")
@click.option("--resume", is_flag=True, help="Continue the interrupted search in --out.")
@click.option(
    "--debug",
    is_flag=True,
    help="Same code path, minutes: fold 0 only, <= 2 trials, 1 epoch, few patients.",
)
def search_command(
    space_path: Path, manifest: Path, splits: Path, out: Path, resume: bool, debug: bool
) -> None:
    """Search hyperparameters; each trial is one configuration scored over the K folds."""
    from breastfusion.distributed.search import search

    summary = search(space_path, manifest, splits, out, resume=resume, debug=debug, echo=click.echo)
    shown = summary.trials[["trial", "mean_auc", "std_auc", "folds_done", "status"]]
    click.echo(shown.to_string(index=False))
    click.echo(f"wrote {out / 'trials.csv'} and {out / 'best.json'}")
