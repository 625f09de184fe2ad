"""A real search interrupted, moved with its data (``mv``), and resumed from the new place.

The fast checks of the rule (fingerprint by content, folds recognised wherever the data lay)
are in ``test_search_units.py``; this one runs Ray Tune: its experiment state, the Optuna-free
grid and the trials' fold folders all have to survive the move.
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from breastfusion import runs
from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, write_splits
from breastfusion.distributed.trial import FAULT_ENV
from breastfusion.io import sha256_file
from test_search_faults import Driver, _argv, _assert_nothing_marked_done, _grid, _starts

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_an_interrupted_search_moved_with_its_data_resumes(synthetic_cohort, tmp_path, monkeypatch):
    place = tmp_path / "a"
    shutil.copytree(
        synthetic_cohort.parent, place / "cohort", ignore=shutil.ignore_patterns(".cache")
    )
    manifest = place / "cohort" / "manifest.csv"
    made = make_splits(load_manifest(manifest), folds=2, holdout=0.0, seed=0,
                       manifest_sha256=sha256_file(manifest))  # fmt: skip
    cohort = (manifest, write_splits(made, place / "splits.json"))
    fault_dir = tmp_path / "faults"
    fault_dir.mkdir()
    space, out = _grid(tmp_path), place / "search"
    driver = Driver(_argv(space, cohort, out), fault_dir, tmp_path / "first.log")
    try:
        driver.wait_for_trials(2)
        os.kill(driver.proc.pid, signal.SIGINT)
        assert driver.finish() == 130, driver.log.read_text()[-3000:]
    finally:
        driver.kill_tree()
    _assert_nothing_marked_done(out)
    before = _starts(fault_dir)
    first = next(t for t in before if t.startswith("t00000"))

    moved = tmp_path / "b"
    place.rename(moved)  # mv a b: the cohort, its splits and the search
    cohort = (moved / "cohort" / "manifest.csv", moved / "splits.json")
    monkeypatch.setenv(FAULT_ENV, str(fault_dir))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(_argv(space, cohort, moved / "search", "--resume")) == 0
    folder = runs.SearchDir(moved / "search")
    trials = folder.trials_table()
    assert len(trials) == 2 and (trials["status"] == "complete").all(), trials.to_string()
    assert _starts(fault_dir)[first] == before[first], "a finished trial was run again"
    assert folder.best()["trial"] in set(trials["trial"])
