"""Ray Tune + Optuna over patient-level folds: one trial = one configuration scored on K folds.

Data flow of a search (``search``)::

    search space YAML ─▶ SearchSpace (validated) ─▶ Tune param_space / Optuna distributions
    manifest + splits ─▶ leakage-checked ─▶ fixed base Config     (all before any trial)
    DIR locked (one writer) and claimed ─▶ experiment.json
    Tuner(run_trial, CVOptunaSearch | grid, FoldPruner(ASHA | median | none))
        trial: for fold k: run_fold(cfg + sampled values + fold k) ──▶ DIR/trials/<t>/fold<k>/
               per epoch ──report──▶ Tune (cv_auc running estimate, fold<k>/… curves)
    ─▶ DIR/trials.csv, DIR/best.json (runs.choose_best), fold models of the chosen trial

Modules: ``trial`` (what runs in a worker), ``tuning`` (the Tune experiment), ``optuna_search``
(Optuna told only cross-validated objectives, persisted in ``DIR/optuna.db``), ``pruning``
(fold pruning), ``progress`` (console lines), ``tracking`` (MLflow), ``results`` (tables, the
best trial, which models are kept), ``ray_local`` (a private loopback-only Ray), ``session``
(the live run's state and the interrupt guard). ``DIR``'s layout is ``breastfusion.runs``'.

The best trial is ``runs.choose_best`` — the one rule of every "best" in the project — never
Ray's ``ExperimentAnalysis.get_best_trial`` (which ranks stopped and degenerate trials by their
last reported value).

Interrupts: the first SIGINT/SIGTERM stops the trials and saves the experiment state (Tune's
own graceful path); a second aborts at once. Either way ``search`` raises
``errors.Interrupted`` (exit 130 / 143) naming the project's resume command; ``trials.csv``
and ``best.json`` are written only when the search finished, partial fold folders are removed
on every exit, and ``--resume`` continues (finished trials are kept, unfinished ones resume
from their finished folds, errored ones are retried). Multi-node clusters need ``DIR`` on
storage every node sees (NFS/EFS), as Tune does.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import fsguard, runs
from breastfusion.config import Config
from breastfusion.distributed import results
from breastfusion.distributed.experiment import claim_output, cohort_facts, resume_command_for
from breastfusion.distributed.objective import (
    METRIC,
    Reference,
    cv_objective,
    is_number,
    portable_hash,
    read_outcomes,
)
from breastfusion.distributed.session import InterruptGuard, Session, active
from breastfusion.distributed.space import SearchSpace, load_space
from breastfusion.distributed.worker import FAULT_ENV, TrialSetup
from breastfusion.errors import ConfigError, Interrupted, Terminated, UserError
from breastfusion.io import sha256_file, sha256_json

__all__ = ["FAULT_ENV", "SearchSummary", "search"]


@dataclass(frozen=True)
class SearchSummary:
    out: Path
    trials: pd.DataFrame
    best: dict[str, Any]


@dataclass(frozen=True)
class _Plan:
    space: SearchSpace
    base: Config
    folds: list[int]
    out: Path
    fingerprint: str
    resume: bool
    debug: bool
    echo: Callable[[str], None]
    resume_command: str
    mlflow_uri: str | None


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
    mlflow_uri: str | None = None,
    resume_command: str | None = None,
) -> SearchSummary:
    """Run (or resume) a search; every input problem is raised before any trial starts.

    ``space`` is a validated ``SearchSpace`` or the path of its YAML file. ``base``: the fixed
    configuration under the space's values (its ``data.allow_outside`` also governs reading
    the manifest here). ``mlflow_uri``: also track the search in MLflow (see ``tracking``).
    ``resume_command``: what to print after an interrupt (default: this search's
    ``breastfusion search … --resume``).
    """
    space_path = None if isinstance(space, SearchSpace) else Path(space)
    if not isinstance(space, SearchSpace):
        space = load_space(space)
    if debug:
        space = space.for_debug()
    manifest, splits, out = Path(manifest).resolve(), Path(splits).resolve(), Path(out).resolve()
    base_cfg = space.base_config(base).with_overrides(
        {"data.manifest": str(manifest), "data.splits": str(splits)}
    )
    df, split_set, folds = _check_data(space, base_cfg, folds, debug)
    experiment, fingerprint, earlier = _describe(space, base_cfg, folds, debug)
    command = resume_command or resume_command_for(
        space_path, manifest, splits, out, debug, allow_outside=base_cfg.data.allow_outside
    )
    plan = _Plan(
        space, base_cfg, list(folds), out, fingerprint, resume, debug, echo, command, mlflow_uri
    )
    if mlflow_uri:
        from breastfusion.distributed.tracking import check_store

        check_store(mlflow_uri)  # before the folder is claimed: a typo costs nothing
    existed = out.exists()
    with fsguard.FolderLock(out, "search"):
        try:
            claim_output(out, experiment, fingerprint, resume, also=(earlier,))
        except UserError:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            raise
        folder = runs.SearchDir(out)
        if resume and (finished := _already_complete(folder, space.name, fingerprint)):
            echo(f"search {space.name}: already complete, nothing to resume -> {out}")
            return finished
        folder.best_path.unlink(missing_ok=True)  # an earlier run's: not this run's result
        folder.trials_path.unlink(missing_ok=True)
        from breastfusion.io import atomic_write_json

        atomic_write_json(folder.experiment_path, {**experiment, "fingerprint": fingerprint})
        for line in cohort_facts(df, split_set, base_cfg, folds):
            echo(line)
        return _run_tune(plan)


def _check_data(
    space: SearchSpace, cfg: Config, folds: list[int] | None, debug: bool
) -> tuple[pd.DataFrame, Any, list[int]]:
    """The manifest and splits (leakage-checked) and the folds to run, or a clear error."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    splits = cfg.data.splits
    df = load_manifest(str(cfg.data.manifest), allow_outside=cfg.data.allow_outside)
    split_set = load_splits(str(splits), df)
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
    return df, split_set, list(folds)


