"""Ray Tune + Optuna over patient-level folds: one trial = one configuration scored on K folds.

Data flow of a search (``search``)::

    search space YAML ─▶ SearchSpace (validated) ─▶ Tune param_space
    manifest + splits ─▶ leakage-checked ─▶ fixed base Config
    Tuner(function trainable, OptunaSearch | grid, ASHA | median)
        trial: for fold k: run_fold(cfg + sampled values + fold k) ──report per epoch──▶ Tune
               fold outputs (metrics, out-of-fold predictions) ──checkpoint per fold──▶ Tune
    ─▶ DIR/trials.csv, DIR/best.json, DIR/trials/<trial>/fold<k>/{metrics.json,predictions.csv}

Single-worker trials run the engine inside the trial process (about a second of fixed cost
per fold); ``workers > 1`` trains each fold with a Ray Train ``TorchTrainer`` (DDP) launched
from the trial — the Tune-over-Train pattern of Ray 2.60.

What Tune sees: one result per trained epoch (so ``training_iteration`` counts epochs, the
unit ASHA/median stop on) with ``cv_auc`` (the running estimate of the objective: the mean of
the finished folds' validation AUCs and the current fold's best so far) plus fold-tagged curves
``fold<k>/val_auc``, ``fold<k>/train_loss`` … (TensorBoard: ``tune/fold<k>/val_auc``), so each
fold of each trial has its own curves. Results lag one epoch so that a fold's last epoch and
its checkpoint are one result (see ``_FoldReporter``): a configuration can be stopped during
its first fold, and a stop never throws away a finished fold.

Fault tolerance: each fold's last result carries a checkpoint holding every finished fold's
outputs. A crashed trial or killed worker is retried ``max_failures`` times and resumes from
that checkpoint, skipping finished folds; ``--resume`` restores an interrupted experiment with
``Tuner.restore`` (finished trials are not re-run, unfinished and errored ones are resumed).
Multi-node clusters need ``--out`` on storage every node sees (NFS/EFS), as Tune does.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion.config import Config
from breastfusion.distributed.space import SearchSpace, load_space
from breastfusion.errors import ConfigError, UserError
from breastfusion.io import atomic_write_json, atomic_write_text, sha256_file, sha256_json

log = logging.getLogger(__name__)

METRIC = "cv_auc"
EXPERIMENT_FILE = "experiment.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
MODEL_NAME = "model.pt"  # as breastfusion.engine.fold writes it


@dataclass(frozen=True)
class SearchSummary:
    out: Path
    trials: pd.DataFrame
    best: dict[str, Any]


# --------------------------------------------------------------------------------------------
# the driver


def search(
    space: SearchSpace | str | Path,
    manifest: str | Path,
    splits: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    debug: bool = False,
    base: Config | None = None,
    folds: list[int] | None = None,
    echo: Callable[[str], None] = print,
) -> SearchSummary:
    """Run (or resume) a search; every input problem is raised before any trial starts.

    ``space`` is a validated ``SearchSpace`` or the path of its YAML file.
    """
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    if not isinstance(space, SearchSpace):
        space = load_space(space)
    if debug:
        space = space.for_debug()
    manifest, splits, out = Path(manifest).resolve(), Path(splits).resolve(), Path(out).resolve()
    df = load_manifest(manifest)
    split_set = load_splits(splits, df)
    expected = space.source.get("folds")
    if expected is not None and int(expected) != split_set.k:
        raise ConfigError(
            f"the search space asks for {expected} folds but {splits} holds {split_set.k}"
        )
    if folds is None:
        folds = [0] if debug else list(range(split_set.k))
    bad = [k for k in folds if not 0 <= k < split_set.k]
    if bad:
        raise ConfigError(f"fold {bad[0]} is out of range for {splits} (0..{split_set.k - 1})")
    base_cfg = space.base_config(base).with_overrides(
        {"data.manifest": str(manifest), "data.splits": str(splits)}
    )
    experiment = {
        "space": space.source,
        "space_name": space.name,
        "debug": debug,
        "folds": folds,
        "manifest_sha256": sha256_file(manifest),
        "splits_sha256": sha256_file(splits),
        "base_config_hash": base_cfg.config_hash(),
    }
    fingerprint = sha256_json(experiment)
    _claim_output(out, fingerprint, resume)
    atomic_write_json(out / EXPERIMENT_FILE, {**experiment, "fingerprint": fingerprint})

    results = _run_tune(space, base_cfg, folds, out, resume=resume, debug=debug, echo=echo)
    trials = _collect(results, space, folds, out)
    best = _best(trials, space, folds, fingerprint)
    _write_table(out / "trials.csv", trials)
    atomic_write_json(out / "best.json", best)
    echo(
        f"search {space.name}: {len(trials)} trials, best {METRIC} = "
        f"{best.get('score', float('nan')):.4f} ({best.get('trial', '-')}) -> {out}"
    )
    return SearchSummary(out=out, trials=trials, best=best)


def _claim_output(out: Path, fingerprint: str, resume: bool) -> None:
    """Refuse an output folder that holds another experiment, or this one without --resume."""
    marker = out / EXPERIMENT_FILE
    if marker.exists():
        try:
            previous = json.loads(marker.read_text()).get("fingerprint")
        except (OSError, ValueError):
            previous = None
        if previous != fingerprint:
            raise UserError(
                f"{out} holds a different experiment (other search space, data, splits or "
                f"settings); choose another --out folder"
            )
        if not resume:
            raise UserError(f"{out} already holds this experiment; pass --resume to continue it")
    elif resume:
        raise UserError(f"nothing to resume in {out} (no {EXPERIMENT_FILE})")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and holds no breastfusion search; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)


def init_ray(*, dashboard: bool = False) -> bool:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it; ``auto`` joins a
    local ``ray start --head``), else start a private local Ray bound to 127.0.0.1 with token
    authentication left on. Returns True when this call started Ray (the caller stops it).

    A private instance (``address="local"``) rather than Ray's default auto-detection: on a
    shared machine another user's head must never receive this search's trials.
    ``dashboard``: Ray Train's placement-group cleaner polls the State API, which lives in
    the dashboard; without it, DDP runs log a warning every few seconds.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    # Keeps every port and worker of a local instance on loopback (see ENVIRONMENT.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=False,
        log_to_driver=True,
    )
    return True


def _fit_debug_resources(space: SearchSpace) -> SearchSpace:
    """Debug runs anywhere: one worker, at most the cluster's CPUs, a GPU only if there is one."""
    import ray

    total = ray.cluster_resources()
    gpu = 1.0 if space.resources["gpu"] > 0 and total.get("GPU", 0) >= 1 else 0.0
    cpu = min(space.resources["cpu"], max(1.0, float(total.get("CPU", 1))))
    return dataclasses.replace(space, workers=1, resources={"cpu": cpu, "gpu": gpu})


