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
    read_outcomes,
)
from breastfusion.distributed.space import parse_space

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


def _write_fold(trial: Path, k: int, auc: float | None, *, degenerate=False, model=True, h="h"):
    fold = trial / f"fold{k}"
    fold.mkdir(parents=True, exist_ok=True)
    (fold / runs.FOLD_PREDICTIONS).write_text(
        f"patient_id,y_true,y_score,y_score_raw\np{k}a,1,0.5,0.4\np{k}b,0,-0.5,-0.4\n"
    )
    if model:
        (fold / runs.FOLD_MODEL).write_bytes(b"weights")
    metrics = {"auc": auc, "degenerate": degenerate, "config_hash": h, "fold": k}
    metrics["degenerate_reason"] = "2 distinct score(s)" if degenerate else None
    (fold / runs.FOLD_METRICS).write_text(json.dumps(metrics))
    return fold


def test_read_outcomes_skips_unfinished_and_foreign_folds(tmp_path):
    trial = tmp_path / "t"
    _write_fold(trial, 0, 0.75)
    _write_fold(trial, 1, None, h="other")
    (trial / "fold2").mkdir()  # started, never finished
    done = read_outcomes(runs.TrialDir(trial), [0, 1, 2], {0: "h", 1: "h", 2: "h"})
    assert set(done) == {0}
    done = read_outcomes(runs.TrialDir(trial), [0, 1, 2])
    assert set(done) == {0, 1} and math.isnan(done[1].auc)


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
    searcher = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0)
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


def test_optuna_study_survives_a_restore(tmp_path):
    import optuna

    from breastfusion.distributed.optuna_search import CVOptunaSearch, storage_url

    db = tmp_path / runs.OPTUNA_FILE
    first = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0)
    first.suggest("a_00000")
    first.suggest("a_00001")
    first.on_trial_result("a_00000", _epoch(1, 0.6))
    first.save(str(tmp_path / "searcher.pkl"))
    first.suggest("a_00002")  # asked after the last saved state: lost in a hard kill

    again = CVOptunaSearch(_space().domains, path=db, study_name="unit", seed=0)
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
    from breastfusion.config import Config

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