def _describe(
    space: SearchSpace, cfg: Config, folds: list[int], debug: bool
) -> tuple[dict[str, Any], str, str]:
    """``experiment.json``'s description, its fingerprint, and the fingerprint searches
    started before it left the data's paths out gave the same search (they resume in place).

    The data count by content, the configuration without the data's location: a search
    folder moved with its data (``mv STUDY ELSEWHERE``) resumes; changed data is refused."""
    experiment = {
        "space": space.source,
        "space_name": space.name,
        "debug": debug,
        "folds": folds,
        "manifest_sha256": sha256_file(str(cfg.data.manifest)),
        "splits_sha256": sha256_file(str(cfg.data.splits)),
        "base_config_hash": portable_hash(cfg.to_dict()),
    }
    earlier = sha256_json({**experiment, "base_config_hash": cfg.config_hash()})
    return experiment, sha256_json(experiment), earlier


# --------------------------------------------------------------------------------------------
# running Tune


def _fit_debug_resources(space: SearchSpace) -> SearchSpace:
    """Debug runs anywhere: one worker, at most the cluster's CPUs, a GPU only if there is one."""
    import ray

    total = ray.cluster_resources()
    gpu = 1.0 if space.resources["gpu"] > 0 and total.get("GPU", 0) >= 1 else 0.0
    cpu = min(space.resources["cpu"], max(1.0, float(total.get("CPU", 1))))
    return dataclasses.replace(space, workers=1, resources={"cpu": cpu, "gpu": gpu})


def _run_tune(plan: _Plan) -> SearchSummary:
    from breastfusion.distributed.ray_local import init_ray, shutdown_ray
    from breastfusion.distributed.tuning import build_tuner

    folder = runs.SearchDir(plan.out)
    guard = InterruptGuard(plan.echo)
    live = Session(
        out=plan.out,
        folds=plan.folds,
        epochs=plan.base.optim.epochs,
        n_trials=plan.space.total_trials,
        base_config=plan.base.to_dict(),
        echo=plan.echo,
        guard=guard,
    )
    live.references.update(_references_on_disk(folder, plan.folds))
    live.on_trial_end = lambda name, errored=False: _trim(plan, live, name, errored)
    started, grid, status = False, None, "FAILED"
    try:
        with guard, active(live):
            live.tracker = _tracker(plan)
            space = plan.space
            started = init_ray(dashboard=space.workers > 1 and not plan.debug)
            guard.rearm()
            if plan.debug:
                space = _fit_debug_resources(space)
            setup = TrialSetup(
                base_config=plan.base.to_dict(),
                folds=plan.folds,
                out=str(plan.out),
                workers=space.workers,
                resources=dict(space.resources),
                ddp_storage=str(folder.tune_dir / "_ddp"),
                fold_parallel=space.fold_parallel,
            )
            tuner, restored = build_tuner(
                space, setup, plan.out, resume=plan.resume, epochs=plan.base.optim.epochs
            )
            _header(plan, restored)
            grid = tuner.fit()
    except KeyboardInterrupt as exc:
        status = "KILLED"
        code = guard.exit_code if guard.signum else 143 if isinstance(exc, Terminated) else 130
        raise _interrupted(plan, folder, code, aborted=True) from None
    finally:
        if started:
            shutdown_ray()
        results.remove_partial_folds(folder)
        if live.tracker is not None and (grid is None or guard.signum):
            live.tracker.close("KILLED" if guard.signum or status == "KILLED" else "FAILED")
    ended = grid.num_terminated + grid.num_errors
    if guard.signum is not None or ended < max(len(grid), plan.space.total_trials):
        raise _interrupted(plan, folder, guard.exit_code, aborted=False)
    try:
        return _finish(plan, live, grid)
    finally:
        if live.tracker is not None:
            live.tracker.close("FINISHED")


