"""Patient-level binary metrics, operating points and calibration.

The unit is the patient, not the image pair: the study appears to score image pairs, which
lets a patient with many images count many times and makes the CIs too narrow. Predictions
with several rows per (model, patient) are therefore averaged to one score first
(``patient_scores``).

Conventions (the same as scikit-learn): a patient is called malignant when its score is
``>= threshold``; sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), precision = TP/(TP+FP)
(NaN when nothing is called malignant), accuracy = (TP+TN)/N; AUC is the Mann-Whitney
probability with ties counted one half.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from breastfusion.errors import UserError

PREDICTION_COLUMNS = ("patient_id", "y_true", "y_score")
_MAX_LISTED = 10


def _first(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f"; ... and {len(items) - _MAX_LISTED} more"
    return shown


# --------------------------------------------------------------------------------------------
# Reading and validating predictions
# --------------------------------------------------------------------------------------------


def validate_predictions(
    df: pd.DataFrame, source: str = "predictions", *, require_model: bool = False
) -> pd.DataFrame:
    """Check a predictions table; return a copy with typed columns.

    Columns ``patient_id, y_true, y_score`` (+ ``model``, optional ``fold``). ``y_true`` must be
    0/1, ``y_score`` any finite number, higher = more suspicious (breastfusion writes calibrated
    malignant log-odds; other tools write probabilities in [0, 1]). Messages name the file,
    the CSV line (header = line 1), the model and the patient. A missing ``model`` column is
    filled with ``"model"`` unless ``require_model``.
    """
    needed = (("model",) if require_model else ()) + PREDICTION_COLUMNS
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)} "
            f"(expected {', '.join(('model',) + PREDICTION_COLUMNS)}, optional fold)"
        )
    if df.empty:
        raise UserError(f"{source}: no predictions (the file has a header but no rows)")
    out = df.copy()
    if "model" not in out.columns:
        out["model"] = "model"
    out["model"] = out["model"].astype(str)
    # Stripped as load_manifest strips, so " 007" here and "007" in the manifest match.
    out["patient_id"] = out["patient_id"].astype(str).str.strip()
    line = pd.Series(np.arange(len(out)) + 2, index=out.index)

    def where(mask: pd.Series) -> list[str]:
        rows = out[mask]
        return [
            f"line {line[i]} (model {rows.at[i, 'model']}, patient {rows.at[i, 'patient_id']})"
            for i in rows.index
        ]

    problems: list[str] = []
    empty_id = out["patient_id"].str.strip().isin(["", "nan"]) | df["patient_id"].isna()
    if empty_id.any():
        problems.append("empty patient_id at " + _first(where(empty_id)))
    y = pd.to_numeric(out["y_true"], errors="coerce")
    bad_y = ~y.isin([0, 1])
    if bad_y.any():
        problems.append("y_true must be 0 (benign) or 1 (malignant) at " + _first(where(bad_y)))
    s = pd.to_numeric(out["y_score"], errors="coerce")
    nan_s = s.isna()
    if nan_s.any():
        problems.append("y_score is missing, NaN or not a number at " + _first(where(nan_s)))
    infinite = ~nan_s & ~np.isfinite(s.fillna(0.0))
    if infinite.any():
        problems.append("y_score is infinite at " + _first(where(infinite)))
    if problems:
        raise UserError(f"{source}: invalid predictions", details=problems)
    out["y_true"] = y.astype(int)
    out["y_score"] = s.astype(float)
    return out


def read_predictions(path: str | os.PathLike, *, require_model: bool = False) -> pd.DataFrame:
    """Read and validate a predictions CSV (see ``validate_predictions``)."""
    from breastfusion.io import read_csv_table

    path = Path(path)
    df = read_csv_table(path, what="predictions file", str_columns=("patient_id", "model"))
    return validate_predictions(df, str(path), require_model=require_model)


def patient_scores(df: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """One row per (model, patient): the mean score of its rows, its single label.

    Returns columns ``model, patient_id, y_true, y_score, n_rows`` sorted by model and
    patient. A patient with two labels under one model is a ``UserError`` naming it.
    """
    df = df if "model" in df.columns else df.assign(model="model")
    df = df.assign(model=df["model"].astype(str), patient_id=df["patient_id"].astype(str))
    grouped = df.groupby(["model", "patient_id"], sort=True)
    n_labels = grouped["y_true"].nunique()
    conflicting = n_labels[n_labels > 1]
    if len(conflicting):
        names = [f"patient {p} (model {m})" for m, p in conflicting.index]
        raise UserError(
            f"{source}: {len(names)} patient(s) with two labels (y_true 0 and 1): {_first(names)}"
        )
    out = grouped.agg(
        y_true=("y_true", "first"), y_score=("y_score", "mean"), n_rows=("y_score", "size")
    ).reset_index()
    out["y_true"] = out["y_true"].astype(int)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC by midranks (Mann-Whitney U / (m·n)); equals sklearn's roc_auc_score."""
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return math.nan
    ranks = rankdata(np.asarray(s, dtype=float))
    return float((ranks[y].sum() - m * (m + 1) / 2) / (m * n))


