"""The search's parts without a Ray instance: the objective, the fold-pruning rule, the Optuna
searcher's states and persistence, the pruning scheduler, the interrupt guard, what is kept on
disk, and the progress lines. Each test takes about a second."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from breastfusion import runs
from breastfusion.config import Config, save_yaml
from breastfusion.distributed import results, session
from breastfusion.distributed.objective import (
    COMPLETE,
    FOLD_DONE,
    METRIC,
    FoldOutcome,
    FoldReporter,
    Reference,
    cv_objective,
    fold_pruning_verdict,
    fold_summary,
    portable_hash,
    read_outcomes,
)
from breastfusion.distributed.space import parse_space
from breastfusion.io import sha256_json as _sha256_json

# -- the objective -------------------------------------------------------------------------------


def _outcomes(aucs: dict[int, float], degenerate: tuple[int, ...] = ()) -> dict[int, FoldOutcome]:
    return {
        k: FoldOutcome(k, a, k in degenerate, "3 distinct scores" if k in degenerate else None)
        for k, a in aucs.items()
    }


def test_cv_objective_is_the_mean_and_sample_sd_of_the_fold_aucs():
    done = _outcomes({0: 0.7, 1: 0.8, 2: 0.9})
    mean, sd = cv_objective(done, [0, 1, 2])
    assert mean == (0.7 + 0.8 + 0.9) / 3
    assert sd == pytest.approx(pd.Series([0.7, 0.8, 0.9]).std(ddof=1), abs=1e-15)
    assert math.isnan(cv_objective(_outcomes({0: 0.7, 1: math.nan}), [0, 1])[0])
    summary = fold_summary(_outcomes({0: 0.7, 1: 0.8}, degenerate=(1,)), [0, 1, 2])
    assert summary[COMPLETE] == 0 and summary["folds_done"] == 2
    assert summary["degenerate_folds"] == "1"
    assert summary["auc/fold0"] == 0.7 and "auc/fold2" not in summary


def _fold_config(k: int, lr: float = 1e-4, data: str = "/data/a") -> Config:
    return Config().with_overrides(
        {
            "optim.lr": lr,
            "data.fold": k,
            "data.manifest": f"{data}/manifest.csv",
            "data.splits": f"{data}/splits.json",
        }
    )


def _write_fold(trial: Path, k: int, auc: float | None, *, degenerate=False, model=True, **cfg):
    """A finished fold as the engine leaves it (``config.yaml`` with ``cfg``: ``lr``, ``data``)."""
    fold = trial / f"fold{k}"
    fold.mkdir(parents=True, exist_ok=True)
    (fold / runs.FOLD_PREDICTIONS).write_text(
        f"patient_id,y_true,y_score,y_score_raw\np{k}a,1,0.5,0.4\np{k}b,0,-0.5,-0.4\n"
    )
    if model:
        (fold / runs.FOLD_MODEL).write_bytes(b"weights")
    config = _fold_config(k, **cfg)
    save_yaml(config, fold / runs.FOLD_CONFIG)
    metrics = {"auc": auc, "degenerate": degenerate, "config_hash": config.config_hash(), "fold": k}
    metrics["degenerate_reason"] = "2 distinct score(s)" if degenerate else None
    (fold / runs.FOLD_METRICS).write_text(json.dumps(metrics))
    return fold


def _expected(folds, **cfg) -> dict[int, str]:
    return {k: portable_hash(_fold_config(k, **cfg).to_dict()) for k in folds}


def test_read_outcomes_skips_unfinished_and_foreign_folds(tmp_path):
    trial = tmp_path / "t"
    _write_fold(trial, 0, 0.75)
    _write_fold(trial, 1, None, lr=3e-4)  # another configuration
    (trial / "fold2").mkdir()  # started, never finished
    done = read_outcomes(runs.TrialDir(trial), [0, 1, 2], _expected([0, 1, 2]))
    assert set(done) == {0}
    done = read_outcomes(runs.TrialDir(trial), [0, 1, 2])
    assert set(done) == {0, 1} and math.isnan(done[1].auc)


def test_finished_folds_are_recognised_wherever_the_data_lay(tmp_path):
    """A search moved with its data (``mv``) keeps its finished folds: the expected config
    names the data's new place, the fold's config.yaml the old one."""
    trial = tmp_path / "t"
    _write_fold(trial, 0, 0.75, data="/old/place")
    _write_fold(trial, 1, 0.7, data="/old/place", lr=3e-4)
    moved = _expected([0, 1], data="/new/place")
    assert set(read_outcomes(runs.TrialDir(trial), [0, 1], moved)) == {0}
    assert _fold_config(0).config_hash() != _fold_config(0, data="/new").config_hash()
    (trial / "fold0" / runs.FOLD_CONFIG).unlink()  # no config: no configuration it matches
    assert read_outcomes(runs.TrialDir(trial), [0, 1], moved) == {}


def test_fold_reporter_lags_one_epoch_and_never_uses_the_best_epoch():
    sent: list[dict] = []
    reporter = FoldReporter(1, [0.8], sent.append)
    reporter({"epoch": 1, "val_auc": 0.9, "train_loss": 0.5})
    assert sent == []  # held back until the next epoch ends
    reporter({"epoch": 2, "val_auc": 0.6, "train_loss": 0.4})
    assert len(sent) == 1 and sent[0]["fold1/epoch"] == 1
    assert sent[0][METRIC] == pytest.approx((0.8 + 0.9) / 2)
    # The running objective uses the latest epoch (0.6), not the best one so far (0.9).
    assert reporter.pending[METRIC] == pytest.approx((0.8 + 0.6) / 2)
    assert reporter.pending["fold1/train_loss"] == 0.4


# -- fold pruning ---------------------------------------------------------------------------------

BEST = Reference("t00001", (0.80 + 0.70 + 0.90) / 3, {0: 0.80, 1: 0.70, 2: 0.90})


@pytest.mark.parametrize(
    "aucs, stops",
    [
        ({0: 0.60}, True),  # projected (0.60 + 0.70 + 0.90) / 3 = 0.733 < 0.80 - 0.01
        ({0: 0.78}, False),  # projected 0.793 >= 0.79: could still end within the margin
        ({0: 0.70, 1: 0.60}, True),
        ({0: 0.85, 1: 0.66}, False),  # beat the best on fold 0 by 0.05: carried forward
        ({0: 0.85, 1: 0.50}, True),  # ... but not enough to make up 0.20 lost on fold 1
        ({0: math.nan}, False),  # an undefined fold is no evidence
        ({0: 0.1, 1: 0.1, 2: 0.1}, False),  # finished: nothing left to prune
    ],
)
def test_fold_pruning_stops_only_configurations_that_cannot_catch_up(aucs, stops):
    verdict = fold_pruning_verdict(aucs, [BEST], 3, margin=0.01)
    assert (verdict is not None) == stops, verdict
    if stops:
        assert "t00001" in verdict and "fold 0" in verdict


def test_fold_pruning_needs_a_complete_reference_and_compares_with_the_best():
    assert fold_pruning_verdict({0: 0.1}, [], 3) is None
    partial = Reference("t00002", 0.95, {0: 0.95})
    assert fold_pruning_verdict({0: 0.1}, [partial], 3) is None
    weak = Reference("t00003", 0.5, {0: 0.5, 1: 0.5, 2: 0.5})
    verdict = fold_pruning_verdict({0: 0.6}, [weak, BEST], 3, margin=0.01)
    assert verdict is not None and "t00001" in verdict
    assert fold_pruning_verdict({0: 0.6}, [weak, BEST], 3, margin=0.2) is None
    assert fold_pruning_verdict({0: 0.6}, [BEST], 3, min_folds=2) is None


# -- the Optuna searcher ----------------------------------------------------------------------


def _space():
    return parse_space(
        {
            "name": "unit",
            "algorithm": "optuna",
            "num_samples": 4,
            "space": {
                "optim.lr": {"loguniform": [1e-4, 1e-2]},
                "model.fusion": {"choice": ["sum", "concat"]},
                "optim.batch_size": {"choice": [8, 16]},
            },
        }
    )


def _epoch(it: int, value: float) -> dict:
    return {METRIC: value, "training_iteration": it}


def test_optuna_is_told_only_cross_validated_objectives(tmp_path):
    import optuna

    from breastfusion.distributed.optuna_search import CVOptunaSearch, storage_url

    db = tmp_path / runs.OPTUNA_FILE
    searcher = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0, num_samples=4)
    full, stopped, failed = "a_00000", "a_00001", "a_00002"
    for tid in (full, stopped, failed):
        params = searcher.suggest(tid)
        assert set(params) == {"optim.lr", "model.fusion", "optim.batch_size"}
        assert isinstance(params["optim.batch_size"], int)
    # A trial that finished both folds: its value is exactly its CV objective.
    objective, _ = cv_objective(_outcomes({0: 0.71, 1: 0.77}), [0, 1])
    searcher.on_trial_result(full, _epoch(1, 0.70))
    final = {**_epoch(2, objective), COMPLETE: 1, "folds_done": 2, FOLD_DONE: 1}
    searcher.on_trial_result(full, final)
    searcher.on_trial_complete(full, final)
    # Stopped during its first fold with a high running score: PRUNED, never COMPLETE.
    searcher.on_trial_result(stopped, _epoch(1, 0.99))
    searcher.on_trial_complete(stopped, {**_epoch(1, 0.99), "folds_done": 0})
    searcher.on_trial_complete(failed, None, error=True)

    study = optuna.load_study(study_name="unit", storage=storage_url(db))
    by_name = {t.user_attrs["trial"].split("_")[0]: t for t in study.trials}
    assert set(by_name) == {"t00000", "t00001", "t00002"}
    done = by_name["t00000"]
    assert done.state == optuna.trial.TrialState.COMPLETE and done.value == objective
    assert done.intermediate_values == {1: 0.70, 2: objective}
    pruned = by_name["t00001"]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert pruned.intermediate_values == {1: 0.99}
    assert by_name["t00002"].state == optuna.trial.TrialState.FAIL
    assert study.best_trial.number == done.number  # the 0.99 first-fold score is not "best"


def test_tpe_models_results_after_a_quarter_of_a_small_search(tmp_path):
    """Optuna's default random start (10 trials) would turn a 10-trial search into random
    search; the searcher starts modelling after a quarter of the trials (3 to 10)."""
    from breastfusion.distributed.optuna_search import CVOptunaSearch, startup_trials

    assert [startup_trials(n) for n in (2, 10, 16, 40, 200)] == [3, 3, 4, 10, 10]
    for n, expected in ((10, 3), (40, 10)):
        db = tmp_path / f"{n}.db"
        searcher = CVOptunaSearch(_space().domains, path=db, study_name="u", seed=0, num_samples=n)
        searcher.suggest("a_00000")
        assert searcher._study.sampler._n_startup_trials == expected


def test_optuna_study_survives_a_restore(tmp_path):
    import optuna

    from breastfusion.distributed.optuna_search import CVOptunaSearch, storage_url

    db = tmp_path / runs.OPTUNA_FILE
    first = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0, num_samples=4)
    first.suggest("a_00000")
    first.suggest("a_00001")
    first.on_trial_result("a_00000", _epoch(1, 0.6))
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("a_00002")  # asked after the last saved state: lost in a hard kill

    again = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0, num_samples=4)
    again.restore(str(tmp_path / "searcher.pkl"))
    final = {**_epoch(2, 0.65), COMPLETE: 1}
    again.on_trial_result("a_00000", final)
    again.on_trial_complete("a_00000", final)
    again.suggest("a_00003")
    study = optuna.load_study(study_name="unit", storage=storage_url(db))
    states = {t.number: t.state for t in study.trials}
    S = optuna.trial.TrialState
    assert states == {0: S.COMPLETE, 1: S.RUNNING, 2: S.FAIL, 3: S.RUNNING}
    assert study.trials[0].intermediate_values == {1: 0.6, 2: 0.65}


# -- the pruning scheduler ----------------------------------------------------------------------


class _Trial(SimpleNamespace):
    def __str__(self) -> str:
        return self.name


def test_fold_pruner_stops_between_folds_and_keeps_asha_decisions():
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from breastfusion.distributed.pruning import FoldPruner

    pruner = FoldPruner(FIFOScheduler(), 3, margin=0.01)
    best = _Trial(trial_id="b", name="t00000_best")
    pruner.on_trial_complete(None, best, {**fold_summary(_outcomes(BEST.aucs), [0, 1, 2])})
    weak = _Trial(trial_id="w", name="t00001_weak")
    mid_fold = {METRIC: 0.1, "training_iteration": 1}
    assert pruner.on_trial_result(None, weak, mid_fold) == TrialScheduler.CONTINUE
    closing = {**fold_summary(_outcomes({0: 0.5}), [0, 1, 2]), FOLD_DONE: 0}
    assert pruner.on_trial_result(None, weak, closing) == TrialScheduler.STOP
    ok = {**fold_summary(_outcomes({0: 0.82}), [0, 1, 2]), FOLD_DONE: 0}
    assert pruner.on_trial_result(None, weak, ok) == TrialScheduler.CONTINUE
    off = FoldPruner(FIFOScheduler(), 3, margin=0.01, enabled=False)
    off.on_trial_complete(None, best, {**fold_summary(_outcomes(BEST.aucs), [0, 1, 2])})
    assert off.on_trial_result(None, weak, closing) == TrialScheduler.CONTINUE


# -- interrupts -----------------------------------------------------------------------------------


def test_interrupt_guard_takes_tunes_graceful_path_then_aborts():
    from breastfusion.errors import Terminated

    calls = []
    lines: list[str] = []
    guard = session.InterruptGuard(lines.append)
    with guard:
        signal.signal(signal.SIGINT, lambda s, f: calls.append(s))  # stands in for Tune's
        guard.adopt_tune_handler()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # first: graceful
        assert calls == [signal.SIGINT] and guard.exit_code == 143
        assert "interrupt again to abort" in lines[0]
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # second: at once
        with pytest.raises(Terminated):
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    plain = session.InterruptGuard(lines.append)
    with plain, pytest.raises(KeyboardInterrupt):  # before Tune runs: stop at once
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert plain.exit_code == 130


# -- what stays on disk -------------------------------------------------------------------------


def test_keep_checkpoints_best_keeps_the_tie_band_and_drops_scratch(tmp_path):
    search = runs.SearchDir(tmp_path)
    for name, aucs in {"t1": (0.80, 0.80), "t2": (0.8005, 0.8), "t3": (0.7, 0.7)}.items():
        for k, auc in enumerate(aucs):
            _write_fold(search.trial(name).path, k, auc)
    partial = search.trial("t3").path / "fold2" / runs.FOLD_CHECKPOINTS
    partial.mkdir(parents=True)
    rows = pd.DataFrame(
        [
            {"trial": n, "status": "complete", "mean_auc": m, "std_auc": 0.0}
            for n, m in (("t1", 0.80), ("t2", 0.80025), ("t3", 0.7))
        ]
    )
    cands = results.candidates(rows, Config(), "unit")
    keep = results.keep_set(cands)
    assert keep == {"t1", "t2"}
    results.keep_only(search, keep)
    results.remove_partial_folds(search)
    assert (search.trial("t1").fold(0).model_path).is_file()
    assert (search.trial("t2").fold(1).model_path).is_file()
    assert not (search.trial("t3").fold(0).model_path).exists()
    assert (search.trial("t3").fold(0).path / runs.FOLD_METRICS).is_file()  # results stay
    assert not partial.parent.exists()


def test_keep_checkpoints_none_drops_every_ended_trials_models_but_not_an_errored_ones(tmp_path):
    from breastfusion.distributed import search as S

    folder = runs.SearchDir(tmp_path)
    for name in ("ok", "failed"):
        for k in (0, 1):
            _write_fold(folder.trial(name).path, k, 0.8)
    space = parse_space({**SPACE, "keep_checkpoints": "none"})
    plan = SimpleNamespace(space=space, out=tmp_path, folds=[0, 1])
    live = SimpleNamespace(references={})
    S._trim(plan, live, "failed", errored=True)  # may be retried: its folds stay
    S._trim(plan, live, "ok", errored=False)
    assert not folder.trial("ok").fold(0).model_path.exists()
    assert (folder.trial("ok").fold(0).path / runs.FOLD_METRICS).is_file()
    assert folder.trial("failed").fold(1).model_path.is_file()
    with pytest.raises(Exception, match="keep_checkpoints"):
        parse_space({**SPACE, "keep_checkpoints": "some"})


def test_a_finished_search_drops_tunes_state_and_resume_returns_its_result(tmp_path):
    """Ray's experiment state names the folder's absolute place: a finished search drops it
    (the folder can move), and ``--resume`` then returns the result instead of re-running."""
    from breastfusion.distributed import search as S

    folder = runs.SearchDir(tmp_path)
    exp = folder.tune_dir / "unit"
    (exp / "t1").mkdir(parents=True)
    (exp / "t1" / "result.json").write_text("{}")
    for name in ("experiment_state-x.json", "basic-variant-state-x.json", "tuner.pkl"):
        (exp / name).write_text(str(tmp_path))
    folder.write_trials_table(
        pd.DataFrame([{"trial": "t1", "status": "complete", "mean_auc": 0.8}])
    )
    folder.write_best({"trial": "t1", "fingerprint": "f1"})
    assert S._already_complete(folder, "unit", "f1") is None  # Tune could restore it
    S._drop_tune_state(folder, "unit")
    assert sorted(p.name for p in exp.iterdir()) == ["t1"]  # the trials' own folders stay
    done = S._already_complete(folder, "unit", "f1")
    assert done is not None and done.best["trial"] == "t1" and list(done.trials["trial"]) == ["t1"]
    assert S._already_complete(folder, "unit", "another") is None  # another experiment


# -- progress lines -------------------------------------------------------------------------------


def test_progress_lines_say_index_folds_best_and_eta(tmp_path):
    from breastfusion.distributed.progress import Progress

    lines: list[str] = []
    live = session.Session(
        out=tmp_path,
        folds=[0, 1],
        epochs=2,
        n_trials=3,
        base_config={},
        echo=lines.append,
        guard=session.InterruptGuard(lines.append),
    )
    live.references["t00009_x"] = Reference("t00009_x", 0.81, {0: 0.8, 1: 0.82})
    p = Progress(n_folds=2, epochs=2, n_trials=3, max_failures=1)
    t = _Trial(trial_id="x_00001", name="t00001_lr=1e-3", status="RUNNING", last_result={})
    trials = [_Trial(trial_id="x_00000", name="t0", status="TERMINATED", last_result={}), t]
    with session.active(live):
        p.setup()
        p.on_trial_start(0, trials, t)
        r = {"training_iteration": 1, METRIC: 0.7, FOLD_DONE: 0, "auc/fold0": 0.7}
        r.update(folds_done=1, degenerate_folds="0", degenerate_reason="2 distinct scores")
        p.on_trial_result(0, trials, t, r)
    assert lines[0] == "  [2/3] t00001_lr=1e-3: started"
    assert "fold 0 AUC 0.700 DEGENERATE (2 distinct scores)" in lines[1]
    assert "(1/2 folds" in lines[1] and "best so far 0.810 (t00009)" in lines[1]
    assert "1/3 trials ended" in lines[1] and "ETA ≤" in lines[1]


# -- resuming a moved search ----------------------------------------------------------------------


SPACE = {
    "name": "moved",
    "algorithm": "random",
    "num_samples": 1,
    "scheduler": "none",
    "fixed": {"data.modality": "fusion"},
    "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
}


def _cohort_with_splits(root: Path, outside: bool = False) -> tuple[Path, Path]:
    """A tiny synthetic cohort under ``root`` and its splits; ``outside``: the manifest lives
    in ``root/lists`` and reaches the images through ``..``."""
    import pandas as pd

    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits
    from breastfusion.data.synthetic import generate_cohort
    from breastfusion.io import sha256_file

    manifest = generate_cohort(root / "cohort", n_patients=20, seed=0, size=32)
    if outside:
        df = pd.read_csv(manifest)
        df["path"] = "../cohort/" + df["path"]
        (root / "lists").mkdir()
        manifest = root / "lists" / "manifest.csv"
        df.to_csv(manifest, index=False)
    frame = load_manifest(manifest, allow_outside=outside)
    made = make_splits(frame, folds=2, holdout=0.2, seed=0, manifest_sha256=sha256_file(manifest))
    return manifest, write_splits(made, root / "splits.json")


@pytest.fixture
def no_tune(monkeypatch) -> list:
    """The search's Tune run is a stand-in that returns its plan; everything before it is
    real (checks, claim, fingerprint, experiment.json)."""
    from breastfusion.distributed import search as S

    ran: list = []
    monkeypatch.setattr(S, "_run_tune", lambda plan: ran.append(plan) or plan)
    return ran


@pytest.fixture
def partial_search(tmp_path, no_tune):
    """A cohort and a search folder side by side in ``tmp_path/a``, as a study keeps them."""
    from breastfusion.distributed.search import search

    root = tmp_path / "a"
    manifest, splits = _cohort_with_splits(root)
    space = parse_space(SPACE)

    def run(where: Path, resume: bool):
        manifest_there = where / "cohort" / manifest.name
        out = where / "search"
        return search(
            space, manifest_there, where / splits.name, out, resume=resume, echo=lambda _: None
        )

    run(root, resume=False)
    return SimpleNamespace(root=root, run=run, ran=no_tune)


def test_a_moved_search_resumes_and_changed_data_is_refused(partial_search, tmp_path):
    from breastfusion.errors import UserError

    first = partial_search.ran[-1]
    moved = tmp_path / "b"
    partial_search.root.rename(moved)  # mv a b
    plan = partial_search.run(moved, resume=True)
    assert plan.fingerprint == first.fingerprint and plan.out == moved / "search"
    assert plan.base.data.manifest == str(moved / "cohort" / "manifest.csv")
    record = json.loads((moved / "search" / runs.EXPERIMENT_FILE).read_text())
    assert record["fingerprint"] == first.fingerprint
    assert str(partial_search.root) not in json.dumps(record)

    manifest = moved / "cohort" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace(",CC,", ",MLO,", 1))
    with pytest.raises(UserError) as info:
        partial_search.run(moved, resume=True)
    message = str(info.value)
    assert f"{moved / 'search'} holds a different experiment" in message
    assert "the manifest's content changed" in message
    assert "base configuration" not in message  # the new place is not a difference


def test_a_search_fingerprinted_with_its_paths_still_resumes_in_place(partial_search):
    """Searches started before the fingerprint left the paths out resume where they are."""
    root = partial_search.root
    path = root / "search" / runs.EXPERIMENT_FILE
    record = json.loads(path.read_text())
    plan = partial_search.ran[-1]
    record["base_config_hash"] = plan.base.config_hash()  # as such a search recorded it
    record["fingerprint"] = earlier = _sha256_json(
        {k: v for k, v in record.items() if k != "fingerprint"}
    )
    path.write_text(json.dumps(record))
    resumed = partial_search.run(root, resume=True)
    assert resumed.fingerprint == plan.fingerprint != earlier
    assert json.loads(path.read_text())["fingerprint"] == plan.fingerprint


def test_search_reads_a_manifest_outside_its_folder_only_when_allowed(
    tmp_path, no_tune, capsys, monkeypatch
):
    from breastfusion.cli import main
    from breastfusion.distributed import search as S
    from breastfusion.distributed.search import SearchSummary, search
    from breastfusion.errors import UserError

    manifest, splits = _cohort_with_splits(tmp_path, outside=True)
    space = parse_space(SPACE)
    with pytest.raises(UserError) as info:
        search(space, manifest, splits, tmp_path / "s1", echo=lambda _: None)
    assert "leaves the manifest's folder" in str(info.value)
    assert "set data.allow_outside" in str(info.value)
    assert not (tmp_path / "s1").exists()

    allowed = Config().with_overrides({"data.allow_outside": True})
    plan = search(space, manifest, splits, tmp_path / "s2", base=allowed, echo=lambda _: None)
    assert plan.base.data.allow_outside  # every trial's load_cohort gets it
    assert "--allow-outside --resume" in plan.resume_command

    # The command: the flag reaches the search, and the refusal names the flag.
    (tmp_path / "space.yaml").write_text(json.dumps(SPACE))
    argv = ["search", "--space", str(tmp_path / "space.yaml"), "--manifest", str(manifest)]
    argv += ["--splits", str(splits)]
    assert main([*argv, "--out", str(tmp_path / "s3")]) == 2
    err = capsys.readouterr().err
    assert "pass --allow-outside to permit it" in err and "Traceback" not in err
    table = pd.DataFrame({"trial": ["t0"], "mean_auc": [0.5]})
    finished = SearchSummary(tmp_path / "s4", table, {})
    monkeypatch.setattr(S, "_run_tune", lambda plan: no_tune.append(plan) or finished)
    assert main([*argv, "--out", str(tmp_path / "s4"), "--allow-outside"]) == 0
    assert no_tune[-1].base.data.allow_outside


def test_cohort_facts_name_what_the_left_out_patients_lack():
    from types import SimpleNamespace

    import pandas as pd

    from breastfusion.config import Config
    from breastfusion.distributed.experiment import cohort_facts

    df = pd.DataFrame(
        {
            "patient_id": ["a", "a", "b", "c", "c"],
            "modality": ["DM", "US", "DM", "US", "US"],
            "y": [1, 1, 0, 0, 0],
        }
    )
    split_set = SimpleNamespace(development=["a", "b", "c"], k=2)
    fusion = cohort_facts(df, split_set, Config(), [0, 1])
    assert "3 development patients (1 malignant)" in fusion[0]
    assert "2 patient(s) lack a DM or a US image" in fusion[1]
    dm = cohort_facts(df, split_set, Config().with_overrides({"data.modality": "dm"}), [0])
    assert "1 patient(s) lack a DM image" in dm[1]


def test_rays_experiment_state_sync_race_is_one_line_not_a_traceback():
    """Ray's own race (copying its state while renaming tmp-searcher-state) logs a traceback
    under load; the console keeps the message on one line."""
    import logging
    import sys

    from breastfusion.distributed.tuning import quiet_tune

    quiet_tune()
    logger = logging.getLogger("ray.tune.execution.experiment_state")
    try:
        raise FileNotFoundError("tmp-searcher-state-x.pkl")
    except FileNotFoundError:
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1,
            "Saving experiment state to storage at '%s' failed with exception: ", ("/x",),
            sys.exc_info(),
        )  # fmt: skip
    assert all(f.filter(record) for f in logger.filters)
    text = logging.Formatter().format(record)
    assert text.count("\n") == 0 and "Traceback" not in text
    assert "'/x' failed" in text and "FileNotFoundError: tmp-searcher-state-x.pkl" in text
    other = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "other", (), None)
    assert all(f.filter(other) for f in logger.filters) and other.msg == "other"
