"""Optional MLflow tracking of a search (``search(..., mlflow_uri=URI)``; off by default).

One MLflow run per search (tag ``breastfusion.kind=search``), and under it one nested run per
trial (``mlflow.parentRunId``) with params = the trial's sampled configuration and metrics =
the per-fold curves ``fold<k>/val_auc``, ``fold<k>/train_loss`` … at step = the fold's own
epoch, the fold AUCs ``auc/fold<k>`` and, for a trial that finished every fold, its CV
objective ``cv_auc`` (the ``mean_auc`` of ``trials.csv``). The parent run holds the fixed
settings. Runs are found again by tags, so ``--resume`` continues the same runs.

Everything is logged from the driver process (``MlflowCallback`` → ``MlflowTracker``), so
trial processes need no MLflow and a SQLite store has a single writer. A tracking failure is
reported once and tracking stops; the search goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune import Callback

from breastfusion.distributed import session
from breastfusion.distributed.objective import COMPLETE, METRIC, is_number

log = logging.getLogger(__name__)

KIND_TAG, KEY_TAG, TRIAL_TAG = "breastfusion.kind", "breastfusion.search_key", "breastfusion.trial"


def check_store(uri: str) -> None:
    """Open the tracking store once (a SQLite store is created here); a ``UserError`` naming
    the URI if MLflow cannot use it."""
    from breastfusion.errors import UserError

    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # MLflow raises its own, SQLAlchemy's and OS errors
        first = (str(exc).splitlines() or [""])[0][:200]
        raise UserError(
            f"tracking.mlflow_uri {uri!r}: MLflow cannot use this store "
            f"({type(exc).__name__}: {first})"
        ) from None


class MlflowTracker:
    def __init__(
        self,
        uri: str,
        *,
        experiment: str,
        search_key: str,
        run_name: str,
        params: Mapping[str, Any],
        echo: Callable[[str], None],
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.echo = echo
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(experiment)
        )
        self.key = search_key
        self.children: dict[str, str] = {}
        self.parent = self._find({KIND_TAG: "search", KEY_TAG: search_key})
        if self.parent is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={KIND_TAG: "search", KEY_TAG: search_key},
            )
            self.parent = run.info.run_id
            self._params(self.parent, params)
        else:
            self.client.update_run(self.parent, status="RUNNING")
        self.ok = True

    def _find(self, tags: Mapping[str, str]) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def _params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i : i + 100])

    def _child(self, name: str, params: Mapping[str, Any] | None = None) -> str:
        if name not in self.children:
            found = self._find({KEY_TAG: self.key, TRIAL_TAG: name})
            if found is None:
                run = self.client.create_run(
                    self.experiment_id,
                    run_name=name,
                    tags={"mlflow.parentRunId": self.parent, KEY_TAG: self.key, TRIAL_TAG: name},
                )
                found = run.info.run_id
                self._params(found, params or {})
            self.children[name] = found
        return self.children[name]

    def guarded(self, what: str, fn: Callable[[], Any]) -> None:
        if not self.ok:
            return
        try:
            fn()
        except Exception as exc:  # tracking must never stop a search
            self.ok = False
            self.echo(f"MLflow tracking stopped ({what}: {type(exc).__name__}: {exc})")

    def trial_started(self, name: str, params: Mapping[str, Any]) -> None:
        self.guarded("start", lambda: self._child(name, params))

    def trial_result(self, name: str, result: Mapping[str, Any]) -> None:
        self.guarded("result", lambda: self._log_result(self._child(name), result))

    def trial_ended(self, name: str, result: Mapping[str, Any], status: str) -> None:
        def end() -> None:
            run = self._child(name)
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            final = [("folds_done", result.get("folds_done"))]
            if result.get(COMPLETE) == 1:
                final += [("cv_auc", result.get(METRIC)), ("cv_auc_std", result.get("cv_auc_std"))]
            metrics = [Metric(k, float(v), now, 0) for k, v in final if is_number(v)]
            if metrics:
                self.client.log_batch(run, metrics=metrics)
            self.client.set_tag(run, "breastfusion.status", status)
            self.client.set_terminated(run, "FAILED" if status == "error" else "FINISHED")

        self.guarded("end", end)

    def close(self, status: str) -> None:
        self.guarded("close", lambda: self.client.set_terminated(self.parent, status))

    def _log_result(self, run: str, result: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for key, value in result.items():
            fold, _, name = key.partition("/")
            if not (fold.startswith("fold") and fold[4:].isdigit()) or not is_number(value):
                continue
            epoch = result.get(f"{fold}/epoch")
            if name != "epoch" and is_number(epoch):
                metrics.append(Metric(key, float(value), now, int(epoch)))
        for key, value in result.items():
            if key.startswith("auc/fold") and is_number(value):
                metrics.append(Metric(key, float(value), now, 0))
        step = result.get("training_iteration")
        if is_number(result.get(METRIC)) and isinstance(step, int):
            metrics.append(Metric("running_cv_auc", float(result[METRIC]), now, step))
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run, metrics=metrics[i : i + 1000])


class MlflowCallback(Callback):
    """Relays Tune's trial events to the live run's tracker (none: does nothing)."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = _tracker()
        if t is not None:
            t.trial_started(str(trial), dict(trial.config or {}))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        t = _tracker()
        if t is not None:
            t.trial_result(str(trial), result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = _tracker()
        if t is not None:
            r = trial.last_result or {}
            t.trial_ended(str(trial), r, "complete" if r.get(COMPLETE) == 1 else "stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        t = _tracker()
        if t is not None:
            t.trial_ended(str(trial), trial.last_result or {}, "error")


def _tracker() -> MlflowTracker | None:
    s = session.current()
    return s.tracker if s is not None else None
