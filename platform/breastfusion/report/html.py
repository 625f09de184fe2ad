"""``breastfusion report``: one self-contained HTML page for a study.

Every figure is a base64 PNG inside ``index.html``, so the page can be mailed or archived as
one file. The page is built from a typed ``ReportInputs``; every section is optional and a
missing one says "not run" instead of failing, so a half-finished study still gets a report.
Everything that comes from data (model names, trial names, patient ids, config values,
captions) is HTML-escaped.

Study folder layout that ``discover_inputs`` (and so ``breastfusion report STUDY_DIR``)
reads — every entry optional::

    STUDY_DIR/
      data/manifest.csv   (or manifest.csv)       cohort summary
      splits.json         (or data/splits.json)   split summary
      study.yaml                                  printed verbatim under "Exact configs"
      aggregate/aggregate.json                    `breastfusion aggregate --out STUDY_DIR/aggregate`:
                                                  backbone and modality tables, fold plot,
                                                  best configuration
      aggregate/oof_best.csv                      out-of-fold ROC / calibration (model, patient_id,
                                                  y_true, y_score)
      search_*/                                   aggregated on the fly (in a temporary folder)
                                                  when aggregate/aggregate.json is absent
      final/metrics.json                          holdout metrics (`breastfusion evaluate` format)
      final/predictions_holdout.csv               holdout predictions (model, patient_id, y_true,
                                                  y_score; several rows per patient are averaged)
      final/config.yaml                           the final model's resolved config
      final/gradcam/*.png                         Grad-CAM overlays; captions from
                                                  final/gradcam/captions.json ({file name:
                                                  caption}) or else the file name

Output: ``STUDY_DIR/report/index.html`` (written atomically).
"""

from __future__ import annotations

import html
import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np
import pandas as pd

from breastfusion.errors import UserError
from breastfusion.evaluate import metrics as M
from breastfusion.io import atomic_write_text
from breastfusion.report import figures as F

if TYPE_CHECKING:
    from breastfusion.evaluate.aggregate import AggregateResult

log = logging.getLogger(__name__)

MAX_GRADCAM_PX = 768  # larger overlays are downscaled before embedding (page size)
MAX_FOLD_ROWS = 30  # the fold plot shows the best configurations only

REPORT_DIR = "report"
REPORT_FILE = "index.html"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcamImage:
    """One Grad-CAM overlay (a PNG/JPEG file) and its caption."""

    path: Path
    caption: str = ""


@dataclass
class ReportInputs:
    """Everything the report can show; ``None`` / empty means "not run" for that section.

    * ``manifest``: the cohort table (``load_manifest`` output, or the raw CSV with
      ``patient_id, modality, label``).
    * ``splits``: the splits JSON as a dict (``data.splits.make_splits`` format).
    * ``aggregate``: ``aggregate.json`` as a dict (or an ``AggregateResult``).
    * ``oof_predictions``: ``model, patient_id, y_true, y_score`` of the best configurations,
      out-of-fold (``aggregate/oof_best.csv``).
    * ``holdout_predictions``: the same columns on the holdout patients.
    * ``holdout_metrics``: ``metrics.json`` of ``breastfusion evaluate`` on the holdout.
    * ``configs``: name → a config dict (shown as JSON) or text (shown verbatim).
    * ``problems``: section id → why its input could not be read (shown in that section).
    """

    title: str = "breastfusion study report"
    manifest: pd.DataFrame | None = None
    splits: dict[str, Any] | None = None
    aggregate: dict[str, Any] | AggregateResult | None = None
    oof_predictions: pd.DataFrame | None = None
    holdout_predictions: pd.DataFrame | None = None
    holdout_metrics: dict[str, Any] | None = None
    gradcam: list[GradcamImage] = field(default_factory=list)
    configs: dict[str, dict[str, Any] | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)
    n_boot: int = 1000
    seed: int = 0
    sources: dict[str, str] = field(default_factory=dict)  # what was read from where


# --------------------------------------------------------------------------------------------
# Small HTML helpers (everything from data goes through esc)
# --------------------------------------------------------------------------------------------


