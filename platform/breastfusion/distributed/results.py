"""From Tune's trials to ``trials.csv`` and ``best.json``, and which fold models are kept.

Everything is read from the search folder through ``breastfusion.runs``: each fold's
``metrics.json`` gives its AUC and degenerate flag, ``objective.cv_objective`` the trial's
``mean_auc`` (the value Optuna was told), and ``runs.choose_best`` — the one rule — the chosen
trial. Ray's ``ExperimentAnalysis.get_best_trial`` / ``ResultGrid.get_best_result`` are NOT
used: they rank stopped and degenerate trials by their last reported value.

Disk (``keep_checkpoints``): a fold's ``model.pt`` is large. ``best`` keeps the fold models of
the trials the rule can still choose — at the end, the chosen trial and any trial tied with it
(within the tie tolerance: aggregation across searches may pick one of those); during the
search, a stopped trial's models and a complete trial's that fell more than the tolerance
below the best complete one are removed at once. ``all`` keeps every finished fold's model
(to build fold ensembles of other trials later). ``none`` removes each trial's models when it
ends (its metrics and predictions stay: aggregation and a refit final model need no more; a
study uses it when ``final.mode`` is refit and the space does not say). Partial folds (a fold folder without
``metrics.json``, with the engine's ``checkpoints/``) are scratch and removed on every exit.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.distributed.objective import (
    FoldOutcome,
    cv_objective,
    portable_hash,
    read_outcomes,
)


@dataclass(frozen=True)
class TrialRecord:
    """What Tune knows about a trial that the folder does not."""

    name: str
    config: dict[str, Any]
    error: bool
    iterations: int
    last_cv_auc: float
    stopped_by: str | None


def fold_hashes(base: Config, params: Mapping[str, Any], folds: Iterable[int]) -> dict[int, str]:
    """What ``read_outcomes`` expects of each fold of a trial (``objective.portable_hash``)."""
    cfg = base.with_overrides(dict(params))
    return {k: portable_hash(cfg.with_overrides({"data.fold": k}).to_dict()) for k in folds}


def trial_rows(
    records: Iterable[TrialRecord], base: Config, folds: list[int], out: Path
) -> pd.DataFrame:
    """One ``trials.csv`` row per trial (sorted by name); OOF files written for each."""
    search = runs.SearchDir(out)
    rows = []
    for rec in records:
        trial = search.trial(rec.name)
        done = read_outcomes(trial, folds, fold_hashes(base, rec.config, folds))
        rows.append(_row(rec, done, folds))
        if done:
            trial.write_oof(sorted(done))
    table = pd.DataFrame(rows)
    return table.sort_values("trial").reset_index(drop=True) if rows else table


def _row(rec: TrialRecord, done: Mapping[int, FoldOutcome], folds: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"trial": rec.name}
    row.update({f"config.{k}": v for k, v in sorted(rec.config.items())})
    for k in folds:
        row[f"fold{k}_auc"] = done[k].auc if k in done else math.nan
    complete = all(k in done for k in folds)
    mean, sd = cv_objective(done, folds) if complete else (math.nan, math.nan)
    degenerate = [k for k in folds if k in done and done[k].degenerate]
    row.update(
        mean_auc=mean,
        std_auc=sd,
        folds_done=len(done),
        status="error" if rec.error else "complete" if complete else "stopped",
        degenerate=bool(degenerate),
        degenerate_folds=";".join(map(str, degenerate)),
        degenerate_reason=done[degenerate[0]].reason if degenerate else None,
        stopped_by=None if complete or rec.error else (rec.stopped_by or "scheduler"),
        trial_epochs=rec.iterations,
        last_cv_auc=rec.last_cv_auc,
    )
    return row


def candidates(table: pd.DataFrame, base: Config, search_name: str) -> list[runs.Candidate]:
    out = []
    for row in table.to_dict("records"):
        params = {k[len("config.") :]: _plain(v) for k, v in row.items() if k.startswith("config.")}
        cfg = base.with_overrides(params).to_dict()
        out.append(runs.candidate(search_name, row, cfg))
    return out


def keep_set(cands: list[runs.Candidate]) -> set[str]:
    """Trials the rule can still choose: eligible and within the tie band of the top score."""
    pool = [c for c in cands if c.eligible]
    if not pool:
        return set()
    top = max(c.score for c in pool)
    return {c.trial for c in pool if c.score >= top - runs.DEFAULT_TIE_TOLERANCE - 1e-12}


def best_record(
    table: pd.DataFrame,
    cands: list[runs.Candidate],
    *,
    space: Any,
    folds: list[int],
    fingerprint: str,
) -> dict[str, Any] | None:
    """``best.json``'s content by ``runs.choose_best``; None when no trial is eligible."""
    chosen = runs.choose_best(cands)
    if chosen is None:
        return None
    row = table[table["trial"] == chosen.trial].iloc[0]
    config = {k[len("config.") :]: _plain(v) for k, v in row.items() if k.startswith("config.")}
    return {
        "trial": chosen.trial,
        "score": chosen.score,
        "score_std": None if not math.isfinite(chosen.sd) else chosen.sd,
        "fold_aucs": {f"fold{k}": float(row[f"fold{k}_auc"]) for k in folds},
        "config": config,
        "fixed": space.fixed,
        "space": space.name,
        "fingerprint": fingerprint,
        "metric": f"mean patient-level validation AUC over folds {folds}",
        "rule": runs.selection_rule(),
        "tied": sorted(keep_set(cands) - {chosen.trial}),
    }


def no_best_message(table: pd.DataFrame, out: Path) -> str:
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    degenerate = int(table["degenerate"].sum()) if "degenerate" in table else 0
    have = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"
    return (
        f"{out}: the search finished but no trial can be chosen ({have}; {degenerate} with a "
        f"degenerate fold model): {runs.selection_rule()}; see {runs.TRIALS_FILE}"
    )


# -- disk --------------------------------------------------------------------------------------


def remove_models(trial: runs.TrialDir) -> None:
    for fold in trial.folds():
        fold.model_path.unlink(missing_ok=True)


def remove_partial_folds(search: runs.SearchDir, names: Iterable[str] | None = None) -> None:
    """Fold folders without ``metrics.json`` (a fold cut short) — scratch, never results."""
    if not search.trials_dir.is_dir():
        return
    wanted = None if names is None else set(names)
    for path in sorted(search.trials_dir.iterdir()):
        if not path.is_dir() or (wanted is not None and path.name not in wanted):
            continue
        for fold in runs.TrialDir(path).folds():
            if not fold.finished:
                shutil.rmtree(fold.path, ignore_errors=True)
            else:
                shutil.rmtree(fold.path / runs.FOLD_CHECKPOINTS, ignore_errors=True)


def keep_only(search: runs.SearchDir, keep: set[str]) -> None:
    """Remove the fold models of every trial not in ``keep``."""
    if not search.trials_dir.is_dir():
        return
    for path in sorted(search.trials_dir.iterdir()):
        if path.is_dir() and path.name not in keep:
            remove_models(runs.TrialDir(path))


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
