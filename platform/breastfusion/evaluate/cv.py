"""Cross-validation summaries of one configuration, and paired comparisons of two.

Every development patient is scored once, by the fold model that did not train on it. The
K fold models are calibrated separately (Platt on their own validation fold), so the pooled
scores share a scale only as far as the calibrations agree. Hence the headline is the
**fold-stratified AUC** (concordance counted only within folds) with a stratified DeLong
CI; the pooled OOF AUC is kept as a labelled secondary figure. Both intervals are
conditional on the fold models (patient sampling only, not retraining).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.evaluate import metrics as M
from breastfusion.evaluate import scale as SC
from breastfusion.evaluate import stats as S
from breastfusion.evaluate.holdout import LEVEL, proportions
from breastfusion.evaluate.results import Comparison, CvSummary, Interval, TrialResult
from breastfusion.evaluate.settings import AggregateSettings

METHOD = {
    "unit": "patient (each development patient is scored once, by the fold model that did "
    "not train on it)",
    "score_scale": "",  # filled in by method_text()
    "mean_auc": "mean ± sample SD (ddof 1) of the per-fold patient-level validation AUCs (the "
    "search objective)",
    "stratified_auc": "headline: fold-stratified AUC — concordance counted only between a "
    "malignant and a benign patient of the same fold (= the fold AUCs weighted by their "
    "malignant × benign pairs); 95% CI from a stratified DeLong variance (per-fold DeLong "
    "variances combined with the squared pair weights, folds independent)",
    "pooled_auc": "secondary: AUC of the pooled calibrated out-of-fold scores of all folds "
    "(ranks patients of different fold models against each other); 95% CI by stratified "
    "patient bootstrap, percentile interval",
    "proportions": "sensitivity, specificity, precision, accuracy on the pooled calibrated "
    "out-of-fold scores at the threshold (score >= threshold is malignant); 95% Wilson score "
    "intervals",
    "comparisons": "stratified paired DeLong test (folds as strata) of equal fold-stratified "
    "AUCs on the patients both configurations scored in the same fold",
    "conditional": "cross-validation intervals are conditional on the fold models: they "
    "reflect which patients were sampled, not the variation from retraining the models",
    "caveat": "cross-validation estimates that also chose the configurations: optimistic for "
    "the chosen ones; the holdout evaluation is the unbiased estimate",
}


def method_text(scales: Sequence[str]) -> dict[str, str]:
    """``METHOD`` with the score scale(s) the summaries were computed on."""
    used = sorted(set(scales)) or [SC.LOGIT]
    return {**METHOD, "score_scale": "; ".join(SC.NAMES[s] for s in used)}


def patient_oof(parts: Sequence[tuple[int, pd.DataFrame, str]]) -> pd.DataFrame:
    """One row per patient (``fold, patient_id, y_true, y_score``) from each fold's validated
    predictions (``(fold, table, source)``); a fold's rows of one patient are averaged."""
    out = []
    for k, df, source in parts:
        scores = M.patient_scores(M.validate_predictions(df, source), source)
        out.append(scores.assign(fold=k)[["fold", "patient_id", "y_true", "y_score"]])
    return pd.concat(out, ignore_index=True)


def fold_threshold(
    recorded: Sequence[Any], settings: AggregateSettings, scale: str
) -> tuple[float, str]:
    """The cut for the proportions: the setting, else the one every fold run recorded, else
    the scale's default (0.5 probability = 0.0 log-odds)."""
    if settings.threshold is not None:
        return float(settings.threshold), "fixed (aggregate.threshold)"
    values = {float(v) for v in recorded if isinstance(v, int | float) and math.isfinite(v)}
    if len(values) == 1 and len(recorded) > 0:
        thr = values.pop()
        return thr, "the threshold the fold runs recorded (their metrics.json)"
    thr = SC.DEFAULT_THRESHOLD[scale]
    return thr, f"default for {scale} scores ({thr:g} = probability 0.5)"