class Markup(str):
    """Already-safe HTML (built here from escaped parts)."""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _ci(d: Any, pct: bool = False) -> Markup:
    """``{"value", "ci_low", "ci_high"}`` → the value with its interval on a second line."""
    if not isinstance(d, dict) or d.get("value") is None:
        return Markup("n/a")
    k = 100.0 if pct else 1.0
    digits = 1 if pct else 3
    v, lo, hi = d.get("value"), d.get("ci_low"), d.get("ci_high")
    text = esc(_num(v * k, digits))
    if lo is not None and hi is not None:
        text += (
            f'<br><span class="ci">{esc(_num(lo * k, digits))}–{esc(_num(hi * k, digits))}</span>'
        )
    return Markup(text)


def table(header: list[str], rows: list[list[Any]], *, cls: str = "") -> str:
    """An HTML table; cells are escaped unless given as ``Markup``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, Markup) else esc(c)}</td>" for c in r) + "</tr>"
        for r in rows
    )
    return (
        f'<div class="tablewrap"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _missing(what: str) -> str:
    return f'<p class="missing">Not run: {esc(what)}</p>'


def _figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{F.data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


# --------------------------------------------------------------------------------------------
# Sections: each returns the inner HTML; failures inside one never break the page
# --------------------------------------------------------------------------------------------


def _labels(manifest: pd.DataFrame) -> pd.Series:
    if "y" in manifest.columns:
        return pd.to_numeric(manifest["y"], errors="coerce")
    return manifest["label"].astype(str).str.strip().str.lower().map({"malignant": 1, "benign": 0})


def section_cohort(inp: ReportInputs) -> str:
    df = inp.manifest
    if df is None:
        return _missing("no manifest (expected data/manifest.csv)")
    need = [c for c in ("patient_id", "modality") if c not in df.columns]
    if need or ("y" not in df.columns and "label" not in df.columns):
        return _missing(f"the manifest lacks column(s) {', '.join(need or ['label'])}")
    df = df.assign(
        patient_id=df["patient_id"].astype(str),
        modality=df["modality"].astype(str).str.upper(),
        y=_labels(df),
    )
    patients = df.groupby("patient_id").agg(
        y=("y", "first"), mods=("modality", lambda m: "+".join(sorted(set(m))))
    )
    n_pat, n_mal = len(patients), int((patients["y"] == 1).sum())
    rows = [["patients", n_pat, n_mal, n_pat - n_mal]]
    for mod in sorted(df["modality"].unique()):
        sub = df[df["modality"] == mod]
        k = int((sub["y"] == 1).sum())
        rows.append([f"{mod} images", len(sub), k, len(sub) - k])
    for combo, label in (
        ("DM+US", "patients with DM and US"),
        ("DM", "patients with DM only"),
        ("US", "patients with US only"),
    ):
        sub = patients[patients["mods"] == combo]
        k = int((sub["y"] == 1).sum())
        rows.append([f"{label}", len(sub), k, len(sub) - k])
    note = ""
    single = int((patients["mods"] != "DM+US").sum())
    if single:
        note = (
            f"<p>{single} patient(s) have only one modality; fusion models cannot score them "
            "and single-modal models can.</p>"
        )
    return table(["", "total", "malignant", "benign"], rows) + note


def section_splits(inp: ReportInputs) -> str:
    sp = inp.splits
    if sp is None:
        return _missing("no splits.json")
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
        return _missing(f"splits.json lacks {exc}")
    info = (
        f"<p>{len(folds)} patient-level folds over {esc(sp.get('n_development', '?'))} "
        f"development patients and a holdout of {esc(sp['n_holdout'])} patients "
        f"(fraction {esc(sp.get('holdout_fraction', '?'))}), stratified by label, seed "
        f"{esc(sp.get('seed', '?'))}. Every image of a patient is in one place only.</p>"
    )
    return info + table(["set", "patients", "malignant", "benign"], rows)


_METRIC_HEADER = [
    "model",
    "AUC mean ± SD (folds)",
    "pooled OOF AUC (95% CI)",
    "sensitivity %",
    "specificity %",
    "precision %",
    "accuracy %",
    "patients (malignant)",
    "configuration",
]


def _iv(r: dict[str, Any], key: str) -> dict[str, Any]:
    return {
        "value": r.get(key),
        "ci_low": r.get(f"{key}_ci_low"),
        "ci_high": r.get(f"{key}_ci_high"),
    }


def _agg_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in records:
        rows.append(
            [
                r.get("model"),
                Markup(
                    f"{esc(_num(r.get('mean_auc')))}<br>"
                    f'<span class="ci">± {esc(_num(r.get("std_auc")))}</span>'
                ),
                _ci(_iv(r, "pooled_auc")),
                _ci(_iv(r, "sensitivity"), pct=True),
                _ci(_iv(r, "specificity"), pct=True),
                _ci(_iv(r, "precision"), pct=True),
                _ci(_iv(r, "accuracy"), pct=True),
                f"{r.get('n_patients')} ({r.get('n_malignant')})",
                Markup(f"<code>{esc(r.get('search'))}/{esc(r.get('trial'))}</code>"),
            ]
        )
    return rows


def _threshold_note(records: list[dict[str, Any]]) -> str:
    thr = next((r.get("threshold") for r in records if r.get("threshold") is not None), 0.5)
    return (
        f'<p class="note">Cross-validation: AUC mean ± SD over the folds\' validation patients; '
        f"pooled out-of-fold AUC with a stratified patient bootstrap 95% CI; proportions at "
        f"threshold {esc(thr)} on the pooled out-of-fold scores with Wilson 95% CIs. These "
        "numbers also chose the configurations, so they are optimistic for the chosen ones.</p>"
    )


def section_backbones(inp: ReportInputs) -> str:
    agg = inp.aggregate
    if agg is None:
        return _missing("no aggregate (run `breastfusion aggregate`)")
    tables = agg.get("tables", {})
    parts = []
    for key, title in (
        ("table1_dm_backbones", "Table 1 — DM only, by backbone"),
        ("table2_us_backbones", "Table 2 — US only, by backbone"),
        ("fusion_backbones", "DM+US fusion, by backbone pair"),
    ):
        records = tables.get(key) or []
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(
            table(_METRIC_HEADER, _agg_rows(records), cls="metrics")
            if records
            else _missing("no complete trial of this kind")
        )
    return "".join(parts) + _threshold_note(tables.get("table1_dm_backbones") or [])


def _holdout_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, e in (metrics.get("models") or {}).items():
        rows.append(
            [
                name,
                _ci(e.get("auc")),
                _ci(e.get("auc_delong")),
                _ci(e.get("sensitivity"), pct=True),
                _ci(e.get("specificity"), pct=True),
                _ci(e.get("precision"), pct=True),
                _ci(e.get("accuracy"), pct=True),
                _num(e.get("threshold")),
                f"{e.get('n_patients')} ({e.get('n_malignant')})",
            ]
        )
    return rows


def _comparison_rows(comps: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for c in comps:
        p = c.get("p_value")
        rows.append(
            [
                c.get("a"),
                c.get("b"),
                c.get("n_patients"),
                _num(c.get("auc_a")),
                _num(c.get("auc_b")),
                _num(c.get("difference")),
                "n/a" if p is None or not math.isfinite(p) else f"{p:.3g}",
            ]
        )
    return rows


_CMP_HEADER = ["a", "b", "patients", "AUC a", "AUC b", "difference", "p (paired DeLong)"]


def section_modalities(inp: ReportInputs) -> str:
    parts = ["<h3>Holdout (test cohort, touched once)</h3>"]
    hm = inp.holdout_metrics
    if hm is None:
        parts.append(_missing("no holdout evaluation (final/metrics.json)"))
    else:
        parts.append(
            table(
                [
                    "model",
                    "AUC (bootstrap 95% CI)",
                    "AUC (DeLong 95% CI)",
                    "sensitivity %",
                    "specificity %",
                    "precision %",
                    "accuracy %",
                    "threshold",
                    "patients (malignant)",
                ],
                _holdout_rows(hm),
                cls="metrics",
            )
        )
        if hm.get("comparisons"):
            parts.append(table(_CMP_HEADER, _comparison_rows(hm["comparisons"])))
        parts.append(
            '<p class="note">Patient-level; AUC CI by stratified patient bootstrap (and by '
            "DeLong); proportions with Wilson 95% CIs.</p>"
        )
    parts.append("<h3>Table 3 — cross-validation: best configuration of each modality</h3>")
    agg = inp.aggregate
    if agg is None:
        parts.append(_missing("no aggregate"))
    else:
        records = agg.get("tables", {}).get("table3_modalities") or []
        parts.append(table(_METRIC_HEADER, _agg_rows(records), cls="metrics"))
        if agg.get("comparisons"):
            parts.append(table(_CMP_HEADER, _comparison_rows(agg["comparisons"])))
        parts.append(_threshold_note(records))
    return "".join(parts)


def _patients(df: pd.DataFrame, source: str) -> dict[str, pd.DataFrame]:
    """Model → one row per patient (validated; image-pair rows averaged)."""
    scores = M.patient_scores(M.validate_predictions(df, source), source)
    groups = {m: g.sort_values("patient_id") for m, g in scores.groupby("model", sort=False)}
    # The study's order (DM only, US only, DM+US) first, then any other model by name.
    known = ["DM only", "US only", "DM+US"]
    order = sorted(groups, key=lambda m: (known.index(m) if m in known else len(known), m))
    return {m: groups[m] for m in order}


def _prediction_sets(inp: ReportInputs) -> list[tuple[str, dict[str, pd.DataFrame]]]:
    sets = []
    if inp.holdout_predictions is not None:
        sets.append(("holdout", _patients(inp.holdout_predictions, "holdout predictions")))
    if inp.oof_predictions is not None:
        sets.append(("out-of-fold", _patients(inp.oof_predictions, "out-of-fold predictions")))
    return sets


def _both_classes(g: pd.DataFrame) -> bool:
    return g["y_true"].nunique() == 2


def _reported_auc_cis(inp: ReportInputs, which: str) -> dict[str, tuple[float, float, float]]:
    """The AUC intervals the tables report, so the ROC legend repeats the same numbers."""
    out: dict[str, tuple[float, float, float]] = {}
    if which == "holdout":
        for m, e in ((inp.holdout_metrics or {}).get("models") or {}).items():
            a = e.get("auc") or {}
            if None not in (a.get("value"), a.get("ci_low"), a.get("ci_high")):
                out[m] = (a["value"], a["ci_low"], a["ci_high"])
    else:
        labels = {"dm": "DM only", "us": "US only", "fusion": "DM+US"}
        for key, b in ((inp.aggregate or {}).get("best_by_modality") or {}).items():
            a = (b.get("pooled_oof") or {}).get("auc") or {}
            if key in labels and None not in (a.get("value"), a.get("ci_low"), a.get("ci_high")):
                out[labels[key]] = (a["value"], a["ci_low"], a["ci_high"])
    return out


def section_roc(inp: ReportInputs) -> str:
    sets = _prediction_sets(inp)
    if not sets:
        return _missing("no predictions (final/predictions_holdout.csv or aggregate/oof_best.csv)")
    parts = []
    for name, models in sets:
        bands = {
            m: F.roc_band(
                g["y_true"].to_numpy(), g["y_score"].to_numpy(), n_boot=inp.n_boot, seed=inp.seed
            )
            for m, g in models.items()
            if _both_classes(g)
        }
        if not bands:
            parts.append(_missing(f"{name}: a class is missing"))
            continue
        reported = _reported_auc_cis(inp, "holdout" if name == "holdout" else "oof")
        parts.append(
            _figure(
                F.roc_figure(bands, f"ROC, {name} patients", auc_labels=reported),
                f"ROC curves ({name})",
                f"ROC curves of the {name} patients; shaded: pointwise 95% band of sensitivity "
                f"over 1 − specificity from {inp.n_boot} stratified patient bootstrap resamples; "
                "AUC intervals in the legend as in the tables.",
            )
        )
    return '<div class="figrow">' + "".join(parts) + "</div>"


def _thresholds(inp: ReportInputs) -> dict[str, float]:
    models = (inp.holdout_metrics or {}).get("models") or {}
    return {m: float(e["threshold"]) for m, e in models.items() if e.get("threshold") is not None}


def section_confusion(inp: ReportInputs) -> str:
    sets = _prediction_sets(inp)
    if not sets:
        return _missing("no predictions")
    thresholds = _thresholds(inp)
    parts = []
    for name, models in sets:
        mats = {}
        for m, g in models.items():
            thr = thresholds.get(m, 0.5) if name == "holdout" else 0.5
            bm = M.binary_metrics(g["y_true"].to_numpy(), g["y_score"].to_numpy(), thr)
            mats[m] = {"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn, "threshold": thr}
        parts.append(
            _figure(
                F.confusion_figure(mats, f"{name} patients, rows normalised"),
                f"confusion matrices ({name})",
                "Rows: true class, normalised to 1 (counts in brackets).",
            )
        )
    return "".join(parts)


def section_folds(inp: ReportInputs) -> str:
    agg = inp.aggregate
    if agg is None:
        return _missing("no aggregate")
    trials = [t for t in agg.get("trials", []) if t.get("status") == "complete"]
    if not trials:
        return _missing("no complete trial")
    trials.sort(key=lambda t: -(t.get("mean_auc") or 0.0))
    shown = trials[:MAX_FOLD_ROWS]
    rows = [
        {
            "label": _short(f"{t['search']}/{t['trial']}", 56),
            "fold_aucs": t.get("fold_aucs") or {},
            "mean_auc": t.get("mean_auc"),
            "std_auc": t.get("std_auc"),
        }
        for t in shown
    ]
    more = (
        f" The best {len(shown)} of {len(trials)} complete configurations are shown."
        if len(trials) > len(shown)
        else ""
    )
    return _figure(
        F.fold_figure(rows, "Validation AUC per fold and configuration"),
        "fold comparison",
        "Dots: each fold's patient-level validation AUC; bar: mean ± SD." + more,
    )


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def section_operating_point(inp: ReportInputs) -> str:
    hm = inp.holdout_metrics
    if hm is None:
        return _missing("no holdout evaluation")
    models = hm.get("models") or {}
    rows = []
    for name, e in models.items():
        op = e.get("operating_point")
        if op:
            v, t = op.get("validation", {}), op.get("test", {})
            rows.append(
                [
                    name,
                    _num(op.get("target_sensitivity"), 2),
                    _num(op.get("threshold")),
                    _ci(v.get("sensitivity"), pct=True),
                    _ci(v.get("specificity"), pct=True),
                    _ci(t.get("sensitivity"), pct=True),
                    _ci(t.get("specificity"), pct=True),
                ]
            )
        else:
            rows.append(
                [
                    name,
                    "— (fixed threshold)",
                    _num(e.get("threshold")),
                    "n/a",
                    "n/a",
                    _ci(e.get("sensitivity"), pct=True),
                    _ci(e.get("specificity"), pct=True),
                ]
            )
    if not rows:
        return _missing("the holdout metrics list no model")
    header = [
        "model",
        "target sensitivity",
        "threshold",
        "validation sensitivity %",
        "validation specificity %",
        "test sensitivity %",
        "test specificity %",
    ]
    return table(header, rows, cls="metrics") + (
        '<p class="note">A threshold is chosen on validation patients to reach the target '
        "sensitivity (missed cancers cost most in screening) and applied unchanged to the "
        "test patients.</p>"
    )


def section_calibration(inp: ReportInputs) -> str:
    sets = _prediction_sets(inp)
    if not sets:
        return _missing("no predictions")
    name, models = sets[0]  # the holdout when there is one
    curves = {}
    for m, g in models.items():
        y, s = g["y_true"].to_numpy(), g["y_score"].to_numpy()
        curve = M.reliability_curve(y, s).as_dict()
        curves[m] = {**curve, "brier": M.brier_score(y, s)}
    return _figure(
        F.calibration_figure(curves, f"Reliability, {name} patients"),
        "calibration plot",
        "Mean predicted score against the observed malignant fraction in 10 equal-width bins "
        "(marker area ∝ patients); Brier score in the legend.",
    )


def _image_bytes(path: Path) -> tuple[bytes, str]:
    """The image as PNG bytes, downscaled when large (keeps the page small)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if max(im.size) <= MAX_GRADCAM_PX and im.format == "PNG":
            return path.read_bytes(), "image/png"
        im = im.convert("RGB") if im.mode not in ("RGB", "L", "RGBA") else im
        im.thumbnail((MAX_GRADCAM_PX, MAX_GRADCAM_PX))
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


