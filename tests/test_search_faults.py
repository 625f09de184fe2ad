"""Interrupting ``breastfusion search`` with real signals, and a second driver on a busy folder.

Each test runs the search as a subprocess (its own private Ray) on the debug space turned into
a two-trial grid, signals the driver's pid, and checks what an interrupted search may leave:
exit 130 (SIGINT) / 143 (SIGTERM), the project's own resume command, no ``best.json`` or
``trials.csv``, no partial fold folders — and that ``--resume`` then completes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    src = request.getfixturevalue("synthetic_cohort").parent
    dst = tmp_path_factory.mktemp("faults_cohort") / "cohort"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".cache"))
    manifest = dst / "manifest.csv"
    df = load_manifest(manifest)
    splits = make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest))
    return manifest, write_splits(splits, dst.parent / "splits.json")


def _grid(tmp_path: Path, epochs: int = 1) -> Path:
    raw = yaml.safe_load(DEBUG_SPACE.read_text())
    raw.update(
        name="signals",
        algorithm="grid",
        scheduler="none",
        space={"optim.lr": {"grid": [1.0e-3, 3.0e-3]}},
    )
    raw["fixed"]["optim.epochs"] = epochs
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _argv(space: Path, cohort, out: Path, *extra: str) -> list[str]:
    manifest, splits = cohort
    argv = ["search", "--space", str(space), "--manifest", str(manifest)]
    return [*argv, "--splits", str(splits), "--out", str(out), "--debug", *extra]


def _starts(fault_dir: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for f in sorted(fault_dir.glob("*.start"), key=lambda p: p.stat().st_mtime):
        out.setdefault(f.name.split(".fold")[0], []).append(int(f.read_text()))
    return out


class Driver:
    """``breastfusion search`` in a subprocess, its output in a log file."""

    def __init__(self, argv: list[str], fault_dir: Path, log: Path):
        env = {**os.environ, FAULT_ENV: str(fault_dir), "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        self.log, self.fault_dir = log, fault_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "breastfusion.cli", *argv],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_for_trials(self, n: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(_starts(self.fault_dir)) < n:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"trial {n} never started"
            time.sleep(0.2)

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise

    def kill_tree(self) -> None:
        import psutil

        try:
            pids = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pids = []
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _assert_nothing_marked_done(out: Path) -> None:
    folder = runs.SearchDir(out)
    assert not folder.best_path.exists()
    assert not folder.trials_path.exists()
    for trial in folder.trials_dir.glob("*"):
        for fold in runs.TrialDir(trial).folds():
            assert fold.finished, f"partial fold left behind: {fold.path}"
            assert not (fold.path / runs.FOLD_CHECKPOINTS).exists()


def test_sigint_exits_130_then_resume_completes(cohort, tmp_path, monkeypatch, capsys):
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    space, out = _grid(tmp_path), tmp_path / "out"
    driver = Driver(_argv(space, cohort, out), fault_dir, tmp_path / "first.log")
    try:
        driver.wait_for_trials(2)
        # A second driver on the same folder is refused at once, naming the holder.
        assert main(_argv(space, cohort, out, "--resume")) == 2
        err = capsys.readouterr().err
        assert f"in use by another breastfusion process (pid {driver.proc.pid}" in err
        time.sleep(1.0)
        os.kill(driver.proc.pid, signal.SIGINT)
        assert driver.finish() == 130, driver.log.read_text()[-3000:]
    finally:
        driver.kill_tree()
    log = driver.log.read_text()
    assert re.search(r"Continue with: breastfusion search --space \S+ .*--resume --debug", log)
    assert "Tuner.restore" not in log and "\x1b[" not in log
    _assert_nothing_marked_done(out)
    before = _starts(fault_dir)
    first = next(t for t in before if t.startswith("t00000"))

    monkeypatch.setenv(FAULT_ENV, str(fault_dir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(_argv(space, cohort, out, "--resume")) == 0
    trials = runs.SearchDir(out).trials_table()
    assert len(trials) == 2 and (trials["status"] == "complete").all(), trials.to_string()
    assert _starts(fault_dir)[first] == before[first], "a finished trial was run again"
    assert runs.SearchDir(out).best()["trial"] in set(trials["trial"])


def test_sigterm_exits_143_and_a_second_signal_aborts(cohort, tmp_path):
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    out = tmp_path / "out"
    driver = Driver(_argv(_grid(tmp_path, epochs=3), cohort, out), fault_dir, tmp_path / "log")
    try:
        driver.wait_for_trials(1)
        os.kill(driver.proc.pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(driver.proc.pid, signal.SIGTERM)  # the second one: abort at once
        assert driver.finish() == 143, driver.log.read_text()[-3000:]
    finally:
        driver.kill_tree()
    log = driver.log.read_text()
    assert "Traceback" not in log
    assert "Tuner.restore" not in log
    _assert_nothing_marked_done(out)
