"""What ``final`` takes from the chosen trial's folds: calibrations, epochs, OOF scores, models.

Every fold folder is read through ``breastfusion.runs.FoldDir`` (the engine writes it; the
contract: ``metrics.json`` carries the fold's Platt ``calibration``, ``reported_epoch``,
``epochs_run``, ``degenerate``; ``predictions.csv`` the calibrated ``y_score`` and the raw
``y_score_raw`` of each validation patient; ``model.pt`` the reported model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.calibration import Calibration, mean_calibration

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from breastfusion.config import Config

TRANSFERRED = (
    "transferred from the fold models (mean of their Platt calibrations), not fitted on the "
    "refit model: the refit model has no validation fold of its own"
)


@dataclass(frozen=True)
class FoldFacts:
    """One finished fold of the chosen trial."""

    fold: runs.FoldDir
    calibration: Calibration
    reported_epoch: int | None  # the epoch of the model the fold reported
    epochs_run: int | None
    degenerate: bool

    @property
    def k(self) -> int:
        return self.fold.k


def _epoch(value: Any) -> int | None:
    return (
        int(value)
        if isinstance(value, int | float) and math.isfinite(value) and value > 0
        else None
    )


def read_folds(folds: Sequence[runs.FoldDir], *, need_calibration: bool = True) -> list[FoldFacts]:
    """Facts of every finished fold; an unfinished or uncalibrated fold is a ``UserError``."""
    out = []
    for f in folds:
        if not f.finished:
            raise UserError(f"{f.path}: the fold did not finish (no {runs.FOLD_METRICS})")
        m = f.metrics()
        if need_calibration and not isinstance(m.get("calibration"), dict):
            raise UserError(
                f"{f.path / runs.FOLD_METRICS}: no calibration (written by an older "
                "breastfusion); re-run the search so each fold model is calibrated"
            )
        out.append(
            FoldFacts(
                fold=f,
                calibration=Calibration.from_dict(m.get("calibration")),
                reported_epoch=_epoch(m.get("reported_epoch", m.get("best_epoch"))),
                epochs_run=_epoch(m.get("epochs_run")),
                degenerate=bool(m.get("degenerate")),
            )
        )
    return out


def refit_calibration(facts: Sequence[FoldFacts]) -> Calibration:
    """The calibration a refit model carries: the mean of the folds' (see ``TRANSFERRED``)."""
    return mean_calibration([f.calibration for f in facts], TRANSFERRED)


def refit_epochs(facts: Sequence[FoldFacts], configured: int) -> tuple[int, str]:
    """Epochs for a refit: the mean epoch of the folds' reported models (rounded half up),
    never fewer than the fewest of them; ``configured`` when the folds recorded none."""
    epochs = [f.reported_epoch for f in facts if f.reported_epoch is not None]
    if not epochs:
        return configured, "optim.epochs (the folds recorded no epoch)"
    mean = sum(epochs) / len(epochs)
    n = max(min(epochs), int(math.floor(mean + 0.5)), 1)
    shown = ", ".join(str(e) for e in epochs)
    return n, (
        f"mean epoch of the {len(epochs)} fold models' reported weights ({shown}), rounded half "
        "up, and never fewer than the fewest"
    )


def pooled_oof(trial: runs.TrialDir | None, facts: Sequence[FoldFacts]) -> pd.DataFrame | None:
    """The folds' validation predictions (``fold, patient_id, y_true, y_score[, y_score_raw]``,
    ``y_score`` calibrated), or None when the trial has none."""
    if trial is None or not facts:
        return None
    oof = trial.oof([f.k for f in facts])
    if oof is None:
        return None
    missing = [c for c in ("patient_id", "y_true", "y_score") if c not in oof.columns]
    if missing:
        raise UserError(f"{trial.path}: fold predictions lack column(s) {', '.join(missing)}")
    keep = ["fold", "patient_id", "y_true", "y_score"]
    keep += ["y_score_raw"] if "y_score_raw" in oof.columns else []
    return oof[keep].astype({"patient_id": str})


def load_member(facts: FoldFacts, chosen: Config) -> tuple[nn.Module, Config]:
    """The fold's reported model (eval mode, CPU) and its config; it must be the chosen
    architecture with the chosen inputs."""
    from breastfusion.config import Config
    from breastfusion.engine.checkpoint import load_checkpoint, load_weights
    from breastfusion.final.bundle import build_untrained

    path = facts.fold.model_path
    if not path.is_file():
        raise UserError(
            f"{path}: the fold model is missing; mode ensemble needs every fold's "
            f"{runs.FOLD_MODEL} (use mode refit, or re-run the search keeping the models: "
            "keep_checkpoints best or all; a study with final.mode refit keeps none unless "
            "its search spaces say so)"
        )
    ckpt = _read_checkpoint(path, load_checkpoint)
    cfg = Config.from_dict(ckpt.config)
    keys = ("modality", "size_dm", "size_us", "resize")
    if (cfg.model, *(getattr(cfg.data, k) for k in keys)) != (
        chosen.model,
        *(getattr(chosen.data, k) for k in keys),
    ):
        raise UserError(
            f"{path}: this fold model is not the chosen configuration (model/data differ)"
        )
    model = build_untrained(cfg)
    load_weights(model, ckpt)
    return model.eval(), cfg


def _read_checkpoint(path: Any, load: Any) -> Any:
    """``load_checkpoint`` with a damaged file explained in words."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: the fold model file is damaged or incomplete (not a complete torch "
            "archive; a truncated copy?); re-run that fold"
        )
    return load(path)