def section_gradcam(inp: ReportInputs) -> str:
    if not inp.gradcam:
        return _missing("no Grad-CAM images (final/gradcam/*.png)")
    cells = []
    for item in inp.gradcam:
        try:
            data, mime = _image_bytes(Path(item.path))
        except (OSError, ValueError) as exc:
            cells.append(
                f'<figure class="broken"><figcaption>{esc(item.path)}: {esc(exc)}</figcaption></figure>'
            )
            continue
        caption = item.caption or Path(item.path).stem
        cells.append(
            f'<figure><img src="{F.data_uri(data, mime)}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    return '<div class="gallery">' + "".join(cells) + "</div>"


def section_configs(inp: ReportInputs) -> str:
    parts = []
    agg = inp.aggregate
    if agg is not None and agg.get("best"):
        b = agg["best"]
        parts.append(
            f"<h3>Best configuration: <code>{esc(b.get('search'))}/{esc(b.get('trial'))}</code></h3>"
            f"<p><b>Rule:</b> {esc(b.get('rule') or agg.get('rule'))} (chosen from "
            f"{esc(b.get('selected_from', 'the given searches'))}).</p>"
            f"<pre>{esc(json.dumps(b.get('config', {}), indent=2, sort_keys=True))}</pre>"
        )
    for name, cfg in inp.configs.items():
        text = cfg if isinstance(cfg, str) else json.dumps(cfg, indent=2, sort_keys=True)
        parts.append(f"<h3>{esc(name)}</h3><pre>{esc(text)}</pre>")
    if not parts:
        return _missing("no configuration found")
    return "".join(parts)


SECTIONS: list[tuple[str, str, Callable[[ReportInputs], str]]] = [
    ("cohort", "Cohort summary", section_cohort),
    ("splits", "Split summary", section_splits),
    ("backbones", "Backbone comparison", section_backbones),
    ("modalities", "Modality comparison", section_modalities),
    ("roc", "ROC curves with 95% bands", section_roc),
    ("confusion", "Normalised confusion matrices", section_confusion),
    ("folds", "Fold comparison", section_folds),
    ("operating-point", "Operating point", section_operating_point),
    ("calibration", "Calibration", section_calibration),
    ("gradcam", "Grad-CAM gallery", section_gradcam),
    ("configs", "Exact configurations", section_configs),
]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
 max-width:1180px;padding:0 24px 48px;color:#1d2430;line-height:1.45}
header{border-bottom:2px solid #2b6cb0;margin-bottom:8px}
h1{font-size:1.6em;margin:24px 0 4px}h2{font-size:1.25em;margin-top:36px;
 border-bottom:1px solid #d5dbe3;padding-bottom:4px}h3{font-size:1.02em;margin:18px 0 6px}
nav ol{columns:3;font-size:.92em;padding-left:20px}
table{border-collapse:collapse;margin:8px 0;font-size:.86em}
th,td{border:1px solid #d5dbe3;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#edf2f7}tbody tr:nth-child(even){background:#f8fafc}
.tablewrap{overflow-x:auto;max-width:100%}
table.metrics td{white-space:nowrap}table.metrics td:first-child,table.metrics td:last-child{white-space:normal}
td code{word-break:break-all;font-size:.92em}table.metrics td:last-child{min-width:180px}
.missing{color:#8a6d3b;background:#fcf8e3;border:1px solid #f0e1a1;padding:6px 10px;
 border-radius:4px;display:inline-block}
.problem{color:#a94442;background:#f2dede;border:1px solid #e4b9b9;padding:6px 10px;
 border-radius:4px}
.note{font-size:.85em;color:#4a5568}
.ci{font-size:.85em;color:#4a5568}
pre{background:#f7fafc;border:1px solid #d5dbe3;padding:10px;font-size:.8em;overflow:auto;
 max-height:480px}
figure{margin:8px 12px 8px 0;display:inline-block;vertical-align:top}
figure img{max-width:100%;border:1px solid #e2e8f0}
figcaption{font-size:.82em;color:#4a5568;max-width:560px}
.figrow figure{max-width:49%}
.gallery figure{width:260px}.gallery img{width:256px}
footer{margin-top:40px;font-size:.8em;color:#718096}
"""


def render_html(inp: ReportInputs) -> str:
    """The whole page as a string (sections that fail show their error instead)."""
    return _render(inp)[0]


def _render(inp: ReportInputs) -> tuple[str, list[str]]:
    """(page, titles of the sections shown as "not run" or failed)."""
    if inp.aggregate is not None and not isinstance(inp.aggregate, dict):
        inp.aggregate = inp.aggregate.to_dict()  # an AggregateResult
    body, not_run = [], []
    for sid, title, fn in SECTIONS:
        content = ""
        if sid in inp.problems:
            content += f'<p class="problem">{esc(inp.problems[sid])}</p>'
        try:
            content += fn(inp)
        except UserError as exc:
            content += f'<p class="problem">Could not draw this section: {esc(exc)}</p>'
        except Exception as exc:  # a report must still render the other sections
            log.exception("report section %s failed", sid)
            content += (
                f'<p class="problem">Could not draw this section '
                f"({esc(type(exc).__name__)}: {esc(exc)})</p>"
            )
        if 'class="missing"' in content or 'class="problem"' in content:
            not_run.append(title)
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{content}</section>')
    toc = "".join(f'<li><a href="#{sid}">{esc(title)}</a></li>' for sid, title, _ in SECTIONS)
    notes = "".join(f"<p>{esc(n)}</p>" for n in inp.notes)
    sources = ""
    if inp.sources:
        listed = "; ".join(
            f"{esc(k)}: <code>{esc(v)}</code>" for k, v in sorted(inp.sources.items())
        )
        sources = f"<p>Inputs: {listed}</p>"
    page = (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(inp.title)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>{esc(inp.title)}</h1>"
        '<p class="note">Patient-level results. Research use only, not for diagnosis.</p>'
        f"{notes}</header><nav><ol>{toc}</ol></nav>{''.join(body)}"
        f"<footer>{sources}Generated by breastfusion.</footer></body></html>\n"
    )
    return page, not_run


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p.exists()), None)


def discover_inputs(study_dir: Path) -> ReportInputs:
    """Fill ``ReportInputs`` from the standard study layout (see the module docstring).

    A file that exists but cannot be read becomes a problem shown in its section.
    """
    study = Path(study_dir)
    if not study.is_dir():
        raise UserError(f"{study}: no such study folder")
    inp = ReportInputs(title=f"breastfusion report — {study.resolve().name}")

    def attempt(section: str, what: str, path: Path, fn: Callable[[Path], Any]) -> Any:
        try:
            value = fn(path)
        except UserError as exc:
            inp.problems[section] = f"{path}: {exc}"
            return None
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            inp.problems[section] = f"{path}: cannot read ({exc})"
            return None
        inp.sources[what] = str(path)
        return value

    def read_csv(path: Path) -> pd.DataFrame:
        return pd.read_csv(path, dtype={"patient_id": str, "model": str})

    def read_json(path: Path) -> dict[str, Any]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        return data

    layout = _layout(study)
    if p := _first_existing(*layout["manifest"]):
        inp.manifest = attempt("cohort", "manifest", p, read_csv)
    if p := _first_existing(*layout["splits"]):
        inp.splits = attempt("splits", "splits", p, read_json)

    agg_dir = layout["aggregate"][0]
    agg_json = agg_dir / "aggregate.json"
    searches = sorted(d for d in study.glob("search_*") if (d / "experiment.json").exists())
    if agg_json.exists():
        inp.aggregate = attempt("backbones", "aggregate", agg_json, read_json)
        if (oof := agg_dir / "oof_best.csv").exists():
            inp.oof_predictions = attempt("roc", "out-of-fold predictions", oof, read_csv)
    elif searches:
        from breastfusion.evaluate.aggregate import aggregate

        with tempfile.TemporaryDirectory(prefix="bf-report-agg-") as tmp:
            try:
                res = aggregate(searches, Path(tmp))
                inp.aggregate = res.to_dict()
                if (Path(tmp) / "oof_best.csv").exists():
                    inp.oof_predictions = read_csv(Path(tmp) / "oof_best.csv")
                inp.notes.append(
                    "No aggregate/ folder: the searches "
                    + ", ".join(d.name for d in searches)
                    + " were aggregated for this report only."
                )
                inp.sources["searches"] = ", ".join(str(d) for d in searches)
            except UserError as exc:
                inp.problems["backbones"] = f"aggregating {', '.join(map(str, searches))}: {exc}"

    final = layout["final"][0]
    if (p := final / "metrics.json").exists():
        inp.holdout_metrics = attempt("modalities", "holdout metrics", p, read_json)
    if (p := final / "predictions_holdout.csv").exists():
        inp.holdout_predictions = attempt("roc", "holdout predictions", p, read_csv)
    gdir = final / "gradcam"
    if gdir.is_dir():
        captions: dict[str, str] = {}
        if (cp := gdir / "captions.json").exists():
            captions = attempt("gradcam", "Grad-CAM captions", cp, read_json) or {}
        inp.gradcam = [
            GradcamImage(path=f, caption=str(captions.get(f.name, f.stem.replace("_", " "))))
            for f in sorted(gdir.iterdir())
            if f.suffix.lower() in (".png", ".jpg", ".jpeg")
        ]
    if p := _first_existing(*layout["study_yaml"]):
        inp.configs[p.name] = p.read_text(encoding="utf-8", errors="replace")
    if (p := final / "config.yaml").exists():
        inp.configs["final/config.yaml"] = p.read_text(encoding="utf-8", errors="replace")
    return inp


LAYOUT_FILE = "layout.json"


def _layout(study: Path) -> dict[str, list[Path]]:
    """Where each input lives: the standard layout, or the paths a study runner recorded in
    ``STUDY_DIR/layout.json`` (keys manifest, splits, aggregate, final, study_yaml)."""
    paths = {
        "manifest": [study / "data" / "manifest.csv", study / "manifest.csv"],
        "splits": [study / "splits.json", study / "data" / "splits.json"],
        "aggregate": [study / "aggregate"],
        "final": [study / "final"],
        "study_yaml": [study / "study.yaml"],
    }
    recorded = study / LAYOUT_FILE
    if recorded.is_file():
        try:
            extra = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            extra = {}
        for key, value in (extra if isinstance(extra, dict) else {}).items():
            if key in paths and isinstance(value, str):
                paths[key] = [Path(value)]
    return paths


def write_report(
    study_dir: Path, inputs: ReportInputs | None = None, *, out: Path | None = None
) -> Path:
    """Write ``STUDY_DIR/report/index.html`` (or ``out``); inputs default to the discovered ones.

    Returns the page's path. Never fails for a missing section; raises ``UserError`` only when
    ``study_dir`` does not exist and no ``inputs`` are given.
    """
    return _write(study_dir, inputs, out)[0]


def _write(
    study_dir: Path, inputs: ReportInputs | None, out: Path | None
) -> tuple[Path, list[str]]:
    study = Path(study_dir)
    inp = inputs if inputs is not None else discover_inputs(study)
    page, not_run = _render(inp)
    target = Path(out) if out is not None else study / REPORT_DIR / REPORT_FILE
    return atomic_write_text(target, page), not_run


@click.command("report")
@click.argument("study_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the page (default: STUDY_DIR/report/index.html).",
)
@click.option("--bootstrap", default=1000, show_default=True, type=int, help="ROC band resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
def report_command(study_dir: Path, out: Path | None, bootstrap: int, seed: int) -> None:
    """Write a self-contained HTML report of the study in STUDY_DIR."""
    if bootstrap < 100:
        raise UserError(f"--bootstrap must be at least 100, got {bootstrap}")
    inp = discover_inputs(study_dir)
    inp.n_boot, inp.seed = bootstrap, seed
    path, not_run = _write(study_dir, inp, out)
    for sid, problem in sorted(inp.problems.items()):
        click.echo(f"warning: {sid}: {problem}", err=True)
    if not_run:
        click.echo(f"sections not run or incomplete: {', '.join(not_run)}")
    click.echo(f"wrote {path}")
