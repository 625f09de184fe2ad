"""Everything ``final`` writes, into its staging folder (published by ``final.outdir``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.final.bundle import BUNDLE_DIR, METADATA_FILE
from breastfusion.io import atomic_write_json, atomic_write_text
from breastfusion.runs import csv_text

if TYPE_CHECKING:
    import pandas as pd

    from breastfusion.final.pipeline import Plan
    from breastfusion.final.refit import Trained
    from breastfusion.final.run import FinalResult

Progress = Callable[[str], None]


def _fallbacks(fallbacks: Mapping[str, Any], bundle_final: Path) -> dict[str, str]:
    """Single-modal bundle folders, relative to the bundle's final place (POSIX)."""
    out = {}
    for modality, folder in fallbacks.items():
        if modality not in ("dm", "us"):
            from breastfusion.errors import ConfigError

            raise ConfigError(f"fallback bundles are for dm or us, got {modality!r}")
        rel = os.path.relpath(os.path.abspath(folder), os.path.abspath(bundle_final))
        out[modality] = Path(rel).as_posix()
    return out


def write_bundle(
    plan: Plan,
    trained: Trained,
    result: Mapping[str, Any],
    excluded: Mapping[str, str],
    dest: Path,
    fallbacks: dict[str, str],
    say: Progress,
) -> dict[str, Any]:
    """``dest`` (the staged bundle): weights, ONNX, config, detector, and last metadata.json."""
    from breastfusion.final import card
    from breastfusion.final.export import copy_detector, write_config, write_onnx, write_state

    dest.mkdir(parents=True)
    write_state(trained.model, dest)
    onnx = None
    if plan.settings.onnx:
        say("exporting model.onnx (checked against the torch model)")
        onnx = write_onnx(trained.model, trained.config, dest)
    write_config(trained.config, dest)
    detector = copy_detector(plan.detector_dir, dest) if plan.detector_dir else None
    meta = card.build(
        trained=trained,
        selected=plan.cfg,
        name=plan.name,
        op=plan.op,
        result=result,
        cohort=plan.cohort,
        holdout_excluded=excluded,
        roi=card.roi_section(detector, plan.crop),
        onnx=onnx,
        fallbacks=fallbacks,
        keep_ids=plan.settings.keep_patient_ids,
    )
    atomic_write_json(dest / METADATA_FILE, meta)
    return meta


def write_all(
    plan: Plan,
    trained: Trained,
    result: dict[str, Any],
    scores: pd.DataFrame,
    dataset: Any,
    excluded: Mapping[str, str],
    tmp: Path,
    out: Path,
    fallbacks: Mapping[str, Any],
    say: Progress,
) -> FinalResult:
    from breastfusion.config import save_yaml
    from breastfusion.final import evaluation
    from breastfusion.final.pipeline import holdout_table
    from breastfusion.final.run import DONE_FILE, FinalResult

    rel = _fallbacks(fallbacks, out / BUNDLE_DIR)
    meta = write_bundle(plan, trained, result, excluded, tmp / BUNDLE_DIR, rel, say)
    table = holdout_table(plan.name, scores, plan.op.threshold)
    atomic_write_text(tmp / "predictions_holdout.csv", csv_text(table))
    if plan.oof is not None:
        atomic_write_text(tmp / "oof_development.csv", csv_text(plan.oof))
    evaluation.write(result, scores.assign(model=plan.name), tmp)
    save_yaml(trained.config, tmp / "config.yaml")
    gallery = _gallery(plan, trained, scores, dataset, tmp)
    warnings = list(dict.fromkeys([*plan.op.warnings, *(result.get("warnings") or [])]))
    atomic_write_json(tmp / DONE_FILE, _done_record(plan, trained, excluded, warnings))
    return FinalResult(
        out=out,
        bundle=out / BUNDLE_DIR,
        mode=plan.settings.mode,
        model_name=plan.name,
        threshold=plan.op.threshold,
        operating_point=plan.op.to_dict(),
        metrics=result,
        predictions=table.reset_index(drop=True),
        metadata=meta,
        train_patients=tuple(trained.train_patients),
        holdout_patients=tuple(scores["patient_id"]),
        warnings=warnings,
        gradcam=gallery,
    )


def _gallery(plan: Plan, trained: Trained, scores: pd.DataFrame, dataset: Any, tmp: Path) -> Any:
    if plan.settings.gradcam_per_category <= 0:
        return None
    from breastfusion.explain.gradcam import write_gallery

    return write_gallery(
        trained.model,
        dataset,
        scores,
        plan.op.threshold,
        tmp / "gradcam",
        per_category=plan.settings.gradcam_per_category,
    )


def _done_record(
    plan: Plan, trained: Trained, excluded: Mapping[str, str], warnings: list[str]
) -> dict[str, Any]:
    """``final.json`` (beside the bundle: it may name patients)."""
    return {
        "model_name": plan.name,
        "mode": plan.settings.mode,
        "bundle": BUNDLE_DIR,
        "settings": plan.settings.to_dict(),
        "operating_point": plan.op.to_dict(),
        "holdout_patients_not_scored": dict(sorted(excluded.items())),
        "train_patients_left_out": dict(sorted(trained.excluded.items())),
        "source": plan.choice.source,
        "warnings": warnings,
    }
