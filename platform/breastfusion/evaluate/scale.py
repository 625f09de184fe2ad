"""Which scale a score is on, and predictions whose scores may be any real number.

Platform predictions carry ``y_score`` = the calibrated malignant log-odds (any real number;
see ``evaluate.calibration``); predictions from elsewhere may carry probabilities in [0, 1].
Rankings (AUC, DeLong, the ROC) and thresholds work on either; only the Brier score, the
reliability curve and the calibration slope/intercept need to know the scale.
"""

from __future__ import annotations

import numpy as np

from breastfusion.evaluate.calibration import logit, sigmoid

LOGIT = "logit"
PROBABILITY = "probability"
DEFAULT_THRESHOLD = {PROBABILITY: 0.5, LOGIT: 0.0}  # the same cut: probability 0.5
NAMES = {
    LOGIT: "calibrated malignant log-odds (probability = 1/(1+exp(-score)))",
    PROBABILITY: "malignancy probability in [0, 1]",
}


def resolve_scale(setting: str, *score_arrays: np.ndarray) -> str:
    """``logit`` or ``probability``: ``auto`` is probability when every score is in [0, 1]."""
    if setting != "auto":
        return setting
    values = [np.asarray(a, dtype=float) for a in score_arrays if a is not None]
    inside = all(bool(np.all((v >= 0) & (v <= 1))) for v in values)
    return PROBABILITY if inside else LOGIT


def as_probability(scores: np.ndarray, scale: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return sigmoid(s) if scale == LOGIT else s


def as_log_odds(scores: np.ndarray, scale: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    return s if scale == LOGIT else np.array([logit(p) for p in s], dtype=np.float64)


def threshold_probability(threshold: float, scale: str) -> float:
    return float(sigmoid(np.array([threshold]))[0]) if scale == LOGIT else float(threshold)
