"""One search trial: a configuration trained and validated on every fold (runs in a Ray worker).

Fold outputs go straight to the search folder, ``DIR/trials/<trial>/fold<k>/`` (the engine
writes ``metrics.json`` last, so a fold without it is unfinished). That folder is the truth
a retried, resumed or reused trial starts from: a fold whose ``metrics.json`` was written
for this configuration (its ``config.yaml`` matches, wherever the data lay then:
``objective.portable_hash``) and whose model is there is kept, any other fold is trained
again from scratch (``worker.finished_folds``). The Tune checkpoint of each fold is a few
bytes (the finished folds' AUCs) that keeps Tune's iteration count across retries. A trial
trains on as many threads as its CPU resources allow.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.distributed.objective import (
    FOLD_DONE,
    FoldOutcome,
    FoldReporter,
    fold_summary,
    portable_hash,
)
from breastfusion.distributed.worker import (
    FAULT_ENV,
    TrialSetup,
    cached_cohort,
    fault_point,
    finished_folds,
    fold_config,
    quiet_worker_logging,
    report_fold,
    silent,
    use_threads,
    warm_process,
)

__all__ = ["FAULT_ENV", "TrialSetup", "run_trial"]


def run_trial(params: dict[str, Any], *, setup: TrialSetup) -> None:
    """Tune's function trainable (see the module docstring)."""
    from ray import tune

    quiet_worker_logging()
    use_threads(setup.resources.get("cpu", 1.0))
    cfg = Config.from_dict(setup.base_config).with_overrides(params)
    ctx = tune.get_context()
    name = ctx.get_trial_name()
    trial = runs.SearchDir(Path(setup.out)).trial(name)
    hashes = {k: portable_hash(fold_config(cfg, k).to_dict()) for k in setup.folds}
    done = finished_folds(trial, setup.folds, hashes)
    if setup.fold_parallel:
        from breastfusion.distributed.fold_parallel import run_folds_at_once

        run_folds_at_once(cfg, trial, setup, done, hashes)
        return
    if setup.workers == 1:  # this process trains the folds (DDP: the TorchTrainer's workers)
        warm_process(cfg)
    reported = False
    for k in setup.folds:
        if k in done:
            continue
        fault_point(name, k)
        last = train_one_fold(cfg, trial.fold(k).path, k, setup, done)
        done = finished_folds(trial, setup.folds, hashes)
        if k not in done:
            raise RuntimeError(f"{trial.fold(k).path}: the fold ended without its metrics file")
        # The fold's last epoch and its summary in ONE result: a scheduler may stop the
        # trial on it, and the finished fold is already on disk.
        report_fold(tune, {**last, **fold_summary(done, setup.folds), FOLD_DONE: k}, done)
        reported = True
    if not reported:  # every fold was already done (e.g. resumed right after the last one)
        summary = fold_summary(done, setup.folds)
        report_fold(tune, {**summary, FOLD_DONE: max(done, default=setup.folds[-1])}, done)


def train_one_fold(
    cfg: Config, fold_dir: Path, k: int, setup: TrialSetup, done: dict[int, FoldOutcome]
) -> dict[str, Any]:
    """Train fold ``k`` into ``fold_dir`` (restarting any partial attempt); returns its last
    epoch's fold-tagged row, still to be reported."""
    from ray import tune

    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_cfg = fold_config(cfg, k)
    finished = [o.auc for o in done.values()]
    if setup.workers > 1:
        from breastfusion.distributed.ray_train import fold_with_torchtrainer

        return fold_with_torchtrainer(
            fold_cfg,
            fold_dir,
            workers=setup.workers,
            resources=setup.resources,
            finished=finished,
            storage=Path(setup.ddp_storage),
        )
    from breastfusion.engine.fold import run_fold

    reporter = FoldReporter(k, finished, tune.report)
    run_fold(fold_cfg, fold_dir, callback=reporter, cohort=cached_cohort(cfg), progress=silent)
    return reporter.pending or {}
