"""The Tune experiment of a search: trainable, resources, searcher, schedulers, callbacks.

What Tune sees: one result per trained epoch (``training_iteration`` counts epochs, the unit
ASHA and median stopping use) with ``cv_auc`` (the running objective, see
``objective.FoldReporter``) and fold-tagged values ``fold<k>/val_auc`` …; the result that
closes a fold also carries the fold summary (``auc/fold<k>``, ``folds_done``, ``complete``).

Curves: each fold's TensorBoard event files are written by the engine in the fold's own folder
(``DIR/trials/<trial>/fold<k>/tensorboard``, step = the fold's epoch): ``tensorboard --logdir
DIR/trials``. Tune's TensorBoard and CSV loggers are off — their step is Tune's iteration
across folds and they add Ray's bookkeeping tags (``done``, ``should_checkpoint`` …); its JSON
logger stays (``tune/<name>/<trial>/result.json``: every result, read by Tune's ResultGrid
and by the benchmarks), next to Tune's experiment state and the trial's error files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.distributed.naming import trial_name
from breastfusion.distributed.objective import METRIC
from breastfusion.distributed.space import SearchSpace
from breastfusion.distributed.trial import run_trial
from breastfusion.distributed.worker import TrialSetup


def quiet_tune() -> None:
    """Console: ``Progress`` prints one line per trial event; Tune's tables, per-failure
    tracebacks (kept in each trial's error.txt), default loggers and "Tuner.restore" hints
    are off (the project's own resume command is printed instead)."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    for name in ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.impl"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRayHints) for f in logger.filters):
            logger.addFilter(_DropRayHints())
    logger = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _OneLineSyncErrors) for f in logger.filters):
        logger.addFilter(_OneLineSyncErrors())


class _OneLineSyncErrors:
    """Under load, Ray's copy of its experiment state can race with its own rename of the
    searcher's state file (``FileNotFoundError … tmp-searcher-state``) and print a 20-line
    traceback; the next save succeeds. Keep the message, on one line."""

    def filter(self, record: Any) -> bool:
        if str(record.msg).startswith("Saving experiment state") and record.exc_info:
            exc = record.exc_info[1]
            record.msg = (
                f"{record.getMessage()} {type(exc).__name__}: {exc} (retried at the next save)"
            )
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


class _DropRayHints:
    """Ray's interrupt and restore messages name Ray's API; the driver prints its own."""

    _PATTERNS = (
        "Tuner.restore",
        "Stop signal received",
        "Trials did not complete",
        "Experiment has been interrupted",
        "Resume experiment with",
    )

    def filter(self, record: Any) -> bool:
        text = str(record.msg)
        return not any(p in text for p in self._PATTERNS)


def resources(space: SearchSpace, n_folds: int) -> Any:
    if space.fold_parallel:
        from breastfusion.distributed.fold_parallel import fold_parallel_resources

        return fold_parallel_resources(space.resources, n_folds)
    if space.workers > 1:
        return {"cpu": 0.01}  # the trial coordinates; its TorchTrainer asks for the workers
    res = {"cpu": space.resources["cpu"]}
    if space.resources["gpu"]:
        res["gpu"] = space.resources["gpu"]
    return res


def searcher(space: SearchSpace, out: Path) -> Any:
    if space.algorithm != "optuna":
        return None  # Tune's BasicVariantGenerator: grid / random sampling
    from breastfusion.distributed.optuna_search import CVOptunaSearch

    return CVOptunaSearch(
        space.domains,
        path=runs.SearchDir(out).optuna_path,
        study_name=space.name,
        seed=space.seed,
        num_samples=space.num_samples,
    )


def scheduler(space: SearchSpace, n_folds: int, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    from breastfusion.distributed.pruning import FoldPruner

    spec = space.scheduler
    # One Tune result = one epoch (of one fold; of all folds when fold-parallel), so a trial
    # lasts at most this many time steps; max_t one beyond lets a full trial end by itself.
    steps = epochs if space.fold_parallel else n_folds * epochs
    if spec.type == "asha":
        inner: Any = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(steps + 1, spec.grace_period),
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    elif spec.type == "median":
        inner = MedianStoppingRule(
            time_attr="training_iteration", grace_period=spec.grace_period, min_samples_required=2
        )
    else:
        inner = FIFOScheduler()
    enabled = spec.fold_pruning and not space.fold_parallel and n_folds > 1
    return FoldPruner(inner, n_folds, margin=spec.fold_margin, enabled=enabled)


def build_tuner(
    space: SearchSpace, setup: TrialSetup, out: Path, *, resume: bool, epochs: int
) -> tuple[Any, bool]:
    """(Tuner, restored): a fresh experiment, or the interrupted one in ``DIR/tune``."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from breastfusion.distributed.progress import Progress
    from breastfusion.distributed.tracking import MlflowCallback

    quiet_tune()
    n_folds = len(setup.folds)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, setup=setup), resources(space, n_folds)
    )
    storage = runs.SearchDir(out).tune_dir
    exp_dir = storage / space.name
    if resume and tune.Tuner.can_restore(str(exp_dir)):
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
        )
        return tuner, True
    tuner = tune.Tuner(
        trainable,
        param_space={} if space.algorithm == "optuna" else space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=searcher(space, out),
            scheduler=scheduler(space, n_folds, epochs),
            num_samples=space.num_samples,
            max_concurrent_trials=space.max_concurrent_trials,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=space.name,
            storage_path=str(storage),
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
            callbacks=[
                Progress(n_folds, epochs, space.total_trials, space.max_failures),
                MlflowCallback(),
                JsonLoggerCallback(),
            ],
        ),
    )
    return tuner, False