def ranking_scores(df: pd.DataFrame, suffix: str = "") -> np.ndarray:
    """The scores a within-fold concordance is counted on: the model's raw log-odds when the
    predictions carry them. Calibration is monotone, but a fold whose Platt slope is 0 (no
    positive association on its patients) has constant calibrated scores, which would turn
    its ranking -- good, bad or reversed -- into an AUC of exactly 0.5."""
    raw = f"y_score_raw{suffix}"
    column = raw if raw in df.columns and df[raw].notna().all() else f"y_score{suffix}"
    return df[column].to_numpy(dtype=float)


def cv_summary(
    oof: pd.DataFrame,
    recorded_thresholds: Sequence[Any],
    settings: AggregateSettings,
    warnings: list[str],
    source: str,
) -> CvSummary | None:
    """The configuration's CV numbers from its per-patient OOF scores (see the module doc)."""
    y = oof["y_true"].to_numpy()
    s = oof["y_score"].to_numpy(dtype=float)
    rank = ranking_scores(oof)
    folds = oof["fold"].to_numpy()
    if y.min() == y.max():
        warnings.append(f"{source}: only one class among {len(y)} patients; no CV AUC")
        return None
    scale = SC.resolve_scale(settings.score_scale, s)
    thr, thr_source = fold_threshold(recorded_thresholds, settings, scale)
    strat = S.stratified_delong(y, rank, folds)
    ci = S.stratified_auc_ci(y, rank, folds, LEVEL)
    boot = S.bootstrap_auc(y, s, n_boot=settings.bootstrap, seed=settings.seed)
    lo, hi = S.percentile_ci(boot, LEVEL)
    bm = M.binary_metrics(y, s, thr)
    props = {k: Interval(v["value"], v["ci_low"], v["ci_high"]) for k, v in proportions(bm).items()}
    return CvSummary(
        n_patients=len(y),
        n_malignant=int(y.sum()),
        n_folds=len(strat.strata),
        stratified_auc=Interval(ci.auc, ci.ci_low, ci.ci_high, ci.se),
        pooled_auc=Interval(bm.auc, lo, hi),
        threshold=thr,
        threshold_probability=SC.threshold_probability(thr, scale),
        threshold_source=thr_source,
        score_scale=scale,
        confusion={"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn},
        **props,
    )


def compare(label_a: str, a: TrialResult, label_b: str, b: TrialResult) -> Comparison | None:
    """Stratified paired DeLong test of two configurations on the patients both scored in
    the same fold (None when either has no OOF predictions)."""
    if a.oof is None or b.oof is None:
        return None
    merged = a.oof.merge(b.oof, on="patient_id", suffixes=("_a", "_b"))
    same = merged[
        (merged["fold_a"] == merged["fold_b"]) & (merged["y_true_a"] == merged["y_true_b"])
    ]
    notes = []
    if len(same) < len(merged):
        notes.append(
            f"{len(merged) - len(same)} shared patient(s) left out: in different folds or with "
            "different labels (the searches used different splits)"
        )
    y = same["y_true_a"].to_numpy()
    nan = dict(auc_a=math.nan, auc_b=math.nan, difference=math.nan, se=math.nan, z=math.nan)
    base = dict(a=label_a, b=label_b, trial_a=a.key, trial_b=b.key, n_patients=len(same))
    try:
        if len(same) < 3:
            raise ValueError("fewer than 3 shared patients")
        t = S.stratified_delong_test(
            y,
            ranking_scores(same, "_a"),
            ranking_scores(same, "_b"),
            same["fold_a"].to_numpy(),
        )
    except ValueError as exc:
        notes.append(f"no test: {exc}")
        return Comparison(**base, n_folds=0, p_value=math.nan, note="; ".join(notes), **nan)
    n_folds = sum(g["y_true_a"].nunique() == 2 for _, g in same.groupby("fold_a"))
    return Comparison(
        **base,
        n_folds=n_folds,
        auc_a=t.auc_a,
        auc_b=t.auc_b,
        difference=t.difference,
        se=t.se,
        z=t.z,
        p_value=t.p_value,
        note="; ".join(notes),
    )
