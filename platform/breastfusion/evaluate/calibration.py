"""Scores on one scale: Platt calibration of a model's malignant log-odds, and honest checks.

Every model in breastfusion outputs logits ``(B, 2)``; its *score* is the malignant log-odds
``z = logit[1] - logit[0]`` in float64 (never the softmax probability, which saturates to
exactly 0 or 1 in float32 and turns rankings into ties). A patient's score is the mean of
its images'/pairs' log-odds.

Fold models trained a few epochs differ in scale by orders of magnitude, so pooled
out-of-fold scores and fold ensembles need a common scale: each fold model is calibrated on
its own validation fold, ``c = a·z + b`` (Platt scaling on the log-odds, fitted in float64
with Platt's smoothed targets so that perfectly separated folds still give finite
parameters, and ``a >= 0`` so that calibration never reverses a model's ranking using the
validation labels). ``c`` is a calibrated malignant log-odds; ``sigmoid(c)`` a probability.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "platt"
IDENTITY = "identity"


@dataclass(frozen=True)
class Calibration:
    """``c = a·z + b`` on malignant log-odds ``z``."""

    a: float = 1.0
    b: float = 0.0
    method: str = IDENTITY
    n_patients: int = 0
    note: str = ""

    def apply(self, z: Any) -> np.ndarray:
        return self.a * np.asarray(z, dtype=np.float64) + self.b

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "a": self.a,
            "b": self.b,
            "n_patients": self.n_patients,
            "note": self.note,
            "formula": "calibrated log-odds = a * log-odds + b; probability = 1/(1+exp(-c))",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Calibration:
        if not d:
            return cls()
        return cls(
            a=float(d["a"]),
            b=float(d["b"]),
            method=str(d.get("method", METHOD)),
            n_patients=int(d.get("n_patients", 0) or 0),
            note=str(d.get("note", "")),
        )


def fit_platt(y: Any, z: Any, *, max_iter: int = 100) -> Calibration:
    """Platt scaling of log-odds ``z`` to labels ``y`` (float64 Newton; see the module doc).

    Targets are Platt's smoothed ``(N+ + 1)/(N+ + 2)`` and ``1/(N- + 2)``; the fit is done on
    standardised ``z`` and mapped back. A constant ``z`` (or a fitted negative slope) gives
    ``a = 0``: the calibrated score is then the smoothed prevalence for every patient.
    """
    y = np.asarray(y, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    prior = float(np.log((n_pos + 1) / (n_neg + 1)))
    mu, sd = float(z.mean()) if len(z) else 0.0, float(z.std()) if len(z) else 0.0
    if not len(z) or not math.isfinite(sd) or sd <= 1e-12 * (1 + abs(mu)):
        return Calibration(0.0, prior, METHOD, len(y), "constant scores: prevalence only")
    x = (z - mu) / sd
    w = np.array([1.0, prior])  # slope, intercept on standardised scores
    for _ in range(max_iter):
        p = sigmoid(w[0] * x + w[1])
        g = np.array([np.sum((p - t) * x), np.sum(p - t)])
        r = p * (1 - p) + 1e-12
        h = np.array([[np.sum(r * x * x), np.sum(r * x)], [np.sum(r * x), np.sum(r)]])
        step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
        w = w - step
        if np.max(np.abs(step)) < 1e-10:
            break
    slope, intercept = float(w[0]), float(w[1])
    if slope <= 0:
        return Calibration(0.0, prior, METHOD, len(y), "no positive association: prevalence only")
    return Calibration(slope / sd, intercept - slope * mu / sd, METHOD, len(y))


def mean_calibration(calibrations: Sequence[Calibration], note: str) -> Calibration:
    """The average of several fold calibrations (for a refit model that has no fold of its
    own to be calibrated on: its threshold is transferred, not fitted)."""
    if not calibrations:
        return Calibration(note=note)
    a = float(np.mean([c.a for c in calibrations]))
    b = float(np.mean([c.b for c in calibrations]))
    return Calibration(
        a, b, "mean of fold calibrations", sum(c.n_patients for c in calibrations), note
    )


def sigmoid(c: Any) -> np.ndarray:
    """Probability from log-odds, stable for large |c| (float64)."""
    c = np.asarray(c, dtype=np.float64)
    out = np.empty_like(c)
    pos = c >= 0
    out[pos] = 1 / (1 + np.exp(-c[pos]))
    e = np.exp(c[~pos])
    out[~pos] = e / (1 + e)
    return out


def logit(p: float) -> float:
    """Log-odds of a probability (``train.threshold`` 0.5 → 0.0)."""
    p = min(max(float(p), 1e-300), 1 - 1e-16)
    return math.log(p) - math.log1p(-p)


def calibration_slope_intercept(y: Any, c: Any) -> tuple[float, float]:
    """Calibration slope and intercept of calibrated log-odds ``c`` on labels ``y``: the
    logistic regression ``logit P(y=1) = intercept + slope·c`` (ideal: 1 and 0), unsmoothed.
    NaN when one class is missing, ``c`` is constant, or the classes are separated (the slope
    is then unbounded)."""
    y = np.asarray(y, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    if len(np.unique(y)) < 2 or not np.isfinite(c).all() or np.std(c) == 0:
        return math.nan, math.nan
    if c[y < 0.5].max() < c[y > 0.5].min():
        return math.nan, math.nan  # perfectly separated: no finite maximum-likelihood slope
    mu, sd = float(c.mean()), float(c.std())
    x = (c - mu) / sd
    prevalence = float(y.mean())
    w = np.array([0.0, math.log(prevalence / (1 - prevalence))])  # slope, intercept (standardised)

    def nll(v: np.ndarray) -> float:
        z = v[0] * x + v[1]
        return float(np.sum(np.logaddexp(0.0, z) - y * z))

    current = nll(w)
    for _ in range(200):
        p = sigmoid(w[0] * x + w[1])
        g = np.array([np.sum((p - y) * x), np.sum(p - y)])
        r = p * (1 - p) + 1e-12
        h = np.array([[np.sum(r * x * x), np.sum(r * x)], [np.sum(r * x), np.sum(r)]])
        step = np.linalg.solve(h + 1e-9 * np.eye(2), g)
        t = 1.0
        while t > 1e-6 and nll(w - t * step) > current:  # step halving: always downhill
            t /= 2
        w, previous, current = w - t * step, current, nll(w - t * step)
        if abs(previous - current) < 1e-12 or abs(w[0]) > 1e4:
            break
    if not np.all(np.isfinite(w)) or abs(w[0]) > 1e3:
        return math.nan, math.nan  # separated classes: the slope is unbounded
    slope = float(w[0] / sd)
    return slope, float(w[1] - slope * mu)
