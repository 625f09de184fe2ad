"""The report's text and table sections (cohort, splits, ROIs, CV tables, holdout, operating
point, configurations). Each takes ``ReportInputs`` and returns inner HTML; everything from
data goes through ``table.esc``. Figure sections live in ``report.figsections``.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from breastfusion import runs
from breastfusion.report import cv as CV
from breastfusion.report import holdout as H
from breastfusion.report import table as T
from breastfusion.report.inputs import ReportInputs
from breastfusion.report.table import esc


def missing(what: str) -> str:
    return f'<p class="missing">Not run: {esc(what)}</p>'


def _labels(manifest: pd.DataFrame) -> pd.Series:
    if "y" in manifest.columns:
        return pd.to_numeric(manifest["y"], errors="coerce")
    return manifest["label"].astype(str).str.strip().str.lower().map({"malignant": 1, "benign": 0})


def cohort_counts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: label ``y`` and modalities ``mods`` (e.g. ``DM+US``)."""
    df = df.assign(
        patient_id=df["patient_id"].astype(str),
        modality=df["modality"].astype(str).str.upper(),
        y=_labels(df),
    )
    return df.groupby("patient_id").agg(
        y=("y", "first"), mods=("modality", lambda m: "+".join(sorted(set(m))))
    )


def section_cohort(inp: ReportInputs) -> str:
    df = inp.manifest
    if df is None:
        return missing("no manifest (stage 01_data has not finished)")
    need = [c for c in ("patient_id", "modality") if c not in df.columns]
    if need or ("y" not in df.columns and "label" not in df.columns):
        return missing(f"the manifest lacks column(s) {', '.join(need or ['label'])}")
    patients = cohort_counts(df)
    n_pat, n_mal = len(patients), int((patients["y"] == 1).sum())
    rows = [["patients", n_pat, n_mal, n_pat - n_mal]]
    mods = df["modality"].astype(str).str.upper()
    y = _labels(df)
    for mod in sorted(mods.unique()):
        k = int((y[mods == mod] == 1).sum())
        rows.append([f"{mod} images", int((mods == mod).sum()), k, int((mods == mod).sum()) - k])
    for combo, label in (
        ("DM+US", "patients with DM and US"),
        ("DM", "patients with DM only"),
        ("US", "patients with US only"),
    ):
        sub = patients[patients["mods"] == combo]
        k = int((sub["y"] == 1).sum())
        rows.append([label, len(sub), k, len(sub) - k])
    note = ""
    single = int((patients["mods"] != "DM+US").sum())
    if single:
        note = (
            f"<p>{single} patient(s) have only one modality; fusion models cannot score them "
            "and single-modal models can.</p>"
        )
    source = f"<p>Data: {esc(inp.data_source)}</p>" if inp.data_source else ""
    table = T.make("", ["", "total", "malignant", "benign"], rows)
    return source + T.to_html(table, title=False) + note


def section_splits(inp: ReportInputs) -> str:
    sp = inp.splits
    if sp is None:
        return missing("no splits (stage 02_splits has not finished)")
    try:
        folds = sp["folds"]
        rows = [
            [f"fold {i} (validation)", f["n_val"], f["n_val_malignant"], f["n_val_benign"]]
            for i, f in enumerate(folds)
        ]
        rows.append(
            ["holdout (test)", sp["n_holdout"], sp["n_holdout_malignant"], sp["n_holdout_benign"]]
        )
        rows.append(["total", sp["n_patients"], sp["n_malignant"], sp["n_benign"]])
    except (KeyError, TypeError) as exc:
        return missing(f"splits.json lacks {exc}")
    info = (
        f"<p>{len(folds)} patient-level folds over {esc(sp.get('n_development', '?'))} "
        f"development patients and a holdout of {esc(sp['n_holdout'])} patients "
        f"(fraction {esc(sp.get('holdout_fraction', '?'))}), stratified by label, seed "
        f"{esc(sp.get('seed', '?'))}. Every image of a patient is in one place only.</p>"
    )
    table = T.make("", ["set", "patients", "malignant", "benign"], rows)
    return info + T.to_html(table, title=False)


def _share(v: Any) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}%"


