"""``breastfusion search`` end to end on Ray (tiny: fold 0, 2 trials, 1 epoch, 32 px, 24 patients).

One local Ray instance, started by the search's own ``init_ray``, serves the whole module (a
Ray start costs ~20 s on 2 cores). One faulted debug search (module fixture, tracked in a real
MLflow SQLite store) serves several tests: its first trial crashes once (an injected
exception) and its other trial's process is SIGKILLed from outside; both must be retried and
every output written. Fold-parallel trials, ``--resume`` after a hard kill, and DDP over two
CPU workers have their own tests. Interrupts by signal are in ``test_search_faults.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from breastfusion import runs
from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, write_splits
from breastfusion.distributed.trial import FAULT_ENV
from breastfusion.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
DEBUG_SPACE = ROOT / "search_spaces" / "debug.yaml"

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, request) -> tuple[Path, Path]:
    """A private copy of the shared synthetic cohort (the search caches next to the manifest)
    and 2-fold splits without holdout."""
    src = request.getfixturevalue("synthetic_cohort").parent
    dst = tmp_path_factory.mktemp("search_cohort") / "cohort"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    manifest = dst / "manifest.csv"
    df = load_manifest(manifest)
    splits = make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest))
    return manifest, write_splits(splits, dst.parent / "splits.json")


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ray_instance(fault_dir):
    """The search's private local Ray, started once; its workers inherit FAULT_ENV."""
    import ray

    from breastfusion.distributed.ray_local import init_ray

    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, str(fault_dir))
    mp.delenv("RAY_ADDRESS", raising=False)
    started = init_ray()
    assert started
    yield
    ray.shutdown()
    mp.undo()


def search_argv(space: Path, cohort, out: Path, *extra: str) -> list[str]:
    manifest, splits = cohort
    return [
        "search",
        "--space",
        str(space),
        "--manifest",
        str(manifest),
        "--splits",
        str(splits),
        "--out",
        str(out),
        *extra,
    ]


def starts(fault_dir: Path, trials: set[str] | None = None) -> dict[str, list[int]]:
    """trial name → pids of its fold attempts, from the fault hook's ``.start`` files."""
    out: dict[str, list[int]] = {}
    for f in sorted(fault_dir.glob("*.start"), key=lambda p: p.stat().st_mtime):
        trial = f.name.split(".fold")[0]
        if trials is None or trial in trials:
            out.setdefault(trial, []).append(int(f.read_text()))
    return out


