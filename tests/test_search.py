"""``breastfusion search`` end to end on Ray (tiny: fold 0, 2 trials, 1 epoch, 32 px, 24 patients).

One faulted debug search (module fixture) serves several tests: its first trial crashes once
(an injected exception) and its other trial's process is SIGKILLed from outside; both must be
retried and every output written. ``--resume`` after a hard interruption, and DDP over two CPU
workers, are slower and marked ``slow``.
"""

from __future__ import annotations

import json
import os
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

from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, write_splits
from breastfusion.distributed.search import FAULT_ENV
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


def starts(fault_dir: Path) -> dict[str, list[int]]:
    """trial name → pids of its fold attempts, from the fault hook's ``.start`` files."""
    out: dict[str, list[int]] = {}
    for f in sorted(fault_dir.glob("*.start"), key=lambda p: p.stat().st_mtime):
        trial = f.name.split(".fold")[0]
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
def faulted_search(cohort, tmp_path_factory):
    """Run the debug search once with a crash and a kill injected; return what it left."""
    tmp = tmp_path_factory.mktemp("faulted")
    fault_dir = tmp / "faults"
    fault_dir.mkdir()
    (fault_dir / "crash-once-fold0").write_text("")
    out = tmp / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, str(fault_dir))  # inherited by Ray's workers (ray.init happens later)
    mp.delenv("RAY_ADDRESS", raising=False)
    killer = Killer(fault_dir)
    killer.start()
    from click.testing import CliRunner  # captures click.echo from the driver

    from breastfusion.cli import cli

    start = time.monotonic()
    try:
        result = CliRunner().invoke(
            cli, search_argv(DEBUG_SPACE, cohort, out, "--debug"), catch_exceptions=False
        )
    finally:
        killer.stop.set()
        mp.undo()
    (tmp / "console.txt").write_text(result.output)  # for a human reading a failure
    return {
        "out": out,
        "exit_code": result.exit_code,
        "output": result.output,
        "seconds": time.monotonic() - start,
        "fault_dir": fault_dir,
        "killed": killer.killed,
    }


def test_debug_search_writes_every_output(faulted_search):
    out = faulted_search["out"]
    assert faulted_search["exit_code"] == 0, faulted_search["output"][-3000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2
    assert {"config.optim.lr", "config.model.fusion", "fold0_auc", "mean_auc", "std_auc"} <= set(
        trials.columns
    )
    assert (trials["status"] == "complete").all(), trials.to_string()
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] in set(trials["trial"])
    assert best["score"] == pytest.approx(trials["mean_auc"].max())
    assert set(best["config"]) == {"optim.lr", "model.fusion"}
    experiment = json.loads((out / "experiment.json").read_text())
    assert experiment["debug"] is True and experiment["folds"] == [0]
    for name in trials["trial"]:
        fold = out / "trials" / name / "fold0"
        for f in ("metrics.json", "predictions.csv", "config.yaml", "model.pt"):
            assert (fold / f).is_file(), fold / f
        metrics = json.loads((fold / "metrics.json").read_text())
        assert metrics["fold"] == 0 and metrics["epochs_run"] == 1
        assert metrics["val_patients"] <= 24  # the debug subset
        oof = pd.read_csv(out / "trials" / name / "oof_predictions.csv", dtype={"patient_id": str})
        assert list(oof.columns[:4]) == ["fold", "patient_id", "y_true", "y_score"]
        assert oof["patient_id"].is_unique and len(oof) == metrics["n_patients"]
    # No scratch folders left in the experiment.
    assert not list((out / "tune").glob("*/*/work-*"))


def test_trial_names_say_the_configuration(faulted_search):
    trials = pd.read_csv(faulted_search["out"] / "trials.csv")
    for _, row in trials.iterrows():
        assert f"head={row['config.model.fusion']}" in row["trial"]
        assert "lr=" in row["trial"]


def test_tensorboard_has_fold_tagged_curves(faulted_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trial_dirs = [d for d in (faulted_search["out"] / "tune").glob("*/*") if d.is_dir()]
    assert len(trial_dirs) == 2
    for d in trial_dirs:
        tags: set[str] = set()
        for f in d.glob("events.out.tfevents*"):  # one file per attempt of a retried trial
            acc = EventAccumulator(str(f))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        for tag in ("ray/tune/fold0/val_auc", "ray/tune/fold0/train_loss", "ray/tune/cv_auc"):
            assert tag in tags, sorted(tags)


def test_crashed_and_killed_trials_are_retried(faulted_search):
    attempts = starts(faulted_search["fault_dir"])
    assert (faulted_search["fault_dir"] / "crash-once-fold0.used").exists()
    assert faulted_search["killed"] is not None, "the killer never saw a second trial start"
    # Every trial that was hit ran its fold again (a new process), and all finished.
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
    assert "fold 0 AUC" in output and "finished, cv_auc" in output
    assert any(ln.startswith("wrote") and "trials.csv" in ln for ln in lines)
    assert "Traceback" not in output  # tracebacks stay in each trial's error.txt


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


def test_resume_continues_without_rerunning_finished_trials(cohort, tmp_path):
    # Two sequential grid trials; the driver is SIGKILLed once the second trial is training.
    raw = yaml.safe_load(DEBUG_SPACE.read_text())
    raw.update(
        algorithm="grid",
        scheduler="none",
        space={"optim.lr": {"grid": [1.0e-3, 3.0e-3]}},
    )
    space = tmp_path / "grid.yaml"
    space.write_text(yaml.safe_dump(raw))
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, FAULT_ENV: str(fault_dir), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "breastfusion.cli", *search_argv(space, cohort, out, "--debug")]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 240
        while len(starts(fault_dir)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second trial never started"
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        _kill_tree(proc)
    assert not (out / "trials.csv").exists()  # it really was interrupted
    before = starts(fault_dir)
    first = next(t for t in before if t.startswith("t00000"))

    assert main([*search_argv(space, cohort, out, "--debug"), "--resume"]) == 0
    after = starts(fault_dir)
    assert after[first] == before[first], "a finished trial was run again"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "complete").all(), trials.to_string()
    assert sorted(trials["config.optim.lr"]) == [1.0e-3, 3.0e-3]


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
    from breastfusion.distributed.search import search
    from breastfusion.engine.fold import _fold_patients

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
    from breastfusion.config import Config

    cfg = Config().with_overrides(
        {"data.manifest": str(manifest), "data.splits": str(splits), "data.max_patients": 24}
    )
    _, _, val_ids = _fold_patients(cfg)
    predictions = pd.read_csv(fold / "predictions.csv", dtype={"patient_id": str})
    assert predictions["patient_id"].is_unique
    assert len(predictions) == metrics["n_patients"] == metrics["val_patients"]
    assert set(predictions["patient_id"]) <= set(val_ids)
    assert len(predictions) >= len(val_ids) - metrics["excluded_patients"]
    # Only rank 0's outputs came back: one model, no rank scratch folders left behind.
    assert sorted(p.name for p in fold.iterdir()) == [
        "config.yaml",
        "metrics.json",
        "model.pt",
        "predictions.csv",
    ]
    assert not list((out / "tune" / "_ddp").glob("*/*"))
    # Per-epoch curves reached Tune through the TorchTrainer, fold-tagged, one row per epoch.
    progress = pd.read_csv(next((out / "tune" / "ddp").glob("*/progress.csv")))
    assert list(progress["fold0/epoch"]) == [1, 2]
    assert progress["fold0/val_auc"].notna().all()