def _run_tune(
    space: SearchSpace,
    base_cfg: Config,
    folds: list[int],
    out: Path,
    *,
    resume: bool,
    debug: bool,
    echo: Callable[[str], None],
) -> Any:
    from ray import tune

    from breastfusion.distributed.progress import Progress

    started = init_ray(dashboard=space.workers > 1 and not debug)
    try:
        if debug:
            space = _fit_debug_resources(space)
        storage = out / TUNE_DIR
        trainable = tune.with_parameters(
            _trial,
            base_cfg=base_cfg.to_dict(),
            folds=list(folds),
            workers=space.workers,
            resources=dict(space.resources),
            ddp_storage=str(storage / "_ddp"),
            scratch_key=_scratch_key(out),
            trials_dir=str(out / TRIALS_DIR),
        )
        if space.workers == 1:
            trainable = tune.with_resources(trainable, _trial_resources(space))
        else:
            # The trial only coordinates; its TorchTrainer asks for the workers' resources.
            trainable = tune.with_resources(trainable, {"cpu": 0.01})
        # Console: Progress prints one line per trial event; Tune's tables (every metric of
        # every fold, every few seconds) and its per-failure tracebacks (kept in each trial's
        # error.txt) are turned off. Per-fold checkpoints with num_to_keep=1 force a state
        # snapshot each time: expected, not worth a warning.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        exp_dir = storage / space.name
        echo(
            f"search {space.name}: {space.num_samples} sample(s) × folds {folds}, "
            f"{space.algorithm} + {space.scheduler.type}; results in {out}\n"
            f"  curves: tensorboard --logdir {storage}   (tags ray/tune/fold<k>/val_auc, ray/tune/cv_auc)"
        )
        if resume and tune.Tuner.can_restore(str(exp_dir)):
            echo(f"resuming {exp_dir} (finished trials are kept, unfinished ones continue)")
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.to_tune(),
                tune_config=tune.TuneConfig(
                    metric=METRIC,
                    mode="max",
                    search_alg=_searcher(space),
                    scheduler=_scheduler(space, len(folds), base_cfg.optim.epochs),
                    num_samples=space.num_samples,
                    max_concurrent_trials=space.max_concurrent_trials,
                    trial_name_creator=_trial_name,
                    trial_dirname_creator=_trial_name,
                ),
                run_config=tune.RunConfig(
                    name=space.name,
                    storage_path=str(storage),
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    verbose=0,
                    callbacks=[Progress(len(folds), space.max_failures)],
                ),
            )
        return tuner.fit()
    finally:
        shutil.rmtree(_scratch_root(_scratch_key(out)), ignore_errors=True)
        if started:
            import ray

            ray.shutdown()