def _tracker(plan: _Plan) -> Any:
    if not plan.mlflow_uri:
        return None
    from breastfusion.distributed.tracking import MlflowTracker

    return MlflowTracker(
        plan.mlflow_uri,
        experiment=f"breastfusion-{plan.space.name}",
        search_key=plan.fingerprint[:32],
        run_name=f"search {plan.space.name}",
        params={**plan.space.fixed, "search.folds": plan.folds, "search.out": str(plan.out)},
        echo=plan.echo,
    )


def _header(plan: _Plan, restored: bool) -> None:
    s, folder = plan.space, runs.SearchDir(plan.out)
    pruning = " + fold pruning" if s.scheduler.fold_pruning and len(plan.folds) > 1 else ""
    mode = ", folds in parallel" if s.fold_parallel else ""
    lines = [
        f"search {s.name}: {s.total_trials} trial(s) × folds {plan.folds}{mode}, "
        f"{s.algorithm} + {s.scheduler.type}{pruning}; results in {plan.out}",
        f"  curves: tensorboard --logdir {folder.trials_dir}   (fold<k>/val_auc … by epoch)",
    ]
    if s.algorithm == "optuna":
        from breastfusion.distributed.optuna_search import storage_url

        lines.append(f"  optuna: optuna-dashboard {storage_url(folder.optuna_path)}")
    if plan.mlflow_uri:
        lines.append(f"  mlflow: mlflow ui --backend-store-uri {plan.mlflow_uri}")
    if restored:
        lines.append("  resuming: finished trials are kept, unfinished ones continue")
    for line in lines:
        plan.echo(line)


def _interrupted(plan: _Plan, folder: runs.SearchDir, code: int, *, aborted: bool) -> Interrupted:
    done = 0
    if folder.trials_dir.is_dir():
        for path in folder.trials_dir.iterdir():
            outcomes = read_outcomes(runs.TrialDir(path), plan.folds)
            done += all(k in outcomes for k in plan.folds)
    how = "aborted" if aborted else "stopped"
    sig = "SIGTERM" if code == 143 else "SIGINT"
    return Interrupted(
        f"search {plan.space.name} {how} by {sig}: {done} of {plan.space.total_trials} trial(s) "
        f"finished every fold, {plan.space.total_trials - done} did not; nothing was marked "
        f"done (no {runs.TRIALS_FILE}, no {runs.BEST_FILE}). Continue with: "
        f"{plan.resume_command}",
        exit_code=code,
    )