@dataclass(frozen=True)
class BinaryMetrics:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: float
    specificity: float
    precision: float
    accuracy: float
    auc: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _ratio(a: int, b: int) -> float:
    return a / b if b else math.nan


def binary_metrics(y: np.ndarray, s: np.ndarray, threshold: float = 0.5) -> BinaryMetrics:
    """Confusion counts and the study's metrics at ``threshold`` (score >= threshold → 1)."""
    y = np.asarray(y).astype(int)
    pred = np.asarray(s, dtype=float) >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return BinaryMetrics(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        precision=_ratio(tp, tp + fp),
        accuracy=_ratio(tp + tn, len(y)),
        auc=roc_auc(y, s),
    )


def threshold_for_sensitivity(y: np.ndarray, s: np.ndarray, target: float) -> float:
    """The largest threshold whose sensitivity on (y, s) is at least ``target``.

    Chosen on validation patients and then applied unchanged to test patients. The largest
    such threshold keeps specificity as high as the sensitivity target allows; it is the
    score of the ceil(target·P)-th highest-scoring malignant patient.
    """
    if not (0 < target <= 1) or math.isnan(target):
        raise UserError(f"target_sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(s, dtype=float)[y])[::-1]
    if len(pos) == 0:
        raise UserError("cannot choose a threshold for a target sensitivity: no malignant patient")
    # The small tolerance stops 0.9 * 10 = 9.000000000000002 from demanding 10 of 10.
    needed = max(1, math.ceil(target * len(pos) - 1e-9))
    return float(pos[needed - 1])


@dataclass(frozen=True)
class OperatingPointCheck:
    """Whether a threshold chosen for a target sensitivity gives a usable operating point."""

    threshold: float
    sensitivity: float
    specificity: float
    warnings: tuple[str, ...]
    achievable: tuple[tuple[float, float, float], ...]  # (threshold, sensitivity, specificity)


MIN_USEFUL_SPECIFICITY = 0.2


def check_operating_point(
    y: np.ndarray, s: np.ndarray, threshold: float, target: float, source: str
) -> OperatingPointCheck:
    """Warn when a target sensitivity is reachable only by calling nearly everyone malignant
    (specificity < 0.2 on ``source``) or when the threshold lies below every benign score;
    list the achievable (threshold, sensitivity, specificity) points on the ROC's upper hull."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=float)
    m = binary_metrics(y, s, threshold)
    warnings = []
    if len(s[~y]) and threshold <= float(np.min(s[~y])):
        warnings.append(
            f"{source}: the threshold for sensitivity {target:g} ({threshold:.6g}) is at or below "
            "every benign score: every patient is called malignant"
        )
    elif m.specificity < MIN_USEFUL_SPECIFICITY:
        warnings.append(
            f"{source}: sensitivity {target:g} is reached only at specificity "
            f"{m.specificity:.3f} (threshold {threshold:.6g}): nearly everyone is called malignant"
        )
    return OperatingPointCheck(
        threshold, m.sensitivity, m.specificity, tuple(warnings), _points(y, s)
    )


def _points(
    y: np.ndarray, s: np.ndarray, limit: int = 12
) -> tuple[tuple[float, float, float], ...]:
    """Distinct operating points (each unique score as a threshold), thinned to ``limit``."""
    out = []
    for t in np.unique(s)[::-1]:
        m = binary_metrics(y, s, float(t))
        out.append((float(t), m.sensitivity, m.specificity))
    if len(out) > limit:
        idx = np.unique(np.linspace(0, len(out) - 1, limit).round().astype(int))
        out = [out[i] for i in idx]
    return tuple(out)


def degenerate_reason(
    scores: np.ndarray, *, rel_sd: float = 1e-6, min_sd: float = 0.0
) -> str | None:
    """Why a model's validation scores look collapsed, or None when they do not.

    Degenerate: fewer distinct patient scores than max(3, 20% of the patients) (a working model
    gives continuous, almost never tied patient means), scores whose SD is below ``rel_sd``
    of their magnitude (constant up to float noise), or -- for scores on a known scale such as
    log-odds -- an SD below ``min_sd`` (a model that predicts the class prior for everyone up
    to a per-mille wobble, e.g. a plain VGG whose ReLUs died, ranks patients by noise). Not a
    criterion: every patient called one class at some threshold — that depends on the
    threshold, not on the model.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    n = len(s)
    if n == 0:
        return "no finite score"
    distinct = len(np.unique(s))
    needed = max(3, math.ceil(0.2 * n))
    if n >= 3 and distinct < needed:
        return f"{distinct} distinct score(s) over {n} patients (a working model gives >= {needed})"
    sd = float(np.std(s))
    if sd <= rel_sd * (1.0 + float(np.mean(np.abs(s)))):
        return f"scores nearly constant (SD {sd:.3g} around {float(np.mean(s)):.6g})"
    if sd < min_sd:
        return (
            f"scores nearly constant: SD {sd:.3g} log-odds (below {min_sd:g}) around "
            f"{float(np.mean(s)):.4g}; the model predicts about the same for every patient"
        )
    return None


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def brier_score(y: np.ndarray, s: np.ndarray) -> float:
    """Mean squared difference between score and outcome (sklearn's brier_score_loss)."""
    y = np.asarray(y, dtype=float)
    return float(np.mean((np.asarray(s, dtype=float) - y) ** 2))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per non-empty bin: mean predicted score, observed malignant fraction, patients."""

    bin_low: tuple[float, ...]
    bin_high: tuple[float, ...]
    mean_predicted: tuple[float, ...]
    fraction_positive: tuple[float, ...]
    count: tuple[int, ...]

    def as_dict(self) -> dict[str, list]:
        return {k: list(v) for k, v in asdict(self).items()}


def reliability_curve(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> ReliabilityCurve:
    """Uniform bins on [0, 1], binned as sklearn's ``calibration_curve(strategy="uniform")``."""
    y = np.asarray(y, dtype=float)
    s = np.asarray(s, dtype=float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], s)  # same rule as sklearn: right-closed inner bins
    count = np.bincount(ids, minlength=n_bins)
    sum_s = np.bincount(ids, weights=s, minlength=n_bins)
    sum_y = np.bincount(ids, weights=y, minlength=n_bins)
    keep = count > 0
    return ReliabilityCurve(
        bin_low=tuple(float(v) for v in edges[:-1][keep]),
        bin_high=tuple(float(v) for v in edges[1:][keep]),
        mean_predicted=tuple(float(v) for v in sum_s[keep] / count[keep]),
        fraction_positive=tuple(float(v) for v in sum_y[keep] / count[keep]),
        count=tuple(int(v) for v in count[keep]),
    )
