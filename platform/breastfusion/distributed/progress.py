"""Console progress of a search: one line per trial event instead of Tune's tables.

Tune's default reporter prints every reported metric of every fold in boxed tables (hundreds
of lines per trial once K folds × 9 curves are reported). Researchers need: which trial
started, each finished fold's AUC, crashes and retries, and how each trial ended. Curves are
in TensorBoard and the dashboard. Kept in its own module because it subclasses
``ray.tune.Callback`` (ray is imported only where a search actually runs) and is pickled with
the experiment state, so ``--resume`` must be able to import it by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import click
from ray.tune import Callback

METRIC = "cv_auc"


class Progress(Callback):
    def __init__(self, n_folds: int, max_failures: int):
        self.n_folds, self.max_failures = n_folds, max_failures

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        click.echo(f"  {trial}: started")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        k = result.get("fold_done")
        if k is None:
            return
        auc = result.get(f"fold{int(k)}/auc", math.nan)
        click.echo(
            f"  {trial}: fold {int(k)} AUC {_f(auc)}  "
            f"({result.get('folds_done', '?')}/{self.n_folds} folds, "
            f"cv_auc {_f(result.get(METRIC))})"
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        click.echo(
            f"  {trial}: crashed (failure {trial.num_failures} of at most "
            f"{self.max_failures} retried): {_error_line(trial)}; "
            f"restarting from its last finished fold"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        click.echo(
            f"  {trial}: FAILED after {trial.num_failures} failure(s): {_error_line(trial)}\n"
            f"    traceback: {trial.error_file or trial.path + '/error.txt'}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        r = trial.last_result or {}
        done = int(r.get("folds_done", 0) or 0)
        how = "finished" if done == self.n_folds else "stopped early by the scheduler"
        click.echo(f"  {trial}: {how}, cv_auc {_f(r.get(METRIC))} over {done} fold(s)")


def _error_line(trial: Any) -> str:
    """The exception line of the trial's latest error (its traceback stays in error.txt)."""
    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (OSError, TypeError):
        return "see error.txt"
    # Tune heads each failure with 'Failure # N (occurred at ...)'.
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Failure #")
    ]
    typed = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", ln)]
    if typed:
        return typed[-1][:300]
    return lines[0][:300] if lines else "see error.txt"  # e.g. a worker that died


def _f(x: Any) -> str:
    try:
        return "n/a" if x is None or math.isnan(float(x)) else f"{float(x):.3f}"
    except (TypeError, ValueError):
        return "n/a"
