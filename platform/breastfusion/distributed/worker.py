"""What every trial process of a search shares: the trial set-up, the finished-fold rule, the
per-fold Tune report, the cohort read once per process, threads, quiet logging, the test hook.

Used by ``trial`` (folds one after another, or DDP) and ``fold_parallel`` (folds at once).
The process is kept between folds and, with ``reuse_actors``, between trials: the imports,
the loaded cohort (manifest table + splits) and torch's thread pool stay warm.
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
from breastfusion.distributed.objective import FoldOutcome, read_outcomes

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


def finished_folds(
    trial: runs.TrialDir, folds: list[int], hashes: dict[int, str]
) -> dict[int, FoldOutcome]:
    """Folds finished for this configuration whose model is still there (a fold whose model
    was removed to save disk is trained again if its trial ever runs again)."""
    done = read_outcomes(trial, folds, hashes)
    return {k: o for k, o in done.items() if trial.fold(k).model_path.is_file()}


def fold_config(cfg: Config, k: int) -> Config:
    return cfg.with_overrides({"data.fold": k})


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


def warm_process(cfg: Config) -> None:
    """Before a trial's first fold: the fold's lazy imports (``engine.fold.preload``) and the
    cohort (``cached_cohort``). Both are kept by the process, so only its first trial pays
    them (as start-up, once) and a reused process pays nothing."""
    from breastfusion.engine.fold import preload

    preload()
    cached_cohort(cfg)


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


def silent(line: str) -> None:
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