def section_roi(inp: ReportInputs) -> str:
    roi = inp.roi
    if roi is None:
        return missing("no ROI stage (stage 03_roi has not finished)")
    if roi.get("mode") == "none":
        return "<p>ROI cropping was switched off (roi.mode none): US images are used whole.</p>"
    det = roi.get("detector_metrics") or {}
    s = roi.get("summary") or {}
    counts = s.get("counts") or {}
    rows = [
        ["mode", roi.get("mode") or "?"],
        ["detector mAP50 (held-out development images)", T.f3(det.get("mAP50"))],
        ["detector mAP50-95", T.f3(det.get("mAP50-95"))],
        ["US images", s.get("n_us", "n/a")],
        *[[f"ROI source: {k}", v] for k, v in counts.items()],
        ["no-detection (fallback) share", _share(s.get("fallback_share"))],
        ["mean detection confidence", T.f3(s.get("mean_confidence"))],
    ]
    iou = s.get("iou_vs_manifest_boxes") or {}
    if iou.get("n"):
        rows.append(
            [
                "IoU vs manifest boxes",
                f"mean {T.f3(iou.get('mean'))}, {_share(iou.get('share_ge_0.5'))} >= 0.5 over "
                f"{iou['n']} detections, {iou.get('missed', 0)} missed",
            ]
        )
    warnings = "".join(f'<p class="warn">{esc(w)}</p>' for w in s.get("warnings") or [])
    if not s:
        warnings += '<p class="note">No roi_summary.json: per-source counts unknown.</p>'
    return T.to_html(T.make("", ["", "value"], rows), title=False) + warnings


def section_backbones(inp: ReportInputs) -> str:
    agg = inp.aggregate
    if agg is None:
        return missing("no aggregation (stage 07_aggregate / `breastfusion aggregate`)")
    parts = [
        T.to_html(CV.metrics_table(agg, name), title=True)
        for name in ("table1_dm_backbones", "table2_us_backbones", "fusion_backbones")
    ]
    method = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in agg.method.items())
    return (
        "".join(parts)
        + f'<details><summary>Method</summary><ul class="note">{method}</ul></details>'
    )


def section_modalities(inp: ReportInputs) -> str:
    parts = ["<h3>Holdout (test cohort, touched once)</h3>"]
    hm = inp.holdout_metrics
    if hm is None:
        parts.append(missing("no holdout evaluation (stage 08_final: metrics.json)"))
    else:
        parts.append(T.to_html(H.metrics_table(hm), title=False))
        if hm.get("comparisons"):
            parts.append(T.to_html(H.comparisons_table(hm["comparisons"]), title=False))
    agg = inp.aggregate
    if agg is None:
        parts.append(missing("no aggregation"))
    else:
        parts.append(T.to_html(CV.metrics_table(agg, "table3_modalities")))
        parts.append(T.to_html(CV.comparisons_table(agg), title=False))
    return "".join(parts)


def section_operating_point(inp: ReportInputs) -> str:
    hm = inp.holdout_metrics
    if hm is None:
        return missing("no holdout evaluation")
    op = H.operating_table(hm)
    if op is not None:
        return T.to_html(op, title=False)
    models = hm.get("models") or {}
    if not models:
        return missing("the holdout metrics list no model")
    rows = [
        [
            name,
            T.small(e.get("threshold")),
            e.get("threshold_source") or "",
            T.interval(e.get("sensitivity"), percent=True),
            T.interval(e.get("specificity"), percent=True),
        ]
        for name, e in models.items()
    ]
    table = T.make(
        "",
        ["model", "threshold", "how chosen", "test sensitivity %", "test specificity %"],
        rows,
        notes=["No target sensitivity: a fixed threshold was used."],
        kind="metrics",
    )
    return T.to_html(table, title=False)


def section_configs(inp: ReportInputs) -> str:
    parts = []
    agg = inp.aggregate
    if agg is not None and agg.best:
        b = agg.best
        shown = b.get("config", {})
        if inp.root is not None:  # data paths relative to the study folder, as files store them
            shown = runs.portable(shown, inp.root)
        parts.append(
            f"<h3>Best configuration: <code>{esc(b.get('search'))}/{esc(b.get('trial'))}</code>"
            f"</h3><p><b>Rule:</b> {esc(b.get('rule') or agg.rule)} (chosen from "
            f"{esc(b.get('selected_from', 'the given searches'))}).</p>"
            f"<pre>{esc(json.dumps(shown, indent=2, sort_keys=True))}</pre>"
        )
    for name, cfg in inp.configs.items():
        text = cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2, sort_keys=True)
        parts.append(f"<h3>{esc(name)}</h3><pre>{esc(text)}</pre>")
    if not parts:
        return missing("no configuration found")
    return "".join(parts)
