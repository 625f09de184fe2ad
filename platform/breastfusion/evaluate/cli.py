"""``breastfusion evaluate``: patient-level metrics with stated CIs and paired model tests.

Input: a predictions CSV with ``model, patient_id, y_true, y_score`` (optional ``fold``); rows
of one (model, patient) are averaged to one patient score. Several models are compared on the
patients they all share, so every number in one table refers to the same cohort.

Output in ``--out DIR`` (each file written atomically; other files in DIR are left alone):

* ``metrics.json``: ``models.<name>`` with ``n_patients``, ``n_malignant``, ``threshold``,
  ``auc`` (headline CI: stratified patient bootstrap), ``auc_delong``, ``sensitivity``,
  ``specificity``, ``precision``, ``accuracy``, ``brier`` (each ``{"value", "ci_low",
  "ci_high", ...}``), ``confusion``, ``reliability`` and, with ``--target-sensitivity``,
  ``operating_point`` (the threshold chosen on the validation file and the metrics it gives
  there and on the test file); ``comparisons`` (paired DeLong per pair of models);
  ``method`` (how each interval was computed); ``settings`` and ``inputs``.
* ``metrics.md``: the same as readable tables.
* ``reliability.png``: reliability diagram of every model.
* ``patient_scores.csv``: the per-patient scores the metrics were computed on.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from breastfusion.errors import UserError
from breastfusion.evaluate import metrics as M
from breastfusion.evaluate import stats as S
from breastfusion.io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    json_clean,
    read_csv_table,
    sha256_file,
)

log = logging.getLogger(__name__)

LEVEL = 0.95
MIN_BOOTSTRAP = 100  # fewer resamples make the 2.5th/97.5th percentiles mostly noise

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
    "brier": "stratified patient bootstrap (same resamples as the AUC), percentile interval",
    "comparisons": "paired two-sided DeLong test of equal AUCs on the patients both models share",
    "threshold": "a patient is called malignant when its score >= threshold",
    "operating_point": (
        "threshold = the largest one reaching the target sensitivity on the validation "
        "patients, then applied unchanged to the test patients"
    ),
}


# --------------------------------------------------------------------------------------------
# Typed evaluation
# --------------------------------------------------------------------------------------------


def _interval(value: float, lo: float, hi: float, **extra: Any) -> dict[str, Any]:
    return {"value": value, "ci_low": lo, "ci_high": hi, **extra}


def _proportions(m: M.BinaryMetrics) -> dict[str, dict[str, Any]]:
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


def _check_classes(y: np.ndarray, model: str, source: str, what: str) -> None:
    n_mal = int(y.sum())
    if n_mal == 0 or n_mal == len(y):
        missing = "malignant" if n_mal == 0 else "benign"
        raise UserError(
            f"{source}: model {model} has no {missing} patient among its {len(y)} {what} "
            "patients; AUC, sensitivity and specificity need both classes"
        )


def evaluate_predictions(
    predictions: pd.DataFrame,
    *,
    threshold: float = 0.5,
    target_sensitivity: float | None = None,
    validation: pd.DataFrame | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    source: str = "predictions",
    validation_source: str = "validation",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Compute everything ``metrics.json`` holds; returns (result, patient scores used).

    ``predictions`` and ``validation`` are raw prediction tables (validated here).
    """
    if not (0 <= threshold <= 1) or math.isnan(threshold):
        raise UserError(f"--threshold must be in [0, 1], got {threshold}")
    if target_sensitivity is not None:
        if not (0 < target_sensitivity <= 1) or math.isnan(target_sensitivity):
            raise UserError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}")
        if validation is None:
            raise UserError(
                "--target-sensitivity needs --threshold-from VALIDATION.csv: the threshold "
                "must be chosen on validation patients, never on the test patients"
            )
    elif validation is not None:
        raise UserError("--threshold-from needs --target-sensitivity")
    if n_boot < MIN_BOOTSTRAP:
        raise UserError(f"--bootstrap must be at least {MIN_BOOTSTRAP}, got {n_boot}")

    scores = M.patient_scores(M.validate_predictions(predictions, source), source)
    common, warnings = shared_patients(scores, source)
    scores = scores[scores["patient_id"].isin(common)].reset_index(drop=True)
    models = sorted(scores["model"].unique())
    by_model = {m: g.sort_values("patient_id") for m, g in scores.groupby("model")}
    y = by_model[models[0]]["y_true"].to_numpy()
    _check_classes(y, models[0], source, "shared")
    score_matrix = np.vstack([by_model[m]["y_score"].to_numpy() for m in models])

    val_scores = None
    if validation is not None:
        if "model" not in validation.columns and len(models) == 1:
            # A single model's validation file may omit the model column.
            validation = validation.assign(model=models[0])
        val_scores = M.patient_scores(
            M.validate_predictions(validation, validation_source), validation_source
        )
        overlap = sorted(set(val_scores["patient_id"]) & set(common))
        if overlap:
            warnings.append(
                f"{len(overlap)} patient(s) are in both the validation and the test "
                f"predictions (e.g. {', '.join(overlap[:5])}): the operating point is not "
                "independent of the test patients"
            )

    # One set of resamples for every model and statistic: paired, reproducible intervals.
    counts = S.stratified_counts(y, n_boot, seed)
    result_models: dict[str, Any] = {}
    for i, model in enumerate(models):
        s = score_matrix[i]
        entry: dict[str, Any] = {
            "n_patients": len(y),
            "n_malignant": int(y.sum()),
            "n_benign": int(len(y) - y.sum()),
        }
        thr, thr_source = threshold, "fixed (--threshold)"
        if val_scores is not None:
            vs = val_scores[val_scores["model"] == model]
            if vs.empty:
                have = ", ".join(sorted(val_scores["model"].unique()))
                raise UserError(
                    f"{validation_source}: no predictions for model {model} (it has: {have})"
                )
            vy, vsc = vs["y_true"].to_numpy(), vs["y_score"].to_numpy()
            _check_classes(vy, model, validation_source, "validation")
            thr = M.threshold_for_sensitivity(vy, vsc, float(target_sensitivity))
            thr_source = f"chosen on {validation_source} for sensitivity >= {target_sensitivity}"
            val_m = M.binary_metrics(vy, vsc, thr)
            test_m = M.binary_metrics(y, s, thr)
            entry["operating_point"] = {
                "target_sensitivity": target_sensitivity,
                "threshold": thr,
                "validation_file": validation_source,
                "validation": {
                    "n_patients": len(vy),
                    "n_malignant": int(vy.sum()),
                    **_proportions(val_m),
                },
                "test": {"n_patients": len(y), "n_malignant": int(y.sum()), **_proportions(test_m)},
            }
        entry["threshold"] = thr
        entry["threshold_source"] = thr_source

        bm = M.binary_metrics(y, s, thr)
        boot = S.bootstrap_auc(y, s, counts=counts)
        b_lo, b_hi = S.percentile_ci(boot, LEVEL)
        dl = S.delong_ci(y, s, LEVEL)
        entry["auc"] = _interval(bm.auc, b_lo, b_hi, method="bootstrap")
        entry["auc_bootstrap"] = _interval(
            bm.auc, b_lo, b_hi, se=float(np.std(boot, ddof=1)), n_resamples=n_boot
        )
        entry["auc_delong"] = _interval(dl.auc, dl.ci_low, dl.ci_high, se=dl.se)
        entry.update(_proportions(bm))
        sq_err = (s - y) ** 2
        br_lo, br_hi = S.percentile_ci(S.bootstrap_mean(sq_err, counts), LEVEL)
        entry["brier"] = _interval(M.brier_score(y, s), br_lo, br_hi)
        entry["confusion"] = {"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn}
        entry["reliability"] = M.reliability_curve(y, s).as_dict()
        result_models[model] = entry

    comparisons = []
    for (ia, a), (ib, b) in itertools.combinations(enumerate(models), 2):
        t = S.delong_test(y, score_matrix[ia], score_matrix[ib])
        comparisons.append(
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
            }
        )

    for w in warnings:
        log.warning(w)
    result = {
        "models": result_models,
        "comparisons": comparisons,
        "method": METHOD,
        "n_patients_shared": len(common),
        "settings": {
            "threshold": threshold if target_sensitivity is None else None,
            "target_sensitivity": target_sensitivity,
            "bootstrap_resamples": n_boot,
            "seed": seed,
        },
        "warnings": warnings,
    }
    return _clean(result), scores