def _trial_resources(space: SearchSpace) -> dict[str, float]:
    res = {"cpu": space.resources["cpu"]}
    if space.resources["gpu"]:
        res["gpu"] = space.resources["gpu"]
    return res


def _searcher(space: SearchSpace) -> Any:
    if space.algorithm != "optuna":
        return None  # Tune's BasicVariantGenerator: grid / random sampling
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=space.seed)
    return OptunaSearch(sampler=sampler)


def _scheduler(space: SearchSpace, n_folds: int, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    spec = space.scheduler
    if spec.type == "asha":
        # One Tune result = one epoch (see _FoldReporter), so a trial lasts at most
        # n_folds × epochs time steps; max_t one beyond lets a full trial end by itself
        # (a trial stopped by max_t is killed mid-cleanup).
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max(n_folds * epochs + 1, spec.grace_period),
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    if spec.type == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=spec.grace_period, min_samples_required=2
        )
    return FIFOScheduler()


_NAME_KEYS = {
    "optim.lr": "lr",
    "optim.batch_size": "bs",
    "optim.weight_decay": "wd",
    "data.size_dm": "dm",
    "data.size_us": "us",
    "model.backbone_dm": "bdm",
    "model.backbone_us": "bus",
    "model.fusion": "head",
    "augment.strength": "aug",
    "augment.elastic": "el",
}


def _trial_name(trial: Any) -> str:
    """Names that say the configuration, e.g. ``t00003_bdm=resnet18_head=sum_lr=3.2e-04``
    (grid/random: the trial's number; Optuna: its short id)."""
    tid = str(trial.trial_id or "")
    m = re.fullmatch(r"[0-9a-f]+_(\d+)", tid)
    parts = [f"t{int(m.group(1)):05d}" if m else tid[:8]]
    for key, value in sorted((trial.config or {}).items()):
        short = _NAME_KEYS.get(key, key.rsplit(".", 1)[-1])
        if isinstance(value, float):
            text = f"{value:.1e}" if abs(value) < 0.01 else f"{value:.3g}"
        else:
            text = str(value)
        parts.append(f"{short}={text}")
    return re.sub(r"[^A-Za-z0-9=._+-]", "", "_".join(parts))[:120]


# --------------------------------------------------------------------------------------------
# the trial (runs in a Ray worker process)

FAULT_ENV = "BREASTFUSION_FAULT_DIR"
"""Test hook (never set in normal use): a folder where every fold attempt leaves
``<trial>.fold<k>.<pid>.start`` (so a test can count attempts or kill that process), and where a
file ``crash-once-fold<k>`` makes the next attempt at fold ``k`` raise once (it is consumed)."""


