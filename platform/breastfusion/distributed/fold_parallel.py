"""Fold-parallel trials (``fold_parallel: true``): a trial trains its K folds at the same time.

For clusters with more GPUs (or CPU slots) than concurrent trials: each unfinished fold is one
Ray task with the space's per-trial resources, inside the trial's placement group (one bundle
per fold; the coordinating trial itself holds none). Every epoch the trial reports the mean,
over the folds, of the finished folds' AUCs and the running folds' latest validation AUC,
plus each fold's curves — so one Tune result is one epoch of all folds and ASHA applies as
usual (``max_t`` counts epochs, not fold-epochs). Fold pruning between folds does not apply
(the folds end together). A stopped trial cancels its fold tasks; a fold that finished is on
disk and is kept, as in sequential trials.
"""

from __future__ import annotations

import math
import queue as _queue
import shutil
from typing import Any

import ray

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.distributed.objective import (
    FOLD_DONE,
    METRIC,
    FoldOutcome,
    fold_summary,
    is_number,
)
from breastfusion.distributed.worker import (
    TrialSetup,
    cached_cohort,
    fault_point,
    finished_folds,
    fold_config,
    quiet_worker_logging,
    report_fold,
    use_threads,
)


def _train_fold(
    cfg: dict[str, Any], k: int, fold_dir: str, trial_name: str, inbox: Any, cpus: float
) -> None:
    """One fold in its own Ray task; each epoch's metrics go to the trial through ``inbox``."""
    from breastfusion.engine.fold import run_fold

    quiet_worker_logging()
    use_threads(cpus)
    fault_point(trial_name, k)
    config = Config.from_dict(cfg)
    shutil.rmtree(fold_dir, ignore_errors=True)

    def on_epoch(metrics: dict[str, Any]) -> None:
        inbox.put((k, {name: v for name, v in metrics.items() if is_number(v)}))

    run_fold(
        fold_config(config, k),
        fold_dir,
        callback=on_epoch,
        cohort=cached_cohort(config),
        progress=lambda line: None,
    )


def run_folds_at_once(
    cfg: Config,
    trial: runs.TrialDir,
    setup: TrialSetup,
    done: dict[int, FoldOutcome],
    hashes: dict[int, str],
) -> None:
    from ray import tune
    from ray.util.queue import Queue

    cpus, gpus = setup.resources.get("cpu", 1.0), setup.resources.get("gpu", 0.0)
    inbox = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(_train_fold).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    todo = [k for k in setup.folds if k not in done]
    running = {
        task.remote(cfg.to_dict(), k, str(trial.fold(k).path), trial.name, inbox, cpus): k
        for k in todo
    }
    latest: dict[int, dict[str, Any]] = {}
    reported = 0
    try:
        while running:
            _drain(inbox, latest)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                ray.get(ref)  # a failed fold fails the trial (Tune retries it)
                running.pop(ref)
            done = finished_folds(trial, setup.folds, hashes)
            _drain(inbox, latest)
            live = list(running.values())
            epoch = min((latest.get(k, {}).get("epoch", 0) for k in live), default=None)
            # The last epoch is reported with the folds' summary, as in sequential trials.
            if epoch is not None and reported < epoch < cfg.optim.epochs:
                reported = int(epoch)
                tune.report(_epoch_row(latest, done, setup.folds))
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
        ray.kill(inbox.actor, no_restart=True)
    done = finished_folds(trial, setup.folds, hashes)
    missing = [k for k in setup.folds if k not in done]
    if missing:
        raise RuntimeError(f"{trial.path}: fold(s) {missing} ended without their metrics file")
    last = {f"fold{k}/{name}": v for k, m in latest.items() for name, v in m.items()}
    report_fold(tune, {**last, **fold_summary(done, setup.folds), FOLD_DONE: max(done)}, done)


def _drain(inbox: Any, latest: dict[int, dict[str, Any]]) -> None:
    while True:
        try:
            k, metrics = inbox.get_nowait()
        except _queue.Empty:
            return
        except Exception:  # ray.util.queue.Empty subclasses queue.Empty; be lenient
            return
        latest[k] = metrics


def _epoch_row(
    latest: dict[int, dict[str, Any]], done: dict[int, FoldOutcome], folds: list[int]
) -> dict[str, Any]:
    values = []
    for k in folds:
        if k in done and math.isfinite(done[k].auc):
            values.append(done[k].auc)
        elif is_number(latest.get(k, {}).get("val_auc")):
            values.append(float(latest[k]["val_auc"]))
    row = {f"fold{k}/{name}": v for k, m in latest.items() for name, v in m.items()}
    row[METRIC] = sum(values) / len(values) if values else math.nan
    row["folds_done"] = len(done)
    return row


def fold_parallel_resources(resources: dict[str, float], n_folds: int) -> Any:
    """One bundle per fold; the trial's own (coordinating) bundle is empty."""
    from ray import tune

    fold = {"CPU": resources.get("cpu", 1.0)}
    if resources.get("gpu", 0.0):
        fold["GPU"] = resources["gpu"]
    return tune.PlacementGroupFactory([{}] + [dict(fold) for _ in range(n_folds)])