def _finish(plan: _Plan, live: Session, grid: Any) -> SearchSummary:
    folder = runs.SearchDir(plan.out)
    records = []
    for r in grid:
        m = r.metrics or {}
        records.append(
            results.TrialRecord(
                name=Path(r.path).name,
                config=dict(r.config or {}),
                error=r.error is not None,
                iterations=int(m.get("training_iteration", 0) or 0),
                last_cv_auc=float(m[METRIC]) if is_number(m.get(METRIC)) else float("nan"),
                stopped_by=live.stops.get(str(m.get("trial_id"))),
            )
        )
    table = results.trial_rows(records, plan.base, plan.folds, plan.out)
    cands = results.candidates(table, plan.base, plan.space.name)
    folder.write_trials_table(table)
    keep = {
        "all": set(table["trial"]),
        "best": results.keep_set(cands),
        "none": set(),
    }[plan.space.keep_checkpoints]
    results.keep_only(folder, keep)
    best = results.best_record(
        table, cands, space=plan.space, folds=plan.folds, fingerprint=plan.fingerprint
    )
    if best is None:
        raise UserError(results.no_best_message(table, plan.out))
    folder.write_best(best)
    if not table["status"].eq("error").any():
        _drop_tune_state(folder, plan.space.name)
    plan.echo(
        f"search {plan.space.name}: {len(table)} trials, best CV AUC {best['score']:.4f} "
        f"({best['trial']}) by the project's rule -> {plan.out}"
    )
    return SearchSummary(out=plan.out, trials=table, best=best)


# Tune's experiment-level state (what ``Tuner.restore`` reads). Ray writes the experiment's
# absolute location into it, so a finished search drops it (``_drop_tune_state``): the search
# folder can then move without naming its old place, and ``--resume`` of a finished search
# returns its result (``_already_complete``). Searches with errored trials keep it: ``--resume``
# retries those. The trials' own Tune folders (params, results) are kept.
_TUNE_STATE = (
    "experiment_state-*.json",
    "basic-variant-state-*.json",
    "search_gen_state-*.json",
    "searcher-state-*.pkl",
    "tuner.pkl",
    ".validate_storage_marker",
)
_RESTORABLE = _TUNE_STATE[:2]  # present while Tune can restore the experiment


def _drop_tune_state(folder: runs.SearchDir, name: str) -> None:
    exp = folder.tune_dir / name
    for pattern in _TUNE_STATE:
        for path in exp.glob(pattern):
            path.unlink(missing_ok=True)


def _already_complete(folder: runs.SearchDir, name: str, fingerprint: str) -> SearchSummary | None:
    """The finished search in ``folder`` (same fingerprint, results written, Tune's state
    dropped because nothing errored), or None when there is something to resume."""
    if not (folder.best_path.is_file() and folder.trials_path.is_file()):
        return None
    exp = folder.tune_dir / name
    if any(next(exp.glob(p), None) is not None for p in _RESTORABLE):
        return None  # Tune can restore it: let it (unfinished or errored trials)
    try:
        best = folder.best()
        table = folder.trials_table()
    except UserError:
        return None
    if best.get("fingerprint") != fingerprint:
        return None
    return SearchSummary(out=folder.path, trials=table, best=best)


def _references_on_disk(folder: runs.SearchDir, folds: list[int]) -> dict[str, Reference]:
    """Complete, non-degenerate trials already in the folder (``--resume``): the fold pruner
    compares new trials with them as with trials of this run."""
    refs: dict[str, Reference] = {}
    if not folder.trials_dir.is_dir():
        return refs
    for path in sorted(folder.trials_dir.iterdir()):
        done = read_outcomes(runs.TrialDir(path), folds)
        if all(k in done for k in folds) and not any(o.degenerate for o in done.values()):
            score, _ = cv_objective(done, folds)
            if score == score:
                refs[path.name] = Reference(path.name, score, {k: o.auc for k, o in done.items()})
    return refs


def _trim(plan: _Plan, live: Session, name: str, errored: bool) -> None:
    """``keep_checkpoints: best`` during the search: drop fold models no rule can choose
    (``none``: every ended trial's)."""
    if plan.space.keep_checkpoints == "all" or errored:
        return  # an errored trial may be resumed: its finished folds are kept
    folder = runs.SearchDir(plan.out)
    if plan.space.keep_checkpoints == "none":
        results.remove_models(folder.trial(name))
    done = read_outcomes(folder.trial(name), plan.folds)
    complete = all(k in done for k in plan.folds)
    eligible = complete and not any(o.degenerate for o in done.values())
    if eligible and name not in live.references:
        score, _ = cv_objective(done, plan.folds)
        if score == score:
            live.references[name] = Reference(name, score, {k: o.auc for k, o in done.items()})
    if name not in live.references:
        results.remove_models(folder.trial(name))  # stopped, degenerate or undefined
    if not live.references:
        return
    top = max(r.score for r in live.references.values())
    for ref in list(live.references.values()):
        if ref.score < top - runs.DEFAULT_TIE_TOLERANCE - 1e-12:
            results.remove_models(folder.trial(ref.trial))
