"""The study runner: config validation, every stage end to end, skipping and resuming."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from breastfusion import study as S
from breastfusion.cli import main

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


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"data": {"synthetic": {}}, "bogus": 1}, "unknown key 'bogus'"),
        ({"data": {}}, "exactly one of 'manifest' or 'synthetic'"),
        ({"data": {"synthetic": {}, "manifest": "m.csv"}}, "exactly one of"),
        ({"data": {"synthetic": {}}, "roi": {"mode": "magic"}}, "roi.mode 'magic'"),
        ({"data": {"synthetic": {}}, "backbones": {"mri": {}}}, "unknown key 'mri'"),
        (
            {
                "data": {"synthetic": {}},
                "fusion": {"space": {"model.backbone_dm": {"choice": ["resnet19"]}}},
            },
            "unknown backbone 'resnet19'",
        ),
        (
            {"data": {"synthetic": {}}, "fusion": {"space": {"optim.lr": {"loguniform": [1, 1]}}}},
            "empty range",
        ),
        ({"data": {"synthetic": {}}, "fusion": "no/such/space.yaml"}, "cannot read search space"),
    ],
)
def test_bad_study_files_fail_before_any_stage(tmp_path, capsys, doc, message):
    out = tmp_path / "out"
    code = main(["run", str(_write(tmp_path, doc)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()  # nothing started


def test_missing_study_file_is_a_clear_error(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_shipped_study_files_load():
    for name in ("debug.yaml", "demo.yaml", "study.yaml"):
        study = S.load_study(ROOT / "jobs" / name)
        assert study.fusion and set(study.backbones) == {"dm", "us"}


@pytest.mark.ray
def test_debug_study_runs_every_stage_then_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    lines: list[str] = []
    report = S.run_study(DEBUG_YAML, out=out, echo=lines.append)

    for stage in STAGES:
        marker = json.loads((out / stage / "stage.json").read_text())
        assert marker["stage"] == stage and len(marker["hash"]) == 64
    assert report == out / "09_report" / "index.html"
    page = report.read_text()
    for section in ("Cohort", "ROC", "Grad-CAM", "DM+US"):
        assert section in page
    final = out / "08_final"
    for name in (
        "metrics.json",
        "predictions_holdout.csv",
        "model/model.pt",
        "model/model.torchscript.pt",
        "model/metadata.json",
    ):
        assert (final / name).is_file(), name
    metrics = json.loads((final / "metrics.json").read_text())
    assert {"DM only", "US only", "DM+US"} <= set(metrics["models"])
    assert metrics["comparisons"], "fusion vs single-modal DeLong tests missing"
    assert any("report:" in line for line in lines)

    # A second run finds every stage up to date and touches nothing.
    mtimes = {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}
    again: list[str] = []
    S.run_study(DEBUG_YAML, out=out, echo=again.append)
    assert sum("up to date, skipped" in line for line in again) == len(STAGES)
    assert mtimes == {s: (out / s / "stage.json").stat().st_mtime_ns for s in STAGES}

    # Interrupted after the splits: later stages re-run, earlier ones are kept.
    for stage in STAGES[3:]:
        shutil.rmtree(out / stage)
    (out / "02_splits" / "stage.json").touch()
    resumed: list[str] = []
    S.run_study(DEBUG_YAML, out=out, echo=resumed.append)
    skipped = [line for line in resumed if "up to date, skipped" in line]
    assert len(skipped) == 3 and all(f"[{i}/9]" in skipped[i - 1] for i in (1, 2, 3))
    assert (out / "09_report" / "index.html").is_file()


def test_failed_stage_leaves_no_marker_and_exits_non_zero(tmp_path, monkeypatch, capsys):
    from breastfusion.errors import UserError

    def broken(ctx, out):
        (out / "partial.txt").write_text("half")
        raise UserError("simulated failure")

    doc = yaml.safe_load(DEBUG_YAML.read_text())
    doc.pop("backbones")
    doc.pop("fusion")
    path = _write(tmp_path, doc)
    monkeypatch.setattr(S, "_splits_run", broken)
    out = tmp_path / "study"
    code = main(["run", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "stage 02_splits failed: simulated failure" in err
    assert (out / "01_data" / "stage.json").is_file()
    assert not (out / "02_splits" / "stage.json").exists()
