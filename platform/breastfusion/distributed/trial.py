"""One search trial: a configuration trained and validated on every fold (runs in a Ray worker).

Fold outputs go straight to the search folder, ``DIR/trials/<trial>/fold<k>/`` (the engine
writes ``metrics.json`` last, so a fold without it is unfinished). That folder is the truth
a retried, resumed or reused trial starts from: a fold whose ``metrics.json`` was written
for this configuration (same ``config_hash``) is kept, any other fold is trained again from
scratch. The Tune checkpoint of each fold is a few bytes (the finished folds' AUCs) that
keeps Tune's iteration count across retries.

The trial process is kept between folds and, with ``reuse_actors``, between trials: the
imports, the loaded cohort (manifest table + splits, read once per process) and torch's
thread pool stay warm. A trial trains on as many threads as its CPU resources allow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.distributed.objective import (
    FOLD_DONE,
    FoldOutcome,
    FoldReporter,
    fold_summary,
    read_outcomes,
)

FAULT_ENV = "BREASTFUSION_FAULT_DIR"
"""Test hook (never set in normal use): a folder where every fold attempt leaves
``<trial>.fold<k>.<pid>.start`` (so a test can count attempts or kill that process), and where a
file ``crash-once-fold<k>`` makes the next attempt at fold ``k`` raise once (it is consumed)."""


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (pickled once into Ray's object store)."""

    base_config: dict[str, Any]
    folds: list[int]
    out: str  # the search folder
    workers: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    ddp_storage: str = ""
    fold_parallel: bool = False


def run_trial(params: dict[str, Any], *, setup: TrialSetup) -> None:
    """Tune's function trainable (see the module docstring)."""
    from ray import tune

    quiet_worker_logging()
    use_threads(setup.resources.get("cpu", 1.0))
    cfg = Config.from_dict(setup.base_config).with_overrides(params)
    ctx = tune.get_context()
    name = ctx.get_trial_name()
    trial = runs.SearchDir(Path(setup.out)).trial(name)
    hashes = {k: fold_config(cfg, k).config_hash() for k in setup.folds}
    done = finished_folds(trial, setup.folds, hashes)
    if setup.fold_parallel:
        from breastfusion.distributed.fold_parallel import run_folds_at_once

        run_folds_at_once(cfg, trial, setup, done, hashes)
        return
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


def finished_folds(
    trial: runs.TrialDir, folds: list[int], hashes: dict[int, str]
) -> dict[int, FoldOutcome]:
    """Folds finished for this configuration whose model is still there (a fold whose model
    was removed to save disk is trained again if its trial ever runs again)."""
    done = read_outcomes(trial, folds, hashes)
    return {k: o for k, o in done.items() if trial.fold(k).model_path.is_file()}


def fold_config(cfg: Config, k: int) -> Config:
    return cfg.with_overrides({"data.fold": k})


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
    run_fold(fold_cfg, fold_dir, callback=reporter, cohort=cached_cohort(cfg), progress=_silent)
    return reporter.pending or {}


def report_fold(tune: Any, result: dict[str, Any], done: dict[int, FoldOutcome]) -> None:
    """``tune.report`` with a tiny checkpoint (the finished folds' AUCs)."""
    scratch = Path(tempfile.mkdtemp(prefix="bf-ckpt-"))
    try:
        aucs = {str(k): (o.auc if math.isfinite(o.auc) else None) for k, o in done.items()}
        (scratch / "folds.json").write_text(json.dumps(aucs, sort_keys=True))
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(scratch)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_COHORTS: dict[tuple, Any] = {}


def cached_cohort(cfg: Config) -> Any:
    """The manifest table and splits, read once per process (re-read if either file changed)."""
    from breastfusion.engine.data import load_cohort

    key = tuple(
        (p, os.stat(p).st_mtime_ns, os.stat(p).st_size)
        for p in (cfg.data.manifest, cfg.data.splits)
    )
    if key not in _COHORTS:
        _COHORTS.clear()
        _COHORTS[key] = load_cohort(cfg)
    return _COHORTS[key]


def use_threads(cpus: float) -> None:
    """As many torch threads as the trial's CPU resources (Ray sets OMP_NUM_THREADS from them;
    torch may have started with another count in a reused process)."""
    import torch

    n = max(1, int(cpus))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class _Once(logging.Filter):
    """A warning printed once per process, not once per fold (reused processes serve many
    trials; the driver prints the cohort facts itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("breastfusion"):
            return True
        key = (record.name, str(record.msg))
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = _Once()


def quiet_worker_logging() -> None:
    # Per-report and per-checkpoint INFO lines of Ray are noise on the driver's console;
    # the datasets' "left out" warnings repeat facts the driver printed once.
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("breastfusion.data.datasets").setLevel(logging.ERROR)
    # Logger filters do not apply to child loggers' records; handler filters do.
    for handler in logging.getLogger().handlers:
        if _ONCE not in handler.filters:
            handler.addFilter(_ONCE)


def _silent(line: str) -> None:
    """The engine's progress lines stay in the trial (the driver prints one line per fold)."""


def fault_point(trial_name: str, fold: int) -> None:
    """See FAULT_ENV: lets tests crash or kill a fold attempt; a no-op in normal runs."""
    folder = os.environ.get(FAULT_ENV)
    if not folder:
        return
    d = Path(folder)
    (d / f"{trial_name}.fold{fold}.{os.getpid()}.start").write_text(str(os.getpid()))
    marker = d / f"crash-once-fold{fold}"
    try:
        marker.rename(d / f"crash-once-fold{fold}.used")  # atomic: only one attempt claims it
    except FileNotFoundError:
        return
    raise RuntimeError(f"injected failure in {trial_name} fold {fold} ({FAULT_ENV})")
