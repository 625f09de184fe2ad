"""Patient-level metrics of held-out predictions with stated CIs and paired model tests.

Input: a predictions table with ``model, patient_id, y_true, y_score`` (optional ``fold``);
rows of one (model, patient) are averaged to one patient score. Several models are compared
on the patients they all share, so every number in one result refers to the same cohort.
Scores may be calibrated log-odds (platform models) or probabilities; see ``evaluate.scale``.

``evaluate_predictions`` returns the ``metrics.json`` document (the study's
``08_final/metrics.json`` shape is a contract: ``models → <name> → auc.value``,
``sensitivity.value``, ``specificity.value``, ``threshold``, ``operating_point``, and
``comparisons``) and the patient scores it was computed on. Every number is stored at full
precision. Rendering (Markdown, figures) lives in ``breastfusion.report``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import UserError
from breastfusion.evaluate import metrics as M
from breastfusion.evaluate import scale as SC
from breastfusion.evaluate import stats as S
from breastfusion.evaluate.calibration import calibration_slope_intercept
from breastfusion.evaluate.settings import EvaluateSettings
from breastfusion.io import json_clean

log = logging.getLogger(__name__)

LEVEL = 0.95

METHOD = {
    "unit": "patient: rows of the same model and patient are averaged to one score",
    "confidence_level": LEVEL,
    "auc": (
        "headline interval: stratified patient bootstrap (patients resampled with "
        "replacement within each class, class sizes fixed), percentile interval"
    ),
    "auc_delong": (
        "DeLong variance (fast midrank form, Sun & Xu 2014), normal approximation on the AUC "
        "scale, clipped to [0, 1]"
    ),
    "auc_bootstrap": "the same stratified patient bootstrap as the headline 'auc' interval",
    "sensitivity": "Wilson score interval over malignant patients",
    "specificity": "Wilson score interval over benign patients",
    "precision": "Wilson score interval over patients called malignant",
    "accuracy": "Wilson score interval over all patients",
    "brier": (
        "mean squared difference between the malignancy probability and the outcome; "
        "stratified patient bootstrap (same resamples as the AUC), percentile interval"
    ),
    "calibration": (
        "logistic recalibration logit P(malignant) = intercept + slope * calibrated log-odds "
        "(ideal: intercept 0, slope 1)"
    ),
    "comparisons": "paired two-sided DeLong test of equal AUCs on the patients both models share",
    "threshold": "a patient is called malignant when its score >= threshold (on the score scale)",
    "operating_point": (
        "threshold = the largest one reaching the target sensitivity on the validation "
        "patients, then applied unchanged to the test patients"
    ),
}


def _interval(value: float, lo: float, hi: float, **extra: Any) -> dict[str, Any]:
    return {"value": value, "ci_low": lo, "ci_high": hi, **extra}


def proportions(m: M.BinaryMetrics) -> dict[str, dict[str, Any]]:
    """Sensitivity, specificity, precision and accuracy with Wilson intervals and counts."""
    parts = {
        "sensitivity": (m.tp, m.tp + m.fn),
        "specificity": (m.tn, m.tn + m.fp),
        "precision": (m.tp, m.tp + m.fp),
        "accuracy": (m.tp + m.tn, m.tp + m.tn + m.fp + m.fn),
    }
    out = {}
    for name, (k, n) in parts.items():
        lo, hi = S.wilson_interval(k, n, LEVEL)
        out[name] = _interval(getattr(m, name), lo, hi, k=k, n=n)
    return out


def shared_patients(scores: pd.DataFrame, source: str) -> tuple[list[str], list[str]]:
    """Patients every model scored (sorted), and warnings about the ones left out.

    Also refuses a patient whose label differs between models: the labels are one truth.
    """
    labels = scores.groupby("patient_id")["y_true"].nunique()
    conflicting = sorted(labels.index[labels > 1])
    if conflicting:
        raise UserError(
            f"{source}: patient(s) with two labels across models: {', '.join(conflicting[:10])}"
            + (" ..." if len(conflicting) > 10 else "")
        )
    per_model = {m: set(g["patient_id"]) for m, g in scores.groupby("model")}
    common = set.intersection(*per_model.values())
    if not common:
        sizes = ", ".join(f"{m}: {len(p)}" for m, p in sorted(per_model.items()))
        raise UserError(
            f"{source}: the models have no patients in common ({sizes} patients); "
            "models are compared on the patients they share"
        )
    warnings = [
        f"model {m}: {len(p - common)} of {len(p)} patients not scored by every model are left out"
        for m, p in sorted(per_model.items())
        if p - common
    ]
    return sorted(common), warnings


def check_classes(y: np.ndarray, model: str, source: str, what: str) -> None:
    n_mal = int(y.sum())
    if n_mal == 0 or n_mal == len(y):
        missing = "malignant" if n_mal == 0 else "benign"
        raise UserError(
            f"{source}: model {model} has no {missing} patient among its {len(y)} {what} "
            "patients; AUC, sensitivity and specificity need both classes"
        )


def _key(prefix: str, name: str, names: Mapping[str, str] | None) -> str:
    return (names or {}).get(name) or (f"{prefix}.{name}" if prefix else name)


def _check_pairing(
    settings: EvaluateSettings, validation: Any, prefix: str, names: Mapping[str, str] | None
) -> None:
    target = _key(prefix, "target_sensitivity", names)
    if settings.target_sensitivity is not None and validation is None:
        raise UserError(
            f"{target} needs validation predictions: the threshold must be chosen on "
            "validation patients, never on the test patients"
        )
    if settings.target_sensitivity is None and validation is not None:
        raise UserError(f"validation predictions were given without {target}")


def _validation_scores(
    validation: pd.DataFrame, models: list[str], common: list[str], source: str
) -> tuple[pd.DataFrame, list[str]]:
    if "model" not in validation.columns and len(models) == 1:
        # A single model's validation file may omit the model column.
        validation = validation.assign(model=models[0])
    val = M.patient_scores(M.validate_predictions(validation, source), source)
    overlap = sorted(set(val["patient_id"]) & set(common))
    warnings = []
    if overlap:
        warnings.append(
            f"{len(overlap)} patient(s) are in both the validation and the test predictions "
            f"(e.g. {', '.join(overlap[:5])}): the operating point is not independent of the "
            "test patients"
        )
    return val, warnings


def evaluate_predictions(
    predictions: pd.DataFrame,
    *,
    threshold: float | None = None,
    target_sensitivity: float | None = None,
    validation: pd.DataFrame | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    source: str = "predictions",
    validation_source: str = "validation",
    score_scale: str = "auto",
    prefix: str = "",
    names: Mapping[str, str] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Compute everything ``metrics.json`` holds; returns (result, patient scores used).

    ``predictions`` and ``validation`` are raw prediction tables (validated here). Settings
    errors name ``prefix.key`` (e.g. ``final.target_sensitivity``), or ``names[key]``.
    """
    settings = EvaluateSettings.from_dict(
        {
            "threshold": threshold,
            "target_sensitivity": target_sensitivity,
            "bootstrap": n_boot,
            "seed": seed,
            "score_scale": score_scale,
        },
        prefix,
        names=names,
    )
    _check_pairing(settings, validation, prefix, names)
    scores = M.patient_scores(M.validate_predictions(predictions, source), source)
    common, warnings = shared_patients(scores, source)
    scores = scores[scores["patient_id"].isin(common)].reset_index(drop=True)
    models = sorted(scores["model"].unique())
    by_model = {m: g.sort_values("patient_id") for m, g in scores.groupby("model")}
    y = by_model[models[0]]["y_true"].to_numpy()
    check_classes(y, models[0], source, "shared")
    matrix = np.vstack([by_model[m]["y_score"].to_numpy() for m in models])
    val = None
    if validation is not None:
        val, more = _validation_scores(validation, models, common, validation_source)
        warnings += more
    scale = SC.resolve_scale(
        settings.score_scale, matrix, None if val is None else val["y_score"].to_numpy()
    )
    _check_scale(scale, matrix, source, _key(prefix, "score_scale", names))
    ctx = _Context(settings, scale, S.stratified_counts(y, n_boot, seed), validation_source)
    entries = {m: _model_entry(ctx, m, y, matrix[i], val, warnings) for i, m in enumerate(models)}
    for w in warnings:
        log.warning(w)
    result = {
        "models": entries,
        "comparisons": _comparisons(models, y, matrix),
        "method": {**METHOD, "score_scale": SC.NAMES[scale]},
        "n_patients_shared": len(common),
        "settings": {
            **settings.to_dict(),
            "score_scale_used": scale,
            "bootstrap_resamples": n_boot,
        },
        "warnings": warnings,
    }
    return json_clean(result), scores


