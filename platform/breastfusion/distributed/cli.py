"""``breastfusion search``: Ray Tune + Optuna over patient-level folds."""

from __future__ import annotations

from pathlib import Path

import click

from breastfusion.errors import UserError


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
@click.option(
    "--allow-outside",
    is_flag=True,
    help="Accept image paths outside the manifest's folder ('..', absolute paths, symbolic "
    "links leading elsewhere): the config key data.allow_outside, for every trial.",
)
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
    allow_outside: bool,
    resume: bool,
    debug: bool,
    mlflow_uri: str | None,
) -> None:
    """Search hyperparameters; each trial is one configuration scored over the K folds.

    Ctrl-C (or SIGTERM) stops the trials and saves the search state (exit 130 / 143; a
    second interrupt aborts at once); continue with the same command plus --resume.
    """
    from breastfusion import runs
    from breastfusion.config import Config
    from breastfusion.distributed.search import search

    try:
        summary = search(
            space_path,
            manifest,
            splits,
            out,
            resume=resume,
            debug=debug,
            base=Config().with_overrides({"data.allow_outside": True}) if allow_outside else None,
            echo=click.echo,
            mlflow_uri=mlflow_uri,
        )
    except UserError as exc:
        _name_flags(exc)
        raise
    cols = ["trial", "mean_auc", "std_auc", "folds_done", "status", "degenerate"]
    click.echo(summary.trials[[c for c in cols if c in summary.trials]].to_string(index=False))
    folder = runs.SearchDir(summary.out)
    click.echo(f"wrote {folder.trials_path} and {folder.best_path}")


def _name_flags(exc: UserError) -> None:
    """The manifest's refusal names the config key; this command has a flag for it."""
    key, flag = "set data.allow_outside", "pass --allow-outside"
    exc.message = exc.message.replace(key, flag)
    exc.details = [d.replace(key, flag) for d in exc.details]
    exc.args = (exc.message,)
