"""Optuna as Tune's searcher, telling Optuna only cross-validated objectives, persisted on disk.

Ray's ``OptunaSearch`` tells Optuna COMPLETE with a trial's *last reported* value: a trial that
ASHA stopped during its first fold then enters the study with that fold's running score and
can outrank every fully cross-validated trial, steering the sampler towards it. Here:

* a trial whose every fold finished is COMPLETE with value = its CV objective
  (``objective.cv_objective``, the ``mean_auc`` of ``trials.csv``, bit for bit);
* a trial stopped before its last fold (ASHA within epochs, fold pruning) is PRUNED, with its
  per-epoch running objective as intermediate values (step = Tune's ``training_iteration``),
  so Optuna treats it as it treats its own pruned trials;
* a trial that failed (retries exhausted) is FAIL.

The study lives in ``DIR/optuna.db`` (SQLite), written only by the driver process; it survives
``--resume`` and ``optuna-dashboard sqlite:///DIR/optuna.db`` opens it. Each Optuna trial
carries the search's trial name (user attribute ``trial``), the folds done and the
degenerate folds.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from breastfusion.distributed import session
from breastfusion.distributed.naming import trial_name_for
from breastfusion.distributed.objective import COMPLETE, METRIC, is_number

log = logging.getLogger(__name__)


def storage_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


def distributions(domains: Sequence[Any]) -> dict[str, Any]:
    """``space.Domain``s → Optuna distributions (Tune's ``randint`` excludes its upper bound)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, Any] = {}
    for d in domains:
        if d.kind == "loguniform":
            out[d.key] = FloatDistribution(d.values[0], d.values[1], log=True)
        elif d.kind == "uniform":
            out[d.key] = FloatDistribution(d.values[0], d.values[1])
        elif d.kind == "randint":
            out[d.key] = IntDistribution(d.values[0], d.values[1] - 1)
        elif d.kind == "choice":
            out[d.key] = CategoricalDistribution(list(d.values))
        else:
            raise ValueError(f"{d.key}: Optuna cannot sample a {d.kind!r} domain")
    return out


def startup_trials(num_samples: int) -> int:
    """Trials TPE draws at random before it models the results: a quarter of the search, 3 to
    10. Optuna's default (10) would make every search of 10 trials or fewer a random search."""
    return max(3, min(10, num_samples // 4))


class CVOptunaSearch(Searcher):
    def __init__(
        self,
        domains: Sequence[Any],
        *,
        path: Path,
        study_name: str,
        seed: int,
        num_samples: int,
    ):
        super().__init__(metric=METRIC, mode="max")
        self._dists = distributions(domains)
        self._path, self._name, self._seed = Path(path), study_name, seed
        self._startup = startup_trials(num_samples)
        self._sampler: Any = None
        self._study: Any = None
        self._ids: dict[str, int] = {}  # Tune trial id → Optuna storage trial id
        self._steps: dict[str, int] = {}
        self._told: set[str] = set()
        self._failed: set[str] = set()

    # -- Tune's Searcher interface --------------------------------------------------------------

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True  # the space is this searcher's own (param_space stays empty)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        study = self._open()
        trial = study.ask(fixed_distributions=self._dists)
        self._ids[trial_id] = trial._trial_id
        params = dict(trial.params)
        trial.set_user_attr("trial", trial_name_for(trial_id, params))
        trial.set_user_attr("tune_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value, step = result.get(METRIC), result.get("training_iteration")
        if trial_id in self._told or trial_id not in self._ids or not is_number(value):
            return
        if not isinstance(step, int) or step <= self._steps.get(trial_id, 0):
            return
        self._trial(trial_id).report(float(value), step)
        self._steps[trial_id] = step

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        import optuna
        from optuna.trial import TrialState

        if trial_id not in self._ids:
            return
        r = result or {}
        value = r.get(METRIC)
        if error:
            state = TrialState.FAIL
        elif r.get(COMPLETE) == 1:
            state = TrialState.COMPLETE if is_number(value) else TrialState.FAIL
        else:
            state = TrialState.PRUNED
        attrs = {
            "folds_done": int(r.get("folds_done", 0) or 0),
            "degenerate_folds": str(r.get("degenerate_folds", "")),
        }
        s = session.current()
        if s is not None and trial_id in s.stops:
            attrs["stopped_by"] = s.stops[trial_id]
        study = self._open()
        if trial_id in self._told:
            if trial_id in self._failed and state != TrialState.FAIL:
                # An errored trial resumed by --resume and finished now: a new Optuna record.
                frozen = study._storage.get_trial(self._ids[trial_id])
                study.add_trial(
                    optuna.trial.create_trial(
                        state=state,
                        value=float(value) if state == TrialState.COMPLETE else None,
                        params=frozen.params,
                        distributions=frozen.distributions,
                        user_attrs={**frozen.user_attrs, **attrs},
                        intermediate_values=frozen.intermediate_values,
                    )
                )
                self._failed.discard(trial_id)
            return
        trial = self._trial(trial_id)
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        number = study._storage.get_trial_number_from_id(self._ids[trial_id])
        study.tell(number, float(value) if state == TrialState.COMPLETE else None, state=state)
        self._told.add(trial_id)
        if state == TrialState.FAIL:
            self._failed.add(trial_id)

    # -- persistence (Tune pickles this object; the study itself lives in the SQLite file) ------

    def save(self, checkpoint_path: str) -> None:
        state = {
            "ids": self._ids,
            "steps": self._steps,
            "told": self._told,
            "failed": self._failed,
            "sampler": self._sampler,
        }
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self._ids, self._steps = state["ids"], state["steps"]
        self._told, self._failed = state["told"], state["failed"]
        self._sampler, self._study = state["sampler"], None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_study": None}  # an SQLAlchemy engine does not pickle

    # -- internals ------------------------------------------------------------------------------

    def _storage_path(self) -> Path:
        s = session.current()  # the live search folder (it may have moved since the start)
        from breastfusion import runs

        return runs.SearchDir(s.out).optuna_path if s is not None else self._path

    def _open(self) -> Any:
        if self._study is not None:
            return self._study
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if self._sampler is None:
            self._sampler = optuna.samplers.TPESampler(
                seed=self._seed, n_startup_trials=self._startup
            )
        self._study = optuna.create_study(
            storage=storage_url(self._storage_path()),
            study_name=self._name,
            direction="maximize",
            sampler=self._sampler,
            load_if_exists=True,
        )
        self._close_lost_trials()
        return self._study

    def _close_lost_trials(self) -> None:
        """Optuna trials asked for after Tune's last saved state (a hard kill) never ran
        under that id: mark them FAIL so they do not stay RUNNING forever."""
        from optuna.trial import TrialState

        known = set(self._ids.values())
        for t in self._study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t._trial_id not in known:
                self._study.tell(t.number, state=TrialState.FAIL)

    def _trial(self, trial_id: str) -> Any:
        import optuna

        return optuna.trial.Trial(self._open(), self._ids[trial_id])