def _check_scale(scale: str, matrix: np.ndarray, source: str, key: str) -> None:
    if scale == SC.PROBABILITY and not ((matrix >= 0) & (matrix <= 1)).all():
        outside = int(((matrix < 0) | (matrix > 1)).sum())
        raise UserError(
            f"{source}: {key} is probability, but {outside} patient score(s) lie outside "
            "[0, 1] (log-odds? use logit or auto)"
        )


class _Context:
    def __init__(self, settings: EvaluateSettings, scale: str, counts: Any, val_source: str):
        self.settings = settings
        self.scale = scale
        self.counts = counts
        self.val_source = val_source


def _threshold(ctx: _Context) -> tuple[float, str]:
    if ctx.settings.threshold is not None:
        return float(ctx.settings.threshold), "fixed (threshold setting)"
    thr = SC.DEFAULT_THRESHOLD[ctx.scale]
    return thr, f"default for {ctx.scale} scores ({thr:g} = probability 0.5)"


def _model_entry(
    ctx: _Context,
    model: str,
    y: np.ndarray,
    s: np.ndarray,
    val: pd.DataFrame | None,
    warnings: list[str],
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "n_patients": len(y),
        "n_malignant": int(y.sum()),
        "n_benign": int(len(y) - y.sum()),
        "score_scale": ctx.scale,
    }
    thr, thr_source = _threshold(ctx)
    if val is not None:
        op = operating_point(ctx, model, val, y, s)
        thr, thr_source = op["threshold"], op["threshold_source"]
        warnings.extend(op["warnings"])
        entry["operating_point"] = op
    entry["threshold"] = thr
    entry["threshold_probability"] = SC.threshold_probability(thr, ctx.scale)
    entry["threshold_source"] = thr_source
    entry.update(_discrimination(ctx, y, s, thr))
    entry.update(_calibration(ctx, y, s))
    return entry


