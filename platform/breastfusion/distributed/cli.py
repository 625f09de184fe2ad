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
@click.option(
    "--mlflow-uri",
    default=None,
    metavar="URI",
    help="Also track the search in MLflow (e.g. sqlite:///mlflow.db): one run per trial.",
)
def search_command(
    space_path: Path,
    manifest: Path,
    splits: Path,
    out: Path,
    resume: bool,
    debug: bool,
    mlflow_uri: str | None,
) -> None:
    """Search hyperparameters; each trial is one configuration scored over the K folds.

    Ctrl-C (or SIGTERM) stops the trials and saves the search state (exit 130 / 143; a
    second interrupt aborts at once); continue with the same command plus --resume.
    """
    from breastfusion import runs
    from breastfusion.distributed.search import search

    summary = search(
        space_path,
        manifest,
        splits,
        out,
        resume=resume,
        debug=debug,
        echo=click.echo,
        mlflow_uri=mlflow_uri,
    )
    cols = ["trial", "mean_auc", "std_auc", "folds_done", "status", "degenerate"]
    click.echo(summary.trials[[c for c in cols if c in summary.trials]].to_string(index=False))
    folder = runs.SearchDir(summary.out)
    click.echo(f"wrote {folder.trials_path} and {folder.best_path}")
