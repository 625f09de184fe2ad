"""Pruning across folds on top of a within-fold scheduler (ASHA, median stopping or none).

``FoldPruner`` wraps Tune's scheduler: every decision is the wrapped scheduler's, except that
on the result which closes a fold it may also stop the trial by
``objective.fold_pruning_verdict`` — the trial's finished folds compared, paired, with the
best complete, non-degenerate trial's AUCs on the same folds. It runs in the driver; the
references it compares with live in the driver's ``session`` (seeded from disk on
``--resume``), so a restored copy of this object sees them too.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from breastfusion.distributed import session
from breastfusion.distributed.objective import (
    COMPLETE,
    FOLD_DONE,
    METRIC,
    Reference,
    fold_aucs,
    fold_pruning_verdict,
    is_number,
)


class FoldPruner(FIFOScheduler):
    def __init__(self, inner: Any, n_folds: int, *, margin: float, enabled: bool = True):
        super().__init__()
        self.inner, self.n_folds, self.margin, self.enabled = inner, n_folds, margin, enabled
        self._local: dict[str, Reference] = {}  # used only without a live session

    # -- delegation ------------------------------------------------------------------------------

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        super().set_search_properties(metric, mode, **spec)
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"{self.inner.debug_string()} + fold pruning (margin {self.margin:g})"

    # -- decisions -------------------------------------------------------------------------------

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        s = session.current()
        final = result.get(COMPLETE) == 1
        if decision == TrialScheduler.STOP and not final and s is not None:
            s.stops.setdefault(trial.trial_id, f"{_name(self.inner)} (running CV AUC lagged)")
        if decision != TrialScheduler.CONTINUE or not self.enabled:
            return decision
        if FOLD_DONE not in result or result.get(COMPLETE) == 1:
            return decision
        verdict = fold_pruning_verdict(
            fold_aucs(result), list(self._references().values()), self.n_folds, margin=self.margin
        )
        if verdict is None:
            return decision
        if s is not None:
            s.stops[trial.trial_id] = verdict
        return TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)
        r = result or {}
        if r.get(COMPLETE) == 1 and not r.get("degenerate_folds") and is_number(r.get(METRIC)):
            name = str(trial)
            self._references()[name] = Reference(name, float(r[METRIC]), fold_aucs(r))

    def _references(self) -> dict[str, Reference]:
        s = session.current()
        return s.references if s is not None else self._local


def _name(scheduler: Any) -> str:
    names = {"AsyncHyperBandScheduler": "ASHA", "MedianStoppingRule": "median stopping"}
    return names.get(type(scheduler).__name__, type(scheduler).__name__)
