"""Stage 08 of a study (``breastfusion.study_stages``): the final models and their holdout
comparison (the study's Table 3).

Kept apart from the other stages because it is the longest; ``study_stages.final_stage``
calls :func:`final_stage` here.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion import runs
from breastfusion.config import load_yaml, save_yaml
from breastfusion.io import atomic_write_text

if TYPE_CHECKING:
    from breastfusion.study_stages import Outputs, StageContext


def final_stage(ctx: StageContext, out: Path) -> Outputs:
    """The best configuration of each modality, then the chosen one (the exported model, which
    falls back on the single-modal ones for patients lacking a modality), compared on the
    holdout patients (the study's Table 3)."""
    from breastfusion.final import final_from_best

    agg = runs.read_json(Path(ctx.outputs["07_aggregate"]["aggregate_dir"]) / "aggregate.json")
    roi, settings = ctx.study.roi, ctx.study.final
    bundle = ctx.outputs["03_roi"].get("detector_bundle")
    common = {
        "manifest": ctx.outputs["03_roi"]["manifest"],
        "splits": ctx.outputs["02_splits"]["splits"],
        "detector_dir": bundle,
        # Without a detector the US crops came from the manifest's boxes, with this rule.
        "crop_settings": roi.crop if roi.mode == "boxes" else None,
        "progress": ctx.say,
    }
    chosen = agg["best"]
    per_modality: dict[str, Path] = {}
    for modality, record in (agg.get("best_by_modality") or {}).items():
        if _same_trial(record, chosen):
            per_modality[modality] = out / "model"
            continue
        ctx.say(f"best {runs.MODALITY_LABELS.get(modality, modality)}: {record.get('trial')}")
        # model.onnx only where predict can use it: the chosen model and its fallbacks.
        fallback = chosen.get("modality") == "fusion" and modality in ("dm", "us")
        quiet = dataclasses.replace(
            settings, gradcam_per_category=0, onnx=settings.onnx and fallback
        )
        folder = _search_dir(ctx, record)
        final_from_best(record, out=out / modality, search_dir=folder, settings=quiet, **common)
        per_modality[modality] = out / modality
    ctx.say(f"chosen: {chosen.get('trial')} ({chosen.get('modality', '?')})")
    fallbacks = {}
    if chosen.get("modality") == "fusion":
        fallbacks = {m: per_modality[m] for m in ("dm", "us") if m in per_modality}
    result = final_from_best(
        chosen,
        out=out / "model",
        search_dir=_search_dir(ctx, chosen),
        settings=settings,
        fallbacks=fallbacks or None,
        **common,
    )
    _compare_on_holdout(ctx, per_modality, out)
    if (out / "model" / "gradcam").is_dir():
        shutil.copytree(out / "model" / "gradcam", out / "gradcam")
    if (out / "model" / "config.yaml").is_file():  # rewritten: its paths are folder-relative
        save_yaml(load_yaml(out / "model" / "config.yaml"), out / "config.yaml")
    return {"final_dir": out, "model_dir": out / "model", "headline": result.headline}


def _search_dir(ctx: StageContext, record: dict[str, Any]) -> Path | None:
    """The record's search folder in this study, wherever the study now is (aggregate.json
    names it by its absolute path at aggregation time; a moved study has another)."""
    name = Path(str(record.get("search_dir") or "")).name
    if name in runs.SEARCH_STAGES and name in ctx.outputs:
        return Path(ctx.outputs[name]["search_dir"])
    return None


def _same_trial(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("search"), a.get("trial")) == (b.get("search"), b.get("trial"))


def _compare_on_holdout(ctx: StageContext, per_modality: dict[str, Path], out: Path) -> None:
    """One metrics.json over every modality's holdout predictions (shared patients)."""
    import pandas as pd

    from breastfusion.evaluate.holdout import evaluate_predictions
    from breastfusion.report.holdout import write_outputs

    def table(name: str) -> pd.DataFrame | None:
        parts = []
        for modality, folder in per_modality.items():
            path = folder / name
            if path.is_file():
                df = pd.read_csv(path, dtype={"patient_id": str})
                df["model"] = runs.MODALITY_LABELS.get(modality, modality)
                parts.append(df[["model", "patient_id", "y_true", "y_score"]])
        return pd.concat(parts, ignore_index=True) if parts else None

    final = ctx.study.final
    holdout = table("predictions_holdout.csv")
    development = table("oof_development.csv")
    target = final.target_sensitivity if development is not None else None
    result, scores = evaluate_predictions(
        holdout,
        target_sensitivity=target,
        validation=development if target is not None else None,
        n_boot=final.bootstrap,
        seed=final.seed,
        source="holdout predictions",
        validation_source="development out-of-fold predictions",
        prefix="final",
    )
    write_outputs(result, scores, out)
    atomic_write_text(out / "predictions_holdout.csv", runs.csv_text(holdout))