def _discrimination(ctx: _Context, y: np.ndarray, s: np.ndarray, thr: float) -> dict[str, Any]:
    bm = M.binary_metrics(y, s, thr)
    boot = S.bootstrap_auc(y, s, counts=ctx.counts)
    b_lo, b_hi = S.percentile_ci(boot, LEVEL)
    dl = S.delong_ci(y, s, LEVEL)
    return {
        "auc": _interval(bm.auc, b_lo, b_hi, method="bootstrap"),
        "auc_bootstrap": _interval(
            bm.auc, b_lo, b_hi, se=float(np.std(boot, ddof=1)), n_resamples=ctx.counts.n_boot
        ),
        "auc_delong": _interval(dl.auc, dl.ci_low, dl.ci_high, se=dl.se),
        **proportions(bm),
        "confusion": {"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn},
    }


def _calibration(ctx: _Context, y: np.ndarray, s: np.ndarray) -> dict[str, Any]:
    p = SC.as_probability(s, ctx.scale)
    sq_err = (p - y) ** 2
    lo, hi = S.percentile_ci(S.bootstrap_mean(sq_err, ctx.counts), LEVEL)
    slope, intercept = calibration_slope_intercept(y, SC.as_log_odds(s, ctx.scale))
    return {
        "brier": _interval(M.brier_score(y, p), lo, hi),
        "reliability": M.reliability_curve(y, p).as_dict(),
        "calibration": {"slope": slope, "intercept": intercept},
    }


def operating_point(
    ctx: _Context, model: str, val: pd.DataFrame, y: np.ndarray, s: np.ndarray
) -> dict[str, Any]:
    """The threshold for the target sensitivity on the validation patients, checked
    (``metrics.check_operating_point``), and what it gives there and on the test patients."""
    vs = val[val["model"] == model]
    if vs.empty:
        have = ", ".join(sorted(val["model"].unique()))
        raise UserError(f"{ctx.val_source}: no predictions for model {model} (it has: {have})")
    vy, vsc = vs["y_true"].to_numpy(), vs["y_score"].to_numpy()
    check_classes(vy, model, ctx.val_source, "validation")
    target = float(ctx.settings.target_sensitivity or 0.0)
    thr = M.threshold_for_sensitivity(vy, vsc, target)
    check = M.check_operating_point(vy, vsc, thr, target, f"{ctx.val_source}, model {model}")
    return {
        "target_sensitivity": target,
        "threshold": thr,
        "threshold_probability": SC.threshold_probability(thr, ctx.scale),
        "threshold_source": f"chosen on {ctx.val_source} for sensitivity >= {target:g}",
        "validation_file": ctx.val_source,
        "validation": {
            "n_patients": len(vy),
            "n_malignant": int(vy.sum()),
            **proportions(M.binary_metrics(vy, vsc, thr)),
        },
        "test": {
            "n_patients": len(y),
            "n_malignant": int(y.sum()),
            **proportions(M.binary_metrics(y, s, thr)),
        },
        "warnings": list(check.warnings),
        "achievable": [
            {"threshold": t, "sensitivity": se, "specificity": sp} for t, se, sp in check.achievable
        ],
    }


def _comparisons(models: list[str], y: np.ndarray, matrix: np.ndarray) -> list[dict[str, Any]]:
    out = []
    for (ia, a), (ib, b) in itertools.combinations(enumerate(models), 2):
        t = S.delong_test(y, matrix[ia], matrix[ib])
        out.append(
            {
                "a": a,
                "b": b,
                "n_patients": len(y),
                "auc_a": t.auc_a,
                "auc_b": t.auc_b,
                "difference": t.difference,
                "se": t.se,
                "z": t.z,
                "p_value": t.p_value,
                "method": "paired DeLong",
            }
        )
    return out
