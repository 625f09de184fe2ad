"""Single study stages called directly (no runner): what the ROI stage says, what the
aggregation stage writes, and the splits stage's near-duplicate check. A tiny synthetic cohort
(20 patients, 32 px) runs through the real ``01_data`` stage first; each test takes seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import _study_fakes as fakes
from breastfusion import study_stages
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

    # DM files that cannot be hard-linked stay at their absolute paths: the summary warns.
    monkeypatch.setattr("breastfusion.roi.crop.os.link", no_hard_links)
    lines.clear()
    outputs = _run(ctx, "03_roi", study_stages.roi_stage)
    assert outputs["roi_sources"]["box"] == n_us
    text = "\n".join(lines)
    assert f"US crops: {n_us} rows; detected 0, manifest box {n_us}" in text
    warnings = [line for line in lines if line.strip().startswith("warning: ")]
    assert warnings and "relocatable" in " ".join(warnings)
    assert "{'detected'" not in text  # not the raw counts dict