class Killer(threading.Thread):
    """Once the injected crash has happened, SIGKILL the first attempt of another trial."""

    def __init__(self, fault_dir: Path, timeout: float = 240):
        super().__init__(daemon=True)
        self.fault_dir, self.deadline = fault_dir, time.monotonic() + timeout
        self.killed: tuple[str, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        crashed: set[str] = set()
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            seen = starts(self.fault_dir)
            if not crashed and (self.fault_dir / "crash-once-fold0.used").exists():
                crashed = set(seen)
            others = {t: p for t, p in seen.items() if crashed and t not in crashed}
            if others:
                trial, pids = next(iter(others.items()))
                time.sleep(0.5)  # let it get into training
                os.kill(pids[0], signal.SIGKILL)
                self.killed = (trial, pids[0])
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def faulted_search(cohort, tmp_path_factory, fault_dir, ray_instance):
    """Run the debug search once with a crash and a kill injected; return what it left."""
    tmp = tmp_path_factory.mktemp("faulted")
    (fault_dir / "crash-once-fold0").write_text("")
    out = tmp / "out"
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    killer = Killer(fault_dir)
    killer.start()
    from click.testing import CliRunner  # captures click.echo from the driver

    from breastfusion.cli import cli

    argv = search_argv(DEBUG_SPACE, cohort, out, "--debug", "--mlflow-uri", mlflow_uri)
    try:
        result = CliRunner().invoke(cli, argv, catch_exceptions=False)
    finally:
        killer.stop.set()
    (tmp / "console.txt").write_text(result.output)  # for a human reading a failure
    return {
        "out": out,
        "exit_code": result.exit_code,
        "output": result.output,
        "fault_dir": fault_dir,
        "killed": killer.killed,
        "mlflow_uri": mlflow_uri,
    }


def _trials(out: Path) -> pd.DataFrame:
    return runs.SearchDir(out).trials_table()


def test_debug_search_writes_every_output(faulted_search):
    out = faulted_search["out"]
    assert faulted_search["exit_code"] == 0, faulted_search["output"][-3000:]
    trials = _trials(out)
    assert len(trials) == 2
    assert {
        "config.optim.lr",
        "config.model.fusion",
        "fold0_auc",
        "mean_auc",
        "std_auc",
        "degenerate",
        "degenerate_folds",
    } <= set(trials.columns)
    assert (trials["status"] == "complete").all(), trials.to_string()
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["debug"] is True and experiment["folds"] == [0]
    for name in trials["trial"]:
        fold = out / "trials" / name / "fold0"
        for f in ("metrics.json", "predictions.csv", "config.yaml", "history.csv"):
            assert (fold / f).is_file(), fold / f
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["fold"] == 0 and metrics["epochs_run"] == 1
        assert metrics["val_patients"] <= 24  # the debug subset
        assert bool(metrics["degenerate"]) == bool(trials.set_index("trial").at[name, "degenerate"])
        oof = pd.read_csv(out / "trials" / name / "oof_predictions.csv", dtype={"patient_id": str})
        assert list(oof.columns[:4]) == ["fold", "patient_id", "y_true", "y_score"]
        assert oof["patient_id"].is_unique and len(oof) == metrics["n_patients"]
        assert not (fold / runs.FOLD_CHECKPOINTS).exists()  # no scratch left
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"bf-ckpt-*{os.getpid()}"))


def test_best_is_the_projects_rule_and_only_its_models_are_kept(faulted_search):
    out = faulted_search["out"]
    trials = _trials(out)
    search = runs.SearchDir(out)
    cands = [
        runs.candidate("debug-debug", row, search.trial(row["trial"]).config())
        for row in trials.to_dict("records")
    ]
    chosen = runs.choose_best(cands)
    best = search.best()
    assert chosen is not None and best["trial"] == chosen.trial
    assert best["score"] == chosen.score
    assert set(best["config"]) == {"optim.lr", "model.fusion"}
    assert best["rule"] == runs.selection_rule()
    kept = {best["trial"], *best["tied"]}
    for name in trials["trial"]:
        model = search.trial(name).fold(0).model_path
        assert model.is_file() == (name in kept), name  # keep_checkpoints: best (default)


def test_aggregate_picks_the_same_best_trial_as_the_search(faulted_search, tmp_path):
    """One best rule: `aggregate` over the search folder names the trial best.json names."""
    from breastfusion.evaluate.aggregate import aggregate

    out = faulted_search["out"]
    result = aggregate([out], tmp_path / "agg", n_boot=200)
    assert result.best["trial"] == runs.SearchDir(out).best()["trial"]
    assert result.best["score"]["value"] == runs.SearchDir(out).best()["score"]


def test_optuna_study_holds_the_cross_validated_objectives(faulted_search):
    import optuna

    out = faulted_search["out"]
    trials = _trials(out).set_index("trial")
    study = optuna.load_study(
        study_name="debug-debug", storage=f"sqlite:///{runs.SearchDir(out).optuna_path}"
    )
    assert len(study.trials) == 2
    for t in study.trials:
        row = trials.loc[t.user_attrs["trial"]]
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.value == row["mean_auc"]  # bit for bit


