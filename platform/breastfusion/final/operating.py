"""The operating point of the exported model, on the calibrated log-odds scale.

With a target sensitivity the threshold is chosen on the *pooled calibrated* out-of-fold
scores of the chosen trial (every fold model's validation patients, each fold's scores on its
own Platt scale ``a·z + b``), then applied unchanged to the exported model's scores, which
are on that same scale (``models.ensemble``). It is checked with
``evaluate.metrics.check_operating_point``: a target reachable only by calling nearly every
patient malignant (validation specificity < 0.2), or a threshold at or below every benign
score, is warned about, with the achievable (sensitivity, specificity) points. Without a
target the threshold is ``logit(train.threshold)`` (0.0 for 0.5).

Known bias: a fold ensemble averages its members' calibrated log-odds, which shrinks the
spread of its scores (measured on the demo: malignant SD 1.43 → 0.88, benign 1.40 → 1.16),
so a threshold taken from single fold models' OOF scores is somewhat conservative on the
ensemble (holdout sensitivity at or above the target, specificity a little lower).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from breastfusion.errors import UserError
from breastfusion.evaluate.calibration import logit, sigmoid

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # calibrated malignant log-odds, full precision
    rule: str
    target_sensitivity: float | None = None
    validation: dict[str, Any] | None = None  # sensitivity/specificity on the pooled OOF
    warnings: tuple[str, ...] = ()
    achievable: tuple[dict[str, float], ...] = field(default_factory=tuple)

    @property
    def probability(self) -> float:
        return float(sigmoid(np.array([self.threshold]))[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "threshold_probability": self.probability,
            "scale": "calibrated malignant log-odds (call malignant when score >= threshold)",
            "rule": self.rule,
            "target_sensitivity": self.target_sensitivity,
            "validation": self.validation,
            "warnings": list(self.warnings),
            "achievable": list(self.achievable),
        }


def fixed(probability: float) -> OperatingPoint:
    return OperatingPoint(
        threshold=logit(probability),
        rule=f"fixed threshold: calibrated probability >= train.threshold = {probability!r}",
    )


def from_oof(oof: pd.DataFrame | None, target: float, transferred_to: str) -> OperatingPoint:
    """The threshold reaching ``target`` sensitivity on the pooled calibrated OOF scores."""
    from breastfusion.evaluate.metrics import (
        check_operating_point,
        patient_scores,
        threshold_for_sensitivity,
    )

    if oof is None or oof.empty:
        raise UserError(
            "final.target_sensitivity needs the chosen trial's out-of-fold predictions (each "
            "fold's predictions.csv) to choose the threshold on; none were found"
        )
    p = patient_scores(oof[["patient_id", "y_true", "y_score"]], source="out-of-fold predictions")
    y, s = p["y_true"].to_numpy(), p["y_score"].to_numpy(dtype=np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        raise UserError("the out-of-fold predictions hold one class only: no operating point")
    thr = threshold_for_sensitivity(y, s, target)
    check = check_operating_point(y, s, thr, target, "development out-of-fold predictions")
    return OperatingPoint(
        threshold=thr,
        rule=(
            f"largest threshold reaching sensitivity >= {target!r} on the pooled calibrated "
            f"out-of-fold scores of the chosen trial's {oof['fold'].nunique()} fold models "
            f"({len(p)} development patients), applied unchanged to {transferred_to}"
        ),
        target_sensitivity=target,
        validation={
            "n_patients": int(len(y)),
            "n_malignant": int(y.sum()),
            "sensitivity": check.sensitivity,
            "specificity": check.specificity,
        },
        warnings=check.warnings,
        achievable=tuple(
            {"threshold": t, "sensitivity": se, "specificity": sp} for t, se, sp in check.achievable
        ),
    )
