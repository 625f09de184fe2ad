"""Single study stages called directly (no runner): what the ROI stage says, what the
aggregation stage writes, and the splits stage's near-duplicate check. A tiny synthetic cohort
(20 patients, 32 px) runs through the real ``01_data`` stage first; each test takes seconds."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import _study_fakes as fakes
from breastfusion import runs, study_stages
from breastfusion.errors import SplitError
from breastfusion.evaluate.aggregate import load_aggregate
from breastfusion.evaluate.settings import AggregateSettings
from breastfusion.study_config import parse_study
from breastfusion.study_stages import StageContext


def _context(tmp_path: Path, **sections) -> tuple[StageContext, list[str]]:
    doc = copy.deepcopy(fakes.TINY_STUDY)
    doc.update(sections)
    study = parse_study(doc, tmp_path / "study.yaml")
    lines: list[str] = []
    ctx = StageContext(study, tmp_path / "study", False, lines.append)
    return ctx, lines


def _run(ctx: StageContext, stage: str, fn) -> dict:
    out = ctx.dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    ctx.outputs[stage] = fn(ctx, out)
    return ctx.outputs[stage]


def _us_rows(ctx: StageContext):
    df = study_stages._manifest(ctx)
    return df[df["modality"] == "US"]


# -- 03 ROI: the crop summary and its warnings in the study log -----------------------------------


def test_roi_stage_prints_the_crop_summary_and_its_warnings(tmp_path, monkeypatch):
    ctx, lines = _context(tmp_path, roi={"mode": "boxes"})
    _run(ctx, "01_data", study_stages.data_stage)
    _run(ctx, "02_splits", study_stages.splits_stage)
    n_us = len(_us_rows(ctx))

    def no_hard_links(src, dst, *args, **kwargs):
        raise OSError("cross-device link")

    # DM files that cannot be hard-linked are copied: the summary says so.
    monkeypatch.setattr("breastfusion.roi.crop.os.link", no_hard_links)
    lines.clear()
    outputs = _run(ctx, "03_roi", study_stages.roi_stage)
    assert outputs["roi_sources"]["box"] == n_us
    text = "\n".join(lines)
    assert f"US crops: {n_us} rows; detected 0, manifest box {n_us}" in text
    warnings = [line for line in lines if line.strip().startswith("warning: ")]
    assert warnings and "copied instead" in " ".join(warnings)
    assert "{'detected'" not in text  # not the raw counts dict


# -- 07 aggregate: the Markdown tables beside the JSON/CSV ----------------------------------------


def test_aggregate_stage_writes_the_markdown_summary_and_tables(tmp_path):
    from test_aggregate import make_study_searches

    dm, us, fusion = make_study_searches(tmp_path / "searches")
    study = SimpleNamespace(aggregate=AggregateSettings(bootstrap=200))
    lines: list[str] = []
    ctx = StageContext(study, tmp_path / "study", False, lines.append)  # type: ignore[arg-type]
    ctx.outputs = {
        "04_backbones_dm": {"search_dir": dm},
        "05_backbones_us": {"search_dir": us},
        "06_fusion": {"search_dir": fusion},
    }
    out = tmp_path / "study" / "07_aggregate"
    outputs = study_stages.aggregate_stage(ctx, out)
    assert outputs["summary"] == out / "summary.md"
    summary = (out / "summary.md").read_text()
    assert "DM+US" in summary and "|" in summary
    table3 = out / "tables" / "table3_modalities.md"
    assert table3.is_file() and "DM+US" in table3.read_text()
    assert (out / "tables" / "table3_modalities.csv").is_file()  # the CSVs are still there
    # The report reads the aggregation back from the same folder.
    best = runs.read_json(out / "best_config.json")["trial"]
    assert load_aggregate(out).best["trial"] == best


# -- 02 splits: splits.near_duplicates ------------------------------------------------------------


def _copy_across_patients(ctx: StageContext) -> tuple[str, str]:
    """Overwrite one patient's US image with another patient's: a near duplicate."""
    us = _us_rows(ctx)
    a = us.iloc[0]
    b = us[us["patient_id"] != a["patient_id"]].iloc[0]
    shutil.copyfile(a["abs_path"], b["abs_path"])
    return str(a["patient_id"]), str(b["patient_id"])


def test_splits_stage_refuses_near_duplicates_across_patients_when_asked(tmp_path):
    ctx, lines = _context(
        tmp_path, splits={"folds": 2, "holdout": 0.2, "near_duplicates": "refuse"}
    )
    _run(ctx, "01_data", study_stages.data_stage)
    clean = _run(ctx, "02_splits", study_stages.splits_stage)
    assert Path(clean["splits"]).is_file()
    assert "near duplicates: none across patients" in "\n".join(lines)

    a, b = _copy_across_patients(ctx)
    out = ctx.dir("02_splits") / "again"
    with pytest.raises(SplitError) as info:
        study_stages.splits_stage(ctx, out)
    message = str(info.value)
    assert "splits.near_duplicates" in message and "near-duplicate image pair" in message
    assert "manifest.csv" in message
    details = " ".join(info.value.details)
    assert a in details and b in details
    assert not (out / "splits.json").exists()  # nothing half-written


def test_splits_stage_does_not_look_for_near_duplicates_by_default(tmp_path):
    ctx, lines = _context(tmp_path)
    _run(ctx, "01_data", study_stages.data_stage)
    _copy_across_patients(ctx)
    outputs = _run(ctx, "02_splits", study_stages.splits_stage)
    assert Path(outputs["splits"]).is_file()
    assert "near duplicates" not in "\n".join(lines)