_clean = json_clean  # JSON-safe, byte-stable (NaN → null, numpy → Python, 6 decimals)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(d: dict[str, Any]) -> str:
    return f"{_fmt(d['value'])} ({_fmt(d['ci_low'])}–{_fmt(d['ci_high'])})"


def render_markdown(result: dict[str, Any]) -> str:
    models = result["models"]
    lines = [
        "# Patient-level evaluation",
        "",
        f"{result['n_patients_shared']} patients shared by every model; 95% intervals.",
        "",
        "| model | patients (malignant) | threshold | AUC (bootstrap CI) | AUC (DeLong CI) "
        "| sensitivity | specificity | precision | accuracy | Brier |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in models.items():
        lines.append(
            f"| {name} | {e['n_patients']} ({e['n_malignant']}) | {_fmt(e['threshold'])} "
            f"| {_ci(e['auc'])} | {_ci(e['auc_delong'])} | {_ci(e['sensitivity'])} "
            f"| {_ci(e['specificity'])} | {_ci(e['precision'])} | {_ci(e['accuracy'])} "
            f"| {_ci(e['brier'])} |"
        )
    ops = {n: e["operating_point"] for n, e in models.items() if "operating_point" in e}
    if ops:
        lines += [
            "",
            "## Operating point (chosen on validation, applied unchanged to test)",
            "",
            "| model | target sensitivity | threshold | validation sensitivity "
            "| validation specificity | test sensitivity | test specificity |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, op in ops.items():
            v, t = op["validation"], op["test"]
            lines.append(
                f"| {name} | {_fmt(op['target_sensitivity'], 2)} | {_fmt(op['threshold'])} "
                f"| {_ci(v['sensitivity'])} | {_ci(v['specificity'])} "
                f"| {_ci(t['sensitivity'])} | {_ci(t['specificity'])} |"
            )
    if result["comparisons"]:
        lines += [
            "",
            "## Paired comparisons (DeLong)",
            "",
            "| a | b | patients | AUC a | AUC b | difference | p |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in result["comparisons"]:
            p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
            lines.append(
                f"| {c['a']} | {c['b']} | {c['n_patients']} | {_fmt(c['auc_a'])} "
                f"| {_fmt(c['auc_b'])} | {_fmt(c['difference'])} | {p} |"
            )
    lines += ["", "## Method", ""]
    lines += [f"- **{k}**: {v}" for k, v in result["method"].items()]
    if result["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines) + "\n"


def plot_reliability(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Reliability diagram (mean predicted score vs observed malignant fraction per bin)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for name, e in result["models"].items():
        r = e["reliability"]
        brier = _fmt(e["brier"]["value"])
        ax.plot(
            r["mean_predicted"], r["fraction_positive"], marker="o", label=f"{name} (Brier {brier})"
        )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="mean predicted malignancy score",
        ylabel="observed fraction malignant",
        title="Reliability (patients, 10 bins)",
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    # A fixed metadata dict keeps the PNG free of a creation date (stable bytes).
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def write_outputs(
    result: dict[str, Any], scores: pd.DataFrame, out_dir: str | os.PathLike
) -> dict[str, Path]:
    out = ensure_dir(out_dir)
    return {
        "metrics.json": atomic_write_json(out / "metrics.json", result),
        "metrics.md": atomic_write_text(out / "metrics.md", render_markdown(result)),
        "reliability.png": plot_reliability(result, out / "reliability.png"),
        "patient_scores.csv": atomic_write_text(
            out / "patient_scores.csv", scores.to_csv(index=False, float_format="%.6g")
        ),
    }


# --------------------------------------------------------------------------------------------
# Command
# --------------------------------------------------------------------------------------------


@click.command("evaluate")
@click.argument("predictions", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for metrics.json, metrics.md, reliability.png, patient_scores.csv.",
)
@click.option(
    "--threshold",
    default=0.5,
    show_default=True,
    type=float,
    help="Fixed decision threshold (score >= threshold → malignant).",
)
@click.option(
    "--target-sensitivity",
    type=float,
    default=None,
    help="Choose the threshold reaching this sensitivity on --threshold-from.",
)
@click.option(
    "--threshold-from",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Validation predictions CSV the operating point is chosen on.",
)
@click.option("--bootstrap", default=2000, show_default=True, type=int, help="Resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
def evaluate_command(
    predictions: Path,
    out: Path,
    threshold: float,
    target_sensitivity: float | None,
    threshold_from: Path | None,
    bootstrap: int,
    seed: int,
) -> None:
    """Patient-level metrics with 95% CIs and paired DeLong tests for PREDICTIONS.csv."""
    if target_sensitivity is not None and threshold_from is None:
        raise UserError(
            "--target-sensitivity needs --threshold-from VALIDATION.csv: the threshold "
            "must be chosen on validation patients, never on the test patients"
        )
    if threshold_from is not None and target_sensitivity is None:
        raise UserError("--threshold-from needs --target-sensitivity")
    pred_df = _read(predictions)
    val_df = _read(threshold_from) if threshold_from is not None else None
    result, scores = evaluate_predictions(
        pred_df,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        validation=val_df,
        n_boot=bootstrap,
        seed=seed,
        source=str(predictions),
        validation_source=str(threshold_from) if threshold_from else "validation",
    )
    result["inputs"] = {
        "predictions": str(predictions),
        "predictions_sha256": sha256_file(predictions),
        "validation": str(threshold_from) if threshold_from else None,
        "validation_sha256": sha256_file(threshold_from) if threshold_from else None,
    }
    write_outputs(result, scores, out)
    for w in result["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for name, e in result["models"].items():
        click.echo(
            f"{name}: AUC {_ci(e['auc'])}, sensitivity {_fmt(e['sensitivity']['value'])}, "
            f"specificity {_fmt(e['specificity']['value'])} at threshold {_fmt(e['threshold'])} "
            f"({e['n_patients']} patients)"
        )
    for c in result["comparisons"]:
        p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
        click.echo(f"{c['a']} vs {c['b']}: AUC {_fmt(c['auc_a'])} vs {_fmt(c['auc_b'])}, p = {p}")
    click.echo(f"wrote {out / 'metrics.json'}, metrics.md, reliability.png")


def _read(path: Path) -> pd.DataFrame:
    """Read a predictions CSV without validating (evaluate_predictions validates)."""
    return read_csv_table(path, what="predictions file", str_columns=("patient_id", "model"))
