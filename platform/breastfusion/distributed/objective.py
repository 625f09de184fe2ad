"""The search objective, what a trial reports per epoch, and the fold-pruning rule (no Ray here).

One objective everywhere: ``cv_objective`` — the mean of the fold AUCs read from each fold's
``metrics.json``, in fold order. The trial reports it to Tune (``cv_auc`` on the result of its
last fold), the Optuna searcher stores exactly that value, and ``trials.csv``'s ``mean_auc`` is
computed by the same function from the same files, so the three never disagree.

``FoldReporter`` is the engine's per-epoch callback inside a trial (single process, DDP ranks,
fold-parallel tasks). ``fold_pruning_verdict`` is the rule that stops a configuration between
folds (see its docstring); the scheduler in ``distributed.pruning`` applies it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from breastfusion import runs

METRIC = "cv_auc"  # what Tune, ASHA and Optuna see (mode: max)
FOLD_DONE = "fold_done"  # present on the one result that closes a fold
COMPLETE = "complete"  # 1 on the result that closes the trial's last fold


@dataclass(frozen=True)
class FoldOutcome:
    """A finished fold as its ``metrics.json`` records it."""

    k: int
    auc: float  # NaN when undefined (one class in the validation fold)
    degenerate: bool
    reason: str | None


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# Where the data lives is no part of a configuration's identity inside a search: the search's
# fingerprint checks the manifest's and splits' content (sha256), and a search folder moved
# with its data (``mv STUDY ELSEWHERE``) must still recognise its finished folds. Whether
# image paths may leave the manifest's folder (``allow_outside``) changes no result either.
DATA_LOCATIONS = ("manifest", "splits", "cache_dir", "allow_outside")


def portable_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a resolved config (``Config.to_dict()``, or a fold's ``config.yaml``) without
    the data's locations (``DATA_LOCATIONS``) or the informational ``config_hash``."""
    from breastfusion.io import sha256_json

    raw = {k: v for k, v in config.items() if k != "config_hash"}
    data = {k: v for k, v in dict(raw.get("data") or {}).items() if k not in DATA_LOCATIONS}
    return sha256_json({**raw, "data": data})


def _fold_hash(fold: runs.FoldDir) -> str | None:
    from breastfusion.errors import UserError

    try:
        return portable_hash(fold.config())
    except UserError:  # no readable config.yaml: not a fold of any known configuration
        return None


def read_outcomes(
    trial: runs.TrialDir, folds: Iterable[int], hashes: Mapping[int, str] | None = None
) -> dict[int, FoldOutcome]:
    """The trial's finished folds. With ``hashes`` (fold → expected ``portable_hash`` of its
    config), a fold written for another configuration counts as not finished (it is trained
    again); where the data lay when it ran does not matter."""
    done: dict[int, FoldOutcome] = {}
    for fold in trial.folds(list(folds)):
        if not fold.finished:
            continue
        m = fold.metrics()
        if hashes is not None and _fold_hash(fold) != hashes.get(fold.k):
            continue
        auc = m.get("auc")
        done[fold.k] = FoldOutcome(
            k=fold.k,
            auc=float(auc) if is_number(auc) else math.nan,
            degenerate=bool(m.get("degenerate")),
            reason=m.get("degenerate_reason"),
        )
    return done


def cv_objective(done: Mapping[int, FoldOutcome], folds: Sequence[int]) -> tuple[float, float]:
    """(mean, sample SD) of the AUCs of ``folds`` that are in ``done`` (NaN if none / if any
    finished fold has an undefined AUC). The one place the objective is computed."""
    aucs = [done[k].auc for k in folds if k in done]
    if not aucs or not all(math.isfinite(a) for a in aucs):
        return math.nan, math.nan
    mean = sum(aucs) / len(aucs)
    if len(aucs) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((a - mean) ** 2 for a in aucs) / (len(aucs) - 1))


def fold_summary(done: Mapping[int, FoldOutcome], folds: Sequence[int]) -> dict[str, Any]:
    """The keys every fold-closing result carries (the searcher, the pruner, the progress
    lines and MLflow read them)."""
    mean, sd = cv_objective(done, folds)
    degenerate = [k for k in folds if k in done and done[k].degenerate]
    row: dict[str, Any] = {
        METRIC: mean,
        "cv_auc_std": sd,
        "folds_done": sum(1 for k in folds if k in done),
        COMPLETE: int(all(k in done for k in folds)),
        "degenerate_folds": ";".join(map(str, degenerate)),
        "degenerate_reason": done[degenerate[-1]].reason if degenerate else "",
    }
    row.update({f"auc/fold{k}": done[k].auc for k in folds if k in done})
    return row


