"""The study runner: hashed stages, interrupts, one writer, ownership, moving, and end to end.

Most tests run the real ``01_data``/``02_splits`` on a tiny cohort and stand-ins for the later
stages (``_study_fakes``), so that the runner's own rules are checked in seconds; signals go
to a real ``breastfusion run`` process. The last test runs every real stage (``jobs/debug.yaml``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import _study_fakes as fakes
from breastfusion import study as S
from breastfusion import study_stages
from breastfusion.cli import main
from breastfusion.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEBUG_YAML = ROOT / "jobs" / "debug.yaml"
STAGES = [
    "01_data",
    "02_splits",
    "03_roi",
    "04_backbones_dm",
    "05_backbones_us",
    "06_fusion",
    "07_aggregate",
    "08_final",
    "09_report",
]
TINY_STAGES = ["01_data", "02_splits", "03_roi", "06_fusion", "07_aggregate", "08_final"]
TINY_STAGES.append("09_report")


def _write(folder: Path, doc: dict, name: str = "study.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def fake_stages(monkeypatch):
    fakes.install(monkeypatch.setattr)


@pytest.fixture
def tiny(tmp_path) -> Path:
    return _write(tmp_path / "project", fakes.TINY_STUDY)


def _run(study: Path, out: Path, *extra: str) -> tuple[int, str]:
    lines: list[str] = []
    try:
        S.run_study(study, out=out, resume="--resume" in extra, echo=lines.append)
        return 0, "\n".join(lines)
    except UserError as exc:
        return exc.exit_code, "\n".join([*lines, f"error: {exc}"])


def _stage_json(root: Path, stage: str) -> dict:
    # Strict JSON: a bare NaN would raise here.
    return json.loads(
        (root / stage / "stage.json").read_text(), parse_constant=lambda c: pytest.fail(c)
    )


# -- a second process, stopped with a real signal -----------------------------------------------


def _spawn(study: Path, out: Path, tmp: Path, *extra: str, pause: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), "OMP_NUM_THREADS": "1"}
    env.pop(S.PAUSE_ENV, None)
    if pause:
        env[S.PAUSE_ENV] = f"{pause}:{tmp}"
    cmd = [sys.executable, str(ROOT / "tests" / "_study_fakes.py"), "run", str(study)]
    return subprocess.Popen(
        [*cmd, "--out", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_parked(proc: subprocess.Popen, tmp: Path, stage: str) -> None:
    deadline = time.monotonic() + 300
    while not list(tmp.glob(f"paused-{stage}.{proc.pid}")):
        if proc.poll() is not None:
            pytest.fail(f"run ended before {stage}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"the run never reached {stage}"
        time.sleep(0.1)


def test_sigterm_exits_143_marks_nothing_done_and_resume_completes(tmp_path, tiny):
    out = tmp_path / "study"
    proc = _spawn(tiny, out, tmp_path, pause="02_splits")
    _wait_parked(proc, tmp_path, "02_splits")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert (out / "01_data" / "stage.json").is_file()
    assert not (out / "02_splits" / "stage.json").exists()
    assert "interrupted during stage 02_splits" in stderr and "Traceback" not in stderr
    assert f"breastfusion run {tiny} --out {out} --resume" in stderr

    resumed = _spawn(tiny, out, tmp_path, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "[1/7] data: validate the cohort: up to date, skipped" in stdout
    for stage in TINY_STAGES:
        assert _stage_json(out, stage)["stage"] == stage
    assert f"report: {out / '09_report' / 'index.html'}" in stdout


def test_second_writer_is_refused_at_once_and_sigint_exits_130(tmp_path, tiny, fake_stages):
    out = tmp_path / "study"
    first = _spawn(tiny, out, tmp_path, pause="03_roi")
    _wait_parked(first, tmp_path, "03_roi")
    second = _spawn(tiny, out, tmp_path, "--resume")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert f"is in use by another breastfusion process (pid {first.pid}, started " in err
    assert "Traceback" not in err

    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "interrupted during stage 03_roi" in err and "--resume" in err
    assert (out / "02_splits" / "stage.json").is_file()
    assert not (out / "03_roi" / "stage.json").exists()
    # The lock died with its process: a later run takes over.
    assert _run(tiny, out, "--resume")[0] == 0


# -- in-process, stand-in stages ----------------------------------------------------------------


def test_a_folder_that_is_not_a_study_is_refused_and_kept(tmp_path, tiny, fake_stages):
    out = tmp_path / "mine"
    (out / "01_data").mkdir(parents=True)
    (out / "01_data" / "precious.txt").write_text("keep me")
    (out / "study.json").write_text("my own notes")
    code, text = _run(tiny, out)
    assert code == 2 and "is not a breastfusion study folder" in text
    assert (out / "01_data" / "precious.txt").read_text() == "keep me"
    assert (out / "study.json").read_text() == "my own notes"
    assert sorted(p.name for p in out.iterdir()) == ["01_data", "study.json"]


def test_a_stage_never_deletes_a_file_it_did_not_make(tmp_path, tiny, fake_stages):
    out = tmp_path / "study"
    assert _run(tiny, out)[0] == 0
    (out / "02_splits" / "precious.txt").write_text("keep me")
    doc = {**fakes.TINY_STUDY, "splits": {**fakes.TINY_STUDY["splits"], "seed": 1}}
    changed = _write(tiny.parent, doc, "changed.yaml")
    code, text = _run(changed, out)
    # Refused (not silently preserved): the stage cannot start clean without deleting it.
    assert code == 2
    assert "02_splits must be cleared to re-run the stage, but it holds precious.txt" in text
    assert (out / "02_splits" / "precious.txt").read_text() == "keep me"
    assert (out / "02_splits" / "stage.json").is_file()  # the old result is still whole
    (out / "02_splits" / "precious.txt").unlink()
    assert _run(changed, out)[0] == 0


def test_a_changed_setting_is_named_and_reruns_downstream(tmp_path, tiny, fake_stages):
    out = tmp_path / "study"
    assert _run(tiny, out)[0] == 0
    space = {**fakes.TINY_STUDY["fusion"], "space": {"optim.lr": {"loguniform": [1e-5, 1e-2]}}}
    changed = _write(tiny.parent, {**fakes.TINY_STUDY, "fusion": space}, "changed.yaml")
    code, text = _run(changed, out)
    assert code == 0
    assert (
        "[4/7] fusion search (DM + US): settings changed (space.space.optim.lr.loguniform: "
        "[0.0001, 0.01] -> [1e-05, 0.01]); re-running" in text
    )
    assert "[5/7] aggregation: tables and the final configuration: input changed: 06_fusion" in text
    assert sum("up to date, skipped" in line for line in text.splitlines()) == 3


def test_a_moved_study_is_up_to_date_and_reports_its_new_path(tmp_path, tiny, fake_stages):
    out = tmp_path / "study"
    assert _run(tiny, out)[0] == 0
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    code, text = _run(tiny, moved, "--resume")
    assert code == 0
    assert sum("up to date, skipped" in line for line in text.splitlines()) == len(TINY_STAGES)
    assert f"report: {moved / '09_report' / 'index.html'}" in text
    assert str(out) not in text
    for stage in TINY_STAGES:  # nothing stored names the old place
        assert str(out) not in (moved / stage / "stage.json").read_text()
    assert str(out) not in (moved / "study.json").read_text()


def test_stage_records_are_strict_json_and_the_headline_keeps_small_numbers(
    tmp_path, tiny, fake_stages
):
    out = tmp_path / "study"
    code, text = _run(tiny, out)
    assert code == 0
    record = _stage_json(out, "06_fusion")
    assert record["outputs"]["best_score"] is None  # NaN stored as null, never bare NaN
    assert record["outputs"]["search_dir"] == "@study/06_fusion"
    assert record["settings"]["space"]["space"]["optim.lr"] == {"loguniform": [1e-4, 1e-2]}
    assert "holdout DM+US: AUC 0.812 (0.500-1.000)" in text
    assert "at threshold -0.000123 (probability 0.500); 8 patients, 2 malignant" in text
    assert "DeLong p = 4.5e-07" in text
    study_json = json.loads((out / "study.json").read_text())
    resolved = {"folds": 2, "holdout": 0.2, "seed": 0, "near_duplicates": "off"}
    assert study_json["resolved"]["splits"] == resolved


def test_an_unfinished_search_is_never_marked_done(tmp_path, tiny, fake_stages, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setenv("FAKE_SEARCH_UNFINISHED", "1")
    code, text = _run(tiny, out)
    assert code == 2
    assert "stage 06_fusion failed" in text and "no trial that finished every fold" in text
    assert f"--out {out} --resume" in text
    assert not (out / "06_fusion" / "stage.json").exists()
    assert not (out / "07_aggregate").exists()
    monkeypatch.delenv("FAKE_SEARCH_UNFINISHED")
    # --resume continues a partial search only under the settings it started with.
    space = {**fakes.TINY_STUDY["fusion"], "num_samples": 2}
    changed = _write(tiny.parent, {**fakes.TINY_STUDY, "fusion": space}, "changed.yaml")
    code, text = _run(changed, out, "--resume")
    assert code == 2
    assert "stage 06_fusion was interrupted under other settings (settings changed " in text
    assert "space.num_samples: 1 -> 2" in text
    code, text = _run(tiny, out, "--resume")
    assert code == 0 and "[4/7] fusion search (DM + US) ... (resuming)" in text


def test_failed_stage_leaves_no_marker_and_exits_non_zero(
    tmp_path, tiny, fake_stages, capsys, monkeypatch
):
    def broken(ctx, out):
        (out / "partial.txt").write_text("half")
        raise UserError("simulated failure")

    original = study_stages.splits_stage
    monkeypatch.setattr(study_stages, "splits_stage", broken)
    out = tmp_path / "study"
    code = main(["run", str(tiny), "--out", str(out)])
    monkeypatch.setattr(study_stages, "splits_stage", original)
    err = capsys.readouterr().err
    assert code == 2 and "stage 02_splits failed: simulated failure" in err
    assert (out / "01_data" / "stage.json").is_file()
    assert not (out / "02_splits" / "stage.json").exists()
    # Its partial output was the study's own: the next run clears it and finishes.
    assert _run(tiny, out)[0] == 0
    assert not (out / "02_splits" / "partial.txt").exists()


def test_mlflow_gets_one_run_with_the_report_and_final_model(tmp_path, fake_stages):
    pytest.importorskip("mlflow")
    doc = {**fakes.TINY_STUDY, "tracking": {"mlflow_uri": "sqlite:///mlflow.db"}}
    study = _write(tmp_path / "project", doc)
    out = tmp_path / "study"
    code, text = _run(study, out)
    assert code == 0, text
    assert "mlflow: logged run" in text
    artifacts = tmp_path / "project" / "mlartifacts"
    assert list(artifacts.rglob("index.html")) and list(artifacts.rglob("bundle.txt"))
    record = json.loads((out / ".breastfusion-mlflow.json").read_text())
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}")
    run = mlflow.get_run(record["run_id"])
    assert run.data.metrics["holdout_auc.DM_US"] == 0.8125
    assert run.data.params["splits.folds"] == "2"
    code, text = _run(study, out)  # nothing ran: not logged twice
    assert code == 0 and f"mlflow: unchanged since run {record['run_id']}" in text


# -- every real stage ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_study(tmp_path_factory):
    """jobs/debug.yaml, first stopped with SIGINT in stage 03 (a real process), then resumed
    to the end; shared by the end-to-end assertions."""
    tmp = tmp_path_factory.mktemp("debug_study")
    out = tmp / "study"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), S.PAUSE_ENV: f"03_roi:{tmp}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "breastfusion.cli", "run", str(DEBUG_YAML), "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_parked(proc, tmp, "03_roi")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    roi_done = (out / "03_roi" / "stage.json").exists()
    interrupted = {"code": proc.returncode, "stderr": err, "roi_done": roi_done}
    lines: list[str] = []
    report = S.run_study(DEBUG_YAML, out=out, resume=True, echo=lines.append)
    return {"out": out, "report": report, "lines": lines, "interrupted": interrupted}


@pytest.mark.ray
def test_debug_study_runs_every_stage_after_an_interrupt(debug_study):
    out, lines = debug_study["out"], debug_study["lines"]
    stopped = debug_study["interrupted"]
    assert stopped["code"] == 130 and not stopped["roi_done"]
    assert "--resume" in stopped["stderr"]
    assert sum("up to date, skipped" in line for line in lines) == 2  # 01, 02 kept
    for stage in STAGES:
        marker = json.loads((out / stage / "stage.json").read_text())
        assert marker["stage"] == stage and len(marker["hash"]) == 64
    report = debug_study["report"]
    assert report == out / "09_report" / "index.html"
    page = report.read_text()
    for section in ("Cohort", "ROC", "Grad-CAM", "DM+US"):
        assert section in page
    final = out / "08_final"
    for name in ("metrics.json", "predictions_holdout.csv"):
        assert (final / name).is_file(), name
    metrics = json.loads((final / "metrics.json").read_text())
    assert {"DM only", "US only", "DM+US"} <= set(metrics["models"])
    assert metrics["comparisons"], "fusion vs single-modal DeLong tests missing"
    assert any(line.startswith("holdout DM+US: AUC ") for line in lines)
    assert any("report:" in line for line in lines)


@pytest.mark.ray
def test_debug_study_skips_when_up_to_date_and_after_a_move(debug_study, tmp_path):
    out = debug_study["out"]
    mtimes = {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}
    again: list[str] = []
    S.run_study(DEBUG_YAML, out=out, echo=again.append)
    assert sum("up to date, skipped" in line for line in again) == len(STAGES)
    assert mtimes == {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}

    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    lines: list[str] = []
    report = S.run_study(DEBUG_YAML, out=moved, resume=True, echo=lines.append)
    assert sum("up to date, skipped" in line for line in lines) == len(STAGES)
    assert report == moved / "09_report" / "index.html" and report.is_file()
    # Relocatable, shareable and small (issue targets): no stored text names the old place,
    # every file is readable by group and others under umask 022, the folder <= 300 MB.
    files = [p for p in moved.rglob("*") if p.is_file()]
    texts = (".json", ".csv", ".yaml", ".md", ".html")
    leaks = [p for p in files if p.suffix in texts and str(out) in p.read_text(errors="ignore")]
    assert not leaks, leaks[:5]
    mask = os.umask(0o022)
    os.umask(mask)
    if mask & 0o044 == 0:  # the study ran under a umask that lets others read
        assert [p for p in files if p.stat().st_mode & 0o044 != 0o044] == []
    inodes = {p.stat().st_ino: p.stat().st_size for p in files}  # hard links count once
    assert sum(inodes.values()) <= 300 * 2**20, sum(inodes.values()) / 2**20
