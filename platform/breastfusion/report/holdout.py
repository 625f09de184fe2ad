"""Renderings of an evaluation (``evaluate.holdout.evaluate_predictions``' ``metrics.json``):
its tables (one ``Table`` each, for Markdown and HTML), ``metrics.md`` and the output folder
of ``breastfusion evaluate`` (``write_outputs``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion import runs
from breastfusion.io import atomic_write_json, atomic_write_text, ensure_dir
from breastfusion.report import table as T
from breastfusion.report.table import Table

METRICS_FILE = "metrics.json"


KNOWN = [runs.MODALITY_LABELS[m] for m in runs.MODALITY_ORDER]


def ordered(names: Any) -> list[str]:
    """The study's order (DM only, US only, DM+US) first, then any other model by name."""
    return sorted(names, key=lambda m: (KNOWN.index(m) if m in KNOWN else len(KNOWN), m))


def _models(result: Mapping[str, Any]) -> dict[str, Any]:
    models = dict(result.get("models") or {})
    return {m: models[m] for m in ordered(models)}


def metrics_table(result: Mapping[str, Any], title: str = "Patient-level metrics") -> Table:
    rows = []
    for name, e in _models(result).items():
        cal = e.get("calibration") or {}
        rows.append(
            [
                name,
                f"{e.get('n_patients')} ({e.get('n_malignant')})",
                T.small(e.get("threshold")),
                T.interval(e.get("auc")),
                T.interval(e.get("auc_delong")),
                T.interval(e.get("sensitivity"), percent=True),
                T.interval(e.get("specificity"), percent=True),
                T.interval(e.get("precision"), percent=True),
                T.interval(e.get("accuracy"), percent=True),
                T.interval(e.get("brier")),
                T.Cell(T.small(cal.get("slope")), T.small(cal.get("intercept")), inline=False),
            ]
        )
    scale = (result.get("settings") or {}).get("score_scale_used")
    notes = [
        f"{result.get('n_patients_shared', '?')} patients shared by every model; 95% intervals: "
        "AUC by stratified patient bootstrap and by DeLong, proportions (%) by Wilson. "
        "Calibration: slope (intercept) of the logistic recalibration (ideal 1 and 0)."
    ]
    if scale:
        words = {"logit": "calibrated log-odds", "probability": "probability"}
        notes.append(f"Scores and thresholds are on the {words.get(scale, scale)} scale.")
    return T.make(
        title,
        [
            "model",
            "patients (malignant)",
            "threshold",
            "AUC (bootstrap CI)",
            "AUC (DeLong CI)",
            "sensitivity %",
            "specificity %",
            "precision %",
            "accuracy %",
            "Brier",
            "calibration slope (intercept)",
        ],
        rows,
        notes=notes,
        kind="metrics",
        empty="no model evaluated",
    )


def operating_table(result: Mapping[str, Any]) -> Table | None:
    """The operating point of each model that has one (None when none has)."""
    rows = []
    for name, e in _models(result).items():
        op = e.get("operating_point")
        if not op:
            continue
        v, t = op.get("validation") or {}, op.get("test") or {}
        warn = op.get("warnings") or []
        rows.append(
            [
                name,
                T.small(op.get("target_sensitivity")),
                T.Cell(
                    T.small(op.get("threshold")), f"p = {T.small(op.get('threshold_probability'))}"
                ),
                T.interval(v.get("sensitivity"), percent=True),
                T.interval(v.get("specificity"), percent=True),
                T.interval(t.get("sensitivity"), percent=True),
                T.interval(t.get("specificity"), percent=True),
                T.flagged("; ".join(warn)) if warn else "none",
            ]
        )
    if not rows:
        return None
    return T.make(
        "Operating point (chosen on validation, applied unchanged to test)",
        [
            "model",
            "target sensitivity",
            "threshold",
            "validation sensitivity %",
            "validation specificity %",
            "test sensitivity %",
            "test specificity %",
            "warnings",
        ],
        rows,
        notes=[
            "The threshold is the largest one reaching the target sensitivity on the validation "
            "patients (missed cancers cost most in screening), applied unchanged to the test "
            "patients; p = the threshold as a probability."
        ],
        kind="metrics",
    )


def comparisons_table(
    comparisons: list[Mapping[str, Any]], title: str = "Paired comparisons (DeLong)"
) -> Table:
    rows = [
        [
            c.get("a"),
            c.get("b"),
            c.get("n_patients"),
            T.f3(c.get("auc_a")),
            T.f3(c.get("auc_b")),
            T.f3(c.get("difference")),
            T.small(c.get("p_value")),
        ]
        for c in comparisons
    ]
    return T.make(
        title,
        ["a", "b", "patients", "AUC a", "AUC b", "difference", "p (paired DeLong)"],
        rows,
        empty="Fewer than two models: nothing to compare.",
    )


def render_markdown(result: Mapping[str, Any]) -> str:
    """``metrics.md``: every table of the evaluation, its method and its warnings."""
    parts = ["# Patient-level evaluation\n", T.to_markdown(metrics_table(result, "Metrics"))]
    op = operating_table(result)
    if op is not None:
        parts.append(T.to_markdown(op))
    if result.get("comparisons"):
        parts.append(T.to_markdown(comparisons_table(result["comparisons"])))
    parts.append("## Method\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in _method(result)))
    if result.get("warnings"):
        parts.append("## Warnings\n\n" + "".join(f"- {w}\n" for w in result["warnings"]))
    return "\n".join(parts)


def _method(result: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return list((result.get("method") or {}).items())


def write_outputs(
    result: Mapping[str, Any], scores: pd.DataFrame, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """The output folder of ``breastfusion evaluate``: ``metrics.json`` (full precision),
    ``metrics.md``, ``reliability.png`` and ``patient_scores.csv``."""
    from breastfusion.report.figures import plot_reliability

    out = ensure_dir(out_dir)
    return {
        METRICS_FILE: atomic_write_json(out / METRICS_FILE, dict(result)),
        "metrics.md": atomic_write_text(out / "metrics.md", render_markdown(result)),
        "reliability.png": plot_reliability(result, out / "reliability.png"),
        "patient_scores.csv": atomic_write_text(out / "patient_scores.csv", runs.csv_text(scores)),
    }