def fold_aucs(result: Mapping[str, Any]) -> dict[int, float]:
    """``auc/fold<k>`` entries of a result → {k: auc}."""
    out = {}
    for key, value in result.items():
        if key.startswith("auc/fold") and key[8:].isdigit() and isinstance(value, int | float):
            out[int(key[8:])] = float(value)
    return out


class FoldReporter:
    """The engine's per-epoch callback: fold-tagged curves plus the running objective.

    Reports lag one epoch: epoch e is sent when epoch e+1 ends, and the fold's last epoch is
    held back (``pending``) for the trial to send together with the fold's summary. So every
    Tune result is exactly one epoch (ASHA's time unit), and a scheduler decision taken on a
    fold's last epoch never discards that fold's outputs (they are on disk by then).

    The running objective is the mean of the finished folds' AUCs and the current fold's
    latest validation AUC — an estimate for the schedulers, never a result (a fold's AUC is
    its reported model's, not the best epoch's).
    """

    def __init__(self, fold: int, finished: Iterable[float], report: Callable[[dict], Any]):
        self.fold, self.report = fold, report
        self.finished = [float(a) for a in finished if is_number(a)]
        self.pending: dict[str, Any] | None = None

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        auc = metrics.get("val_auc")
        running = [*self.finished, *([float(auc)] if is_number(auc) else [])]
        row = {f"fold{self.fold}/{k}": v for k, v in metrics.items() if is_number(v)}
        if self.pending is not None:
            self.report(self.pending)
        self.pending = {
            METRIC: sum(running) / len(running) if running else math.nan,
            "fold": self.fold,
            **row,
        }


# -- pruning across folds ------------------------------------------------------------------------

DEFAULT_FOLD_MARGIN = 0.01


@dataclass(frozen=True)
class Reference:
    """A complete, non-degenerate trial the pruner compares others with."""

    trial: str
    score: float  # its CV objective
    aucs: Mapping[int, float]


def fold_pruning_verdict(
    aucs: Mapping[int, float],
    references: Sequence[Reference],
    n_folds: int,
    *,
    margin: float = DEFAULT_FOLD_MARGIN,
    min_folds: int = 1,
) -> str | None:
    """Why a configuration should stop before its remaining folds, or None to continue.

    The rule (deterministic: nothing random, nothing to seed). Take the best reference R (the
    highest CV objective among complete, non-degenerate trials) and the trial's finished
    folds F (at least ``min_folds``, fewer than all). Give the trial the most optimistic
    completion the evidence allows: on every remaining fold it scores R's AUC on that fold
    plus the largest margin by which it beat R on any finished fold (zero if it beat R on
    none). If even that projected CV mean stays more than ``margin`` below R's, the trial
    cannot end within ``margin`` of the best on these folds and stops. Forgiving by design:
    one finished fold on which the trial beat R carries that lead into every remaining fold.
    Folds are compared paired (same patients), so fold difficulty cancels out.
    """
    valid = {k: a for k, a in aucs.items() if math.isfinite(a)}
    pool = [r for r in references if math.isfinite(r.score)]
    if not pool or len(aucs) >= n_folds or len(valid) < max(1, min_folds):
        return None
    ref = max(pool, key=lambda r: (r.score, r.trial))
    shared = [k for k in valid if k in ref.aucs and math.isfinite(ref.aucs[k])]
    if len(shared) < max(1, min_folds) or len(ref.aucs) < n_folds:
        return None
    diffs = [valid[k] - ref.aucs[k] for k in shared]
    lead = max(0.0, max(diffs))
    remaining = [k for k in ref.aucs if k not in shared]  # undefined folds count as open
    projected = (
        sum(valid[k] for k in shared) + sum(ref.aucs[k] + lead for k in remaining)
    ) / n_folds
    if projected >= ref.score - margin:
        return None
    shown = ", ".join(f"fold {k} {valid[k]:.3f} vs {ref.aucs[k]:.3f}" for k in sorted(shared))
    return (
        f"fold pruning: even matching the best trial ({ref.trial}, CV AUC {ref.score:.3f}) on "
        f"the remaining folds it would end at most {projected:.3f} ({shown})"
    )