def _trial(
    params: dict[str, Any],
    *,
    base_cfg: dict[str, Any],
    folds: list[int],
    workers: int,
    resources: dict[str, float],
    ddp_storage: str,
    scratch_key: str,
    trials_dir: str,
) -> None:
    from ray import tune

    # "Checkpoint successfully created" once per fold and trial is noise on the console.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    cfg = Config.from_dict(base_cfg).with_overrides(params)
    ctx = tune.get_context()
    # Scratch space for the folds being trained. Not the trial folder: Tune uploads that to
    # storage as artifacts while training runs. A trial stopped by the scheduler or killed
    # never runs its cleanup, so each attempt removes its predecessors' scratch on this node
    # and the driver removes the experiment's scratch root at the end.
    root = _scratch_root(scratch_key)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{glob.escape(ctx.get_trial_id())}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{ctx.get_trial_id()}-", dir=root))
    try:
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                shutil.copytree(d, work, dirs_exist_ok=True)
        done = _finished_folds(work)
        for k in folds:
            if k in done:
                continue
            fold_dir = work / f"fold{k}"
            shutil.rmtree(fold_dir, ignore_errors=True)  # a fold interrupted mid-way restarts
            _fault_point(ctx.get_trial_name(), k)
            fold_cfg = cfg.with_overrides({"data.fold": k})
            if workers > 1:
                from breastfusion.distributed.ray_train import fold_with_torchtrainer

                auc, last = fold_with_torchtrainer(
                    fold_cfg,
                    fold_dir,
                    workers=workers,
                    resources=resources,
                    done=done,
                    storage=Path(ddp_storage),
                )
            else:
                reporter = _FoldReporter(k, done, tune.report)
                auc = _fold_in_process(fold_cfg, fold_dir, reporter)
                last = reporter.pending or {}
            done[k] = auc
            # Weights go straight to the experiment folder: the checkpoint then stays a few KB
            # (metrics + predictions) instead of re-uploading every finished fold's model.
            weights = fold_dir / MODEL_NAME
            if weights.exists():
                dest = Path(trials_dir) / ctx.get_trial_name() / f"fold{k}"
                dest.mkdir(parents=True, exist_ok=True)
                shutil.move(str(weights), dest / MODEL_NAME)
            # The fold's last epoch, its summary and the checkpoint of every finished fold in
            # ONE result: the scheduler may stop the trial on it, and the fold is kept.
            tune.report(
                {**last, **_summary(done, folds), "fold_done": k, f"fold{k}/auc": auc},
                checkpoint=tune.Checkpoint.from_directory(str(work)),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _scratch_key(out: Path) -> str:
    return sha256_json(str(out))[:16]


def _scratch_root(key: str) -> Path:
    return Path(tempfile.gettempdir()) / "breastfusion-scratch" / key


def _fault_point(trial_name: str, fold: int) -> None:
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


class _FoldReporter:
    """The engine's per-epoch callback: fold-tagged curves plus the running objective.

    Reports lag one epoch: epoch e is sent when epoch e+1 ends, and the fold's last epoch is
    held back (``pending``) for the trial to send together with the fold checkpoint. So every
    Tune result is exactly one epoch (ASHA's time unit), and a scheduler decision taken on a
    fold's last epoch never discards that fold's outputs.
    """

    def __init__(self, fold: int, done: dict[int, float], report: Callable[[dict], Any]):
        self.fold, self.done, self.report = fold, done, report
        self.best = math.nan
        self.pending: dict[str, Any] | None = None

    def __call__(self, metrics: dict[str, Any]) -> None:
        auc = metrics.get("val_auc")
        if _is_number(auc) and not (self.best >= auc):
            self.best = float(auc)
        running = [*self.done.values(), self.best]
        row = {f"fold{self.fold}/{k}": v for k, v in metrics.items() if _is_number(v)}
        if self.pending is not None:
            self.report(self.pending)
        self.pending = {METRIC: _nanmean(running), "fold": self.fold, **row}


def _fold_in_process(cfg: Config, fold_dir: Path, reporter: _FoldReporter) -> float:
    from breastfusion.engine.fold import run_fold

    result = run_fold(cfg, fold_dir, callback=reporter)
    auc = result.metrics.get("auc")
    return math.nan if auc is None else float(auc)


def _finished_folds(work: Path) -> dict[int, float]:
    done = {}
    for metrics in work.glob("fold*/metrics.json"):
        k = int(metrics.parent.name[4:])
        auc = json.loads(metrics.read_text()).get("auc")
        done[k] = math.nan if auc is None else float(auc)
    return done


def _nanmean(values: list[float]) -> float:
    real = [v for v in values if _is_number(v)]
    return sum(real) / len(real) if real else math.nan


def _summary(done: dict[int, float], folds: list[int]) -> dict[str, Any]:
    aucs = [done[k] for k in folds if k in done]
    mean = sum(aucs) / len(aucs)
    std = (sum((a - mean) ** 2 for a in aucs) / (len(aucs) - 1)) ** 0.5 if len(aucs) > 1 else 0.0
    return {
        METRIC: mean,
        "cv_auc_std": std,
        "folds_done": len(aucs),
        "complete": int(len(aucs) == len(folds)),
    }


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------
# collecting results


def _collect(results: Any, space: SearchSpace, folds: list[int], out: Path) -> pd.DataFrame:
    """One row per trial; each trial's fold outputs copied to DIR/trials/<trial>/."""
    rows = []
    trials_dir = out / TRIALS_DIR
    for result in results:
        name = Path(result.path).name
        metrics = result.metrics or {}
        row: dict[str, Any] = {"trial": name}
        row.update({f"config.{k}": v for k, v in sorted((result.config or {}).items())})
        fold_aucs: dict[int, float] = {}
        if result.checkpoint is not None:
            dest = trials_dir / name
            with result.checkpoint.as_directory() as d:
                fold_aucs = _finished_folds(Path(d))
                # Merged with the fold weights the trial already put there.
                shutil.copytree(d, dest, dirs_exist_ok=True)
            _write_oof(dest, folds)
        for k in folds:
            row[f"fold{k}_auc"] = fold_aucs.get(k, float("nan"))
        aucs = [fold_aucs[k] for k in folds if k in fold_aucs]
        complete = len(aucs) == len(folds)
        row["mean_auc"] = sum(aucs) / len(aucs) if complete else float("nan")
        row["std_auc"] = pd.Series(aucs).std(ddof=1) if complete and len(aucs) > 1 else float("nan")
        row["folds_done"] = len(aucs)
        row["status"] = (
            "error" if result.error is not None else "complete" if complete else "stopped"
        )
        row["last_cv_auc"] = metrics.get(METRIC, float("nan"))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial").reset_index(drop=True)


def _write_oof(trial_dir: Path, folds: list[int]) -> None:
    """Concatenate the folds' validation predictions (patient-level, out-of-fold)."""
    parts = []
    for k in folds:
        p = trial_dir / f"fold{k}" / "predictions.csv"
        if p.exists():
            part = pd.read_csv(p, dtype={"patient_id": str})
            part.insert(0, "fold", k)
            parts.append(part)
    if parts:
        atomic_write_text(
            trial_dir / "oof_predictions.csv",
            pd.concat(parts, ignore_index=True).to_csv(index=False),
        )


def _best(trials: pd.DataFrame, space: SearchSpace, folds: list[int], fingerprint: str) -> dict:
    complete = trials[trials["status"] == "complete"]
    base = {
        "metric": f"mean patient-level validation AUC over folds {folds}",
        "space": space.name,
        "fingerprint": fingerprint,
    }
    if complete.empty:
        return {
            **base,
            "trial": None,
            "score": float("nan"),
            "config": {},
            "note": "no trial finished every fold",
        }
    row = complete.sort_values(["mean_auc", "trial"], ascending=[False, True]).iloc[0]
    config = {k[len("config.") :]: _plain(v) for k, v in row.items() if k.startswith("config.")}
    return {
        **base,
        "trial": row["trial"],
        "score": float(row["mean_auc"]),
        "score_std": None if pd.isna(row["std_auc"]) else float(row["std_auc"]),
        "fold_aucs": {f"fold{k}": float(row[f"fold{k}_auc"]) for k in folds},
        "config": config,
        "fixed": space.fixed,
    }


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _write_table(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))