def test_mlflow_has_one_nested_run_per_trial(faulted_search):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=faulted_search["mlflow_uri"])
    exp = client.get_experiment_by_name("breastfusion-debug-debug")
    assert exp is not None
    runs_ = client.search_runs([exp.experiment_id])
    parents = [r for r in runs_ if r.data.tags.get("breastfusion.kind") == "search"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs_ if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    trials = _trials(faulted_search["out"]).set_index("trial")
    assert sorted(r.info.run_name for r in children) == sorted(trials.index)
    for r in children:
        row = trials.loc[r.info.run_name]
        assert r.data.params["model.fusion"] == row["config.model.fusion"]
        assert float(r.data.params["optim.lr"]) == row["config.optim.lr"]
        assert r.data.metrics["cv_auc"] == row["mean_auc"]
        history = client.get_metric_history(r.info.run_id, "fold0/val_auc")
        assert [m.step for m in history] == [1]  # the fold's own epoch
        assert r.info.status == "FINISHED"


def test_trial_names_say_the_configuration(faulted_search):
    trials = _trials(faulted_search["out"])
    for _, row in trials.iterrows():
        assert f"head={row['config.model.fusion']}" in row["trial"]
        assert "lr=" in row["trial"]


def test_curves_are_per_fold_by_epoch_without_tunes_tags(faulted_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = faulted_search["out"]
    for name in _trials(out)["trial"]:
        board = out / "trials" / name / "fold0" / runs.FOLD_TENSORBOARD
        files = list(board.glob("events.out.tfevents*"))
        assert files, board
        acc = EventAccumulator(str(board))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"fold0/val_auc", "fold0/train_loss"} <= tags, sorted(tags)
        assert [e.step for e in acc.Scalars("fold0/val_auc")] == [1]
        assert not any(t in tags for t in ("done", "should_checkpoint", "training_iteration"))
    assert not list((out / "tune").rglob("events.out.tfevents*"))  # Tune's logger is off


def test_crashed_and_killed_trials_are_retried(faulted_search):
    names = set(_trials(faulted_search["out"])["trial"])
    attempts = starts(faulted_search["fault_dir"], names)
    assert (faulted_search["fault_dir"] / "crash-once-fold0.used").exists()
    assert faulted_search["killed"] is not None, "the killer never saw a second trial start"
    # Every trial that was hit ran its fold again (a new attempt), and all finished.
    assert sorted(len(p) for p in attempts.values()) == [2, 2], attempts
    killed_trial, killed_pid = faulted_search["killed"]
    assert attempts[killed_trial][0] == killed_pid
    assert "crashed (failure 1" in faulted_search["output"]
    assert "RuntimeError: injected failure" in faulted_search["output"]
    assert "actor died" in faulted_search["output"].lower()


def test_console_output_is_short_and_readable(faulted_search):
    output = faulted_search["output"]
    lines = output.splitlines()
    assert len(lines) < 40, output
    assert re.search(r"\[\d/2\] \S+: started", output)
    assert "fold 0 AUC" in output and "finished: CV AUC" in output
    assert "best so far" in output and "ETA ≤" in output
    assert output.count("left out of every fold") <= 1
    assert "paired dataset" not in output  # the cohort facts are said once, by the driver
    assert "\x1b[" not in output  # no ANSI colour in captured output
    assert "Tuner.restore" not in output
    assert any(ln.startswith("wrote") and "trials.csv" in ln for ln in lines)
    assert "Traceback" not in output  # tracebacks stay in each trial's error.txt


def _ray_sockets() -> list[tuple[str, str]]:
    """(local address, process) of every listening TCP socket of this process's descendants."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    found = []
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & mine:
            found.append((line.split()[3], line.split()[-1]))
    return found


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_local_ray_listens_on_loopback_only_at_our_niceness(faulted_search):
    import psutil

    sockets = _ray_sockets()
    names = " ".join(proc for _, proc in sockets)
    for needed in ("gcs_server", "raylet", "ray::"):
        assert needed in names, sockets
    for address, proc in sockets:
        host = address.rsplit(":", 1)[0]
        assert host in ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"), (address, proc)
    workers = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::")]
    assert workers
    assert {p.nice() for p in workers} == {os.nice(0)}  # not Ray's default +15


# -- fold-parallel trials --------------------------------------------------------------------


def test_fold_parallel_trains_both_folds_at_once(cohort, tmp_path, fault_dir, ray_instance):
    from breastfusion.distributed.search import search

    raw = yaml.safe_load(DEBUG_SPACE.read_text())
    raw.update(
        name="folds-at-once",
        algorithm="grid",
        scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
        fold_parallel=True,
        resources={"cpu": 1, "gpu": 0},
        max_failures=0,
        num_samples=1,
        space={"optim.lr": {"grid": [2.0e-3]}},
    )
    raw["fixed"]["optim.epochs"] = 2
    space = tmp_path / "parallel.yaml"
    space.write_text(yaml.safe_dump(raw))
    manifest, splits = cohort
    out = tmp_path / "out"
    summary = search(space, manifest, splits, out, echo=lambda line: None)
    (row,) = summary.trials.to_dict("records")
    assert row["status"] == "complete" and row["folds_done"] == 2, row
    attempts = starts(fault_dir, {row["trial"]})[row["trial"]]
    assert len(set(attempts)) == 2  # two processes, one per fold
    trial = runs.SearchDir(out).trial(row["trial"])
    begun = sorted(f.stat().st_mtime for f in fault_dir.glob(f"{row['trial']}.fold*.start"))
    ended = min(trial.fold(k).path.joinpath(runs.FOLD_METRICS).stat().st_mtime for k in (0, 1))
    assert begun[-1] < ended  # the second fold started before the first one finished
    results = [
        json.loads(line)
        for line in next((out / "tune" / "folds-at-once").glob("*/result.json"))
        .read_text()
        .split("\n")
        if line.strip()
    ]
    epochs = [r for r in results if "fold_done" not in r]
    assert len(epochs) == 1  # one result per epoch of both folds (the last carries the summary)
    assert {"fold0/val_auc", "fold1/val_auc"} <= set(results[0])
    assert results[-1]["cv_auc"] == row["mean_auc"]


# -- resume after a hard interruption ------------------------------------------------------------


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray), by id."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def grid_space(tmp_path: Path, lrs: list[float], name: str) -> Path:
    raw = yaml.safe_load(DEBUG_SPACE.read_text())
    raw.update(name=name, algorithm="grid", scheduler="none", space={"optim.lr": {"grid": lrs}})
    space = tmp_path / f"{name}.yaml"
    space.write_text(yaml.safe_dump(raw))
    return space


@pytest.mark.slow  # the SIGINT path (test_search_faults.py) covers --resume by default
def test_resume_continues_without_rerunning_finished_trials(
    cohort, tmp_path, fault_dir, ray_instance
):
    # Two sequential grid trials; the driver is SIGKILLed once the second trial is training.
    space = grid_space(tmp_path, [1.1e-3, 3.1e-3], "killed")
    out = tmp_path / "out"
    env = {**os.environ, FAULT_ENV: str(fault_dir), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "breastfusion.cli", *search_argv(space, cohort, out, "--debug")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def ours() -> dict[str, list[int]]:
        return {t: p for t, p in starts(fault_dir).items() if re.search(r"lr=(1.1|3.1)e-03", t)}

    try:
        deadline = time.monotonic() + 240
        while len(ours()) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second trial never started"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        _kill_tree(proc)
    assert not (out / "trials.csv").exists()  # it really was interrupted
    before = ours()
    first = next(t for t in before if t.startswith("t00000"))

    assert main([*search_argv(space, cohort, out, "--debug"), "--resume"]) == 0
    after = ours()
    assert after[first] == before[first], "a finished trial was run again"
    trials = _trials(out)
    assert len(trials) == 2 and (trials["status"] == "complete").all(), trials.to_string()
    assert sorted(trials["config.optim.lr"]) == [1.1e-3, 3.1e-3]


# -- DDP: TorchTrainer with two CPU workers (gloo) -----------------------------------------------


def test_training_loader_is_sharded_and_validation_is_not(cohort):
    from breastfusion.config import Config
    from breastfusion.distributed.ray_train import shard_training_loader
    from breastfusion.engine.fold import build_fold_data

    manifest, splits = cohort
    cfg = Config().with_overrides(
        {
            "data.manifest": str(manifest),
            "data.splits": str(splits),
            "data.size_dm": 32,
            "data.size_us": 32,
            "data.num_workers": 0,
            "optim.batch_size": 4,
        }
    )
    data = build_fold_data(cfg)
    assert shard_training_loader(data.val_loader, 0, 2) is data.val_loader
    shards = [shard_training_loader(data.train_loader, r, 2) for r in (0, 1)]
    drawn = []
    for shard in shards:  # the engine re-seeds this every epoch, identically on every rank
        shard.sampler.generator.manual_seed(7)
        drawn.append(list(iter(shard.sampler)))
    data.train_loader.sampler.generator.manual_seed(7)
    full = list(iter(data.train_loader.sampler))
    assert len(drawn[0]) == len(drawn[1]) == -(-len(full) // 2)
    # Interleaving the two ranks' shards gives back the single-process draw (oversampling kept).
    merged = [i for pair in zip(*drawn, strict=True) for i in pair][: len(full)]
    assert merged == full


@pytest.mark.slow
def test_ddp_two_cpu_workers_train_one_fold_on_the_full_validation_set(cohort, tmp_path):
    from breastfusion.config import Config
    from breastfusion.distributed.search import search
    from breastfusion.engine.data import fold_patients, load_cohort

    raw = yaml.safe_load(DEBUG_SPACE.read_text())
    raw.update(
        name="ddp",
        algorithm="grid",
        scheduler="none",
        workers=2,
        resources={"cpu": 0.5, "gpu": 0},
        max_failures=0,
        num_samples=1,
        space={"optim.lr": {"grid": [1.0e-3]}},
    )
    raw["fixed"]["optim.epochs"] = 2
    space = tmp_path / "ddp.yaml"
    space.write_text(yaml.safe_dump(raw))
    manifest, splits = cohort
    out = tmp_path / "out"
    summary = search(space, manifest, splits, out, folds=[0])
    (row,) = summary.trials.to_dict("records")
    assert row["status"] == "complete", row
    fold = out / "trials" / row["trial"] / "fold0"
    metrics = json.loads((fold / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2
    # Validation covered every validation patient (not a 1/2 DistributedSampler shard).
    cfg = Config().with_overrides(
        {"data.manifest": str(manifest), "data.splits": str(splits), "data.max_patients": 24}
    )
    _, val_ids = fold_patients(cfg, load_cohort(cfg))
    predictions = pd.read_csv(fold / "predictions.csv", dtype={"patient_id": str})
    assert predictions["patient_id"].is_unique
    assert len(predictions) == metrics["n_patients"] == metrics["val_patients"]
    assert set(predictions["patient_id"]) <= set(val_ids)
    assert len(predictions) >= len(val_ids) - metrics["excluded_patients"]
    # Only rank 0's outputs came back: one model, no rank scratch folders left behind.
    assert {"config.yaml", "metrics.json", "model.pt", "predictions.csv"} <= {
        p.name for p in fold.iterdir()
    }
    assert not (fold / runs.FOLD_CHECKPOINTS).exists()
    assert not list((out / "tune" / "_ddp").glob("*/*"))
    # Per-epoch curves reached Tune through the TorchTrainer, fold-tagged, one row per epoch.
    lines = next((out / "tune" / "ddp").glob("*/result.json")).read_text().splitlines()
    results = [json.loads(line) for line in lines if line.strip()]
    assert [r["fold0/epoch"] for r in results] == [1, 2]
    assert all(r["fold0/val_auc"] == r["fold0/val_auc"] for r in results)
