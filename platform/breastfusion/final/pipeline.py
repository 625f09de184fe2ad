"""The steps of ``final_model`` (see ``final.run``): check everything, then train, score,
evaluate and write. Every check that can fail on the user's input runs in :func:`prepare`,
before the output folder is touched."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import UserError
from breastfusion.final import operating
from breastfusion.final.choice import Choice
from breastfusion.final.members import FoldFacts, pooled_oof, read_folds
from breastfusion.final.settings import FinalSettings

if TYPE_CHECKING:
    import pandas as pd

    from breastfusion.config import Config
    from breastfusion.engine.data import Cohort
    from breastfusion.final.refit import Trained
    from breastfusion.final.run import FinalResult

Progress = Callable[[str], None]


@dataclass
class Plan:
    cfg: Config
    choice: Choice
    settings: FinalSettings
    cohort: Cohort
    facts: list[FoldFacts]
    oof: pd.DataFrame | None
    op: operating.OperatingPoint
    detector_dir: Path | None
    crop: Any  # CropSettings (boxes mode) or None

    @property
    def name(self) -> str:
        return f"{self.cfg.data.modality}_{self.settings.mode}"


def _crop(crop: Any) -> Any:
    if crop is None:
        return None
    from breastfusion.roi.settings import CropSettings

    return crop if isinstance(crop, CropSettings) else CropSettings.from_dict(crop)


def prepare(
    cfg: Config,
    choice: Choice,
    s: FinalSettings,
    detector_dir: str | os.PathLike | None,
    crop: Any,
    say: Progress,
) -> Plan:
    from breastfusion.engine.data import load_cohort
    from breastfusion.final.export import check_detector

    detector = Path(detector_dir) if detector_dir is not None else None
    check_detector(detector)
    cohort = load_cohort(cfg)
    facts = read_folds(choice.folds) if choice.folds else []
    if s.mode == "ensemble" and not facts:
        raise UserError(
            f"{choice.source}: final.mode ensemble needs the chosen trial's fold folders; "
            "none found (use mode refit)"
        )
    oof = pooled_oof(choice.trial, facts)
    target = s.target_sensitivity
    what = (
        "the fold ensemble's calibrated scores"
        if s.mode == "ensemble"
        else ("the refit model's scores (calibration transferred from the fold models)")
    )
    op = (
        operating.from_oof(oof, target, what)
        if target is not None
        else operating.fixed(cfg.train.threshold)
    )
    for w in op.warnings:
        say(f"warning: {w}")
    if op.warnings and op.achievable:
        shown = "; ".join(
            f"sens {p['sensitivity']:.3f} / spec {p['specificity']:.3f}" for p in op.achievable
        )
        say(f"achievable on the development out-of-fold scores: {shown}")
    return Plan(cfg, choice, s, cohort, facts, oof, op, detector, _crop(crop))


def train(plan: Plan, say: Progress) -> Trained:
    from breastfusion.final.refit import check_no_leak, ensemble, refit

    s = plan.settings
    if s.mode == "refit":
        trained = refit(
            plan.cfg, plan.cohort, plan.facts, epochs=s.epochs, device=s.device, say=say
        )
    else:
        trained = ensemble(plan.cfg, plan.cohort, plan.facts, say=say)
    check_no_leak(trained.train_patients, plan.cohort.splits.holdout)
    return trained


def score_holdout(plan: Plan, trained: Trained) -> tuple[pd.DataFrame, Any, dict[str, str]]:
    """Holdout patient scores (calibrated log-odds), the dataset, and the patients left out."""
    from breastfusion.engine.data import build_dataset
    from breastfusion.final.scoring import TorchRunner, score_dataset

    ds = build_dataset(trained.config, plan.cohort.table, plan.cohort.splits.holdout, train=False)
    runner = TorchRunner(trained.model, plan.settings.device or trained.config.train.device)
    scores = score_dataset(runner, ds, trained.config.branches, trained.config.optim.batch_size)
    trained.model.cpu()
    return scores, ds, dict(ds.excluded)


def holdout_table(name: str, scores: pd.DataFrame, threshold: float) -> pd.DataFrame:
    from breastfusion.evaluate.calibration import sigmoid

    s = scores["y_score"].to_numpy()
    return scores.assign(
        model=name,
        probability=sigmoid(s),
        call=["malignant" if v >= threshold else "benign" for v in s],
    )[["model", "patient_id", "y_true", "y_score", "probability", "call", "n_samples"]]


def execute(
    plan: Plan, out: Path, fallbacks: Mapping[str, Any], overwrite: bool, say: Progress
) -> FinalResult:
    from breastfusion.final import evaluation
    from breastfusion.final.outdir import staged_output
    from breastfusion.final.run import DONE_FILE, OUTPUTS

    with staged_output(out, "final", OUTPUTS, DONE_FILE, overwrite=overwrite) as tmp:
        trained = train(plan, say)
        scores, dataset, excluded = score_holdout(plan, trained)
        say(f"holdout: {len(scores)} patients scored" + (
            f", {len(excluded)} without a needed image" if excluded else ""))  # fmt: skip
        s = plan.settings
        result, _ = evaluation.evaluate(
            scores, plan.name, threshold=plan.op.threshold, n_boot=s.bootstrap, seed=s.seed,
            oof=plan.oof, target_sensitivity=s.target_sensitivity,
        )  # fmt: skip
        _check_same_threshold(result, plan)
        _annotate(result, plan)
        from breastfusion.final.writing import write_all

        final = write_all(
            plan, trained, result, scores, dataset, excluded, tmp, out, fallbacks, say
        )
    say(f"final ({plan.settings.mode}): {final.headline}; bundle in {final.bundle}")
    return final


def _check_same_threshold(result: Mapping[str, Any], plan: Plan) -> None:
    got = float(result["models"][plan.name]["threshold"])
    if got != plan.op.threshold:  # two implementations of one rule must agree exactly
        raise RuntimeError(
            f"operating point mismatch: evaluate chose {got!r}, final chose {plan.op.threshold!r}"
        )


def _annotate(result: dict[str, Any], plan: Plan) -> None:
    """Say in metrics.json where the threshold and the calibration come from."""
    from breastfusion.final.members import TRANSFERRED

    entry = result["models"][plan.name]
    entry["threshold_rule"] = plan.op.rule
    if plan.settings.mode == "refit":
        entry["calibration_source"] = TRANSFERRED if plan.facts else "none (no fold models)"
    else:
        entry["calibration_source"] = "each fold model's own Platt calibration, averaged"
