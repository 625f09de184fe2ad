"""The report's figure sections: ROC (one panel per model, operating point marked), confusion
matrices, fold comparison, calibration and the Grad-CAM gallery (raw image beside the
overlay). Thresholds and reliability curves come from the evaluation's ``metrics.json`` and
the aggregation's CV summaries; nothing here re-chooses them.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion.evaluate import metrics as M
from breastfusion.evaluate import scale as SC
from breastfusion.evaluate.calibration import calibration_slope_intercept
from breastfusion.report import figures as F
from breastfusion.report import table as T
from breastfusion.report.holdout import ordered
from breastfusion.report.inputs import ReportInputs
from breastfusion.report.sections import missing
from breastfusion.report.table import esc

MAX_GRADCAM_PX = 768  # larger images are downscaled before embedding (page size)
MAX_FOLD_ROWS = 30  # the fold plot shows the best configurations only


def figure(png: bytes, alt: str, caption: str = "") -> str:
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{F.data_uri(png)}" alt="{esc(alt)}">{cap}</figure>'


def patients(df: pd.DataFrame, source: str) -> dict[str, pd.DataFrame]:
    """Model → one row per patient (validated; image-pair rows averaged)."""
    scores = M.patient_scores(M.validate_predictions(df, source), source)
    groups = {m: g.sort_values("patient_id") for m, g in scores.groupby("model", sort=False)}
    return {m: groups[m] for m in ordered(groups)}


def prediction_sets(inp: ReportInputs) -> list[tuple[str, dict[str, pd.DataFrame]]]:
    sets = []
    if inp.holdout_predictions is not None:
        sets.append(("holdout", patients(inp.holdout_predictions, "holdout predictions")))
    if inp.oof_predictions is not None:
        sets.append(("out-of-fold", patients(inp.oof_predictions, "out-of-fold predictions")))
    return sets


def thresholds(inp: ReportInputs, which: str, models: dict[str, pd.DataFrame]) -> dict[str, float]:
    """The threshold each model is judged at: the holdout evaluation's, or the CV summary's;
    else the scale's default (0.5 probability / 0.0 log-odds)."""
    out: dict[str, float] = {}
    if which == "holdout":
        for m, e in ((inp.holdout_metrics or {}).get("models") or {}).items():
            if e.get("threshold") is not None:
                out[m] = float(e["threshold"])
    elif inp.aggregate is not None:
        for r in inp.aggregate.tables.get("table3_modalities", []):
            cv = inp.aggregate.trial(r.trial).cv
            if cv is not None:
                out[r.label] = cv.threshold
    for m, g in models.items():
        if m not in out:
            out[m] = SC.DEFAULT_THRESHOLD[SC.resolve_scale("auto", g["y_score"].to_numpy())]
    return out


def _reported_aucs(inp: ReportInputs, which: str) -> dict[str, tuple[float, float, float]]:
    """The AUC intervals the tables report, so each ROC panel repeats the same numbers."""
    out: dict[str, tuple[float, float, float]] = {}
    if which == "holdout":
        for m, e in ((inp.holdout_metrics or {}).get("models") or {}).items():
            a = e.get("auc") or {}
            if None not in (a.get("value"), a.get("ci_low"), a.get("ci_high")):
                out[m] = (a["value"], a["ci_low"], a["ci_high"])
    elif inp.aggregate is not None:
        for r in inp.aggregate.tables.get("table3_modalities", []):
            cv = inp.aggregate.trial(r.trial).cv
            if cv is not None:
                p = cv.pooled_auc
                out[r.label] = (p.value, p.ci_low, p.ci_high)
    return out


def section_roc(inp: ReportInputs) -> str:
    sets = prediction_sets(inp)
    if not sets:
        return missing("no predictions (08_final: predictions_holdout.csv; 07_aggregate: oof)")
    parts = []
    for name, models in sets:
        usable = {m: g for m, g in models.items() if g["y_true"].nunique() == 2}
        if not usable:
            parts.append(missing(f"{name}: a class is missing"))
            continue
        thr = thresholds(inp, "holdout" if name == "holdout" else "oof", usable)
        bands, points = {}, {}
        for m, g in usable.items():
            y, s = g["y_true"].to_numpy(), g["y_score"].to_numpy()
            bands[m] = F.roc_band(y, s, n_boot=inp.n_boot, seed=inp.seed)
            bm = M.binary_metrics(y, s, thr[m])
            points[m] = (1 - bm.specificity, bm.sensitivity, f"threshold {T.small(thr[m])}")
        reported = _reported_aucs(inp, "holdout" if name == "holdout" else "oof")
        what = "pooled out-of-fold AUC (secondary)" if name != "holdout" else "holdout AUC"
        parts.append(
            figure(
                F.roc_figure(bands, f"ROC, {name} patients", auc_labels=reported, points=points),
                f"ROC curves ({name})",
                f"ROC of the {name} patients, one panel per model; shaded: pointwise 95% band "
                f"of sensitivity from {inp.n_boot} stratified patient bootstrap resamples; "
                f"circle: the operating point at the reported threshold; panel title: {what} "
                "as in the tables.",
            )
        )
    return "".join(parts)


def section_confusion(inp: ReportInputs) -> str:
    sets = prediction_sets(inp)
    if not sets:
        return missing("no predictions")
    parts = []
    for name, models in sets:
        thr = thresholds(inp, "holdout" if name == "holdout" else "oof", models)
        mats = {}
        for m, g in models.items():
            bm = M.binary_metrics(g["y_true"].to_numpy(), g["y_score"].to_numpy(), thr[m])
            mats[m] = {"tp": bm.tp, "fp": bm.fp, "tn": bm.tn, "fn": bm.fn, "threshold": thr[m]}
        parts.append(
            figure(
                F.confusion_figure(mats, f"{name} patients, rows normalised"),
                f"confusion matrices ({name})",
                "Rows: true class, normalised to 1 (counts in brackets); at each model's "
                "reported threshold.",
            )
        )
    return "".join(parts)


def section_folds(inp: ReportInputs) -> str:
    agg = inp.aggregate
    if agg is None:
        return missing("no aggregation")
    trials = [t for t in agg.trials if t.complete and t.degenerate is None]
    degenerate = sum(t.complete and t.degenerate is not None for t in agg.trials)
    if not trials:
        return missing("no complete, non-degenerate trial")
    trials.sort(key=lambda t: (-t.mean_auc, t.key))
    shown = trials[:MAX_FOLD_ROWS]
    rows = [
        {
            "label": _short(t.key, 56),
            "fold_aucs": {f"fold{k}": v for k, v in sorted(t.fold_aucs.items())},
            "mean_auc": t.mean_auc,
            "std_auc": t.std_auc,
        }
        for t in shown
    ]
    more = (
        f" The best {len(shown)} of {len(trials)} configurations are shown."
        if len(trials) > len(shown)
        else ""
    )
    if degenerate:
        more += f" {degenerate} degenerate configuration(s) are left out."
    return figure(
        F.fold_figure(rows, "Validation AUC per fold and configuration"),
        "fold comparison",
        "Dots: each fold's patient-level validation AUC; bar: mean ± SD." + more,
    )


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _curves(inp: ReportInputs) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """Reliability curves with Brier and slope/intercept: from ``metrics.json`` when it has
    them, else from the holdout predictions (scale auto)."""
    models = (inp.holdout_metrics or {}).get("models") or {}
    if models and all(e.get("reliability") for e in models.values()):
        return "holdout", {
            m: {
                **e["reliability"],
                "brier": (e.get("brier") or {}).get("value"),
                **(e.get("calibration") or {}),
            }
            for m, e in ((k, models[k]) for k in ordered(models))
        }
    sets = prediction_sets(inp)
    if not sets:
        return None
    name, preds = sets[0]
    out = {}
    for m, g in preds.items():
        y, s = g["y_true"].to_numpy(), g["y_score"].to_numpy()
        scale = SC.resolve_scale("auto", s)
        p = SC.as_probability(s, scale)
        slope, intercept = calibration_slope_intercept(y, SC.as_log_odds(s, scale))
        curve = M.reliability_curve(y, p).as_dict()
        out[m] = {**curve, "brier": M.brier_score(y, p), "slope": slope, "intercept": intercept}
    return name, out


def section_calibration(inp: ReportInputs) -> str:
    found = _curves(inp)
    if found is None:
        return missing("no predictions")
    name, curves = found
    rows = [
        [m, T.f3(c.get("brier")), T.small(c.get("slope")), T.small(c.get("intercept"))]
        for m, c in curves.items()
    ]
    table = T.make(
        "",
        ["model", "Brier", "calibration slope", "calibration intercept"],
        rows,
        notes=[
            "Logistic recalibration logit P(malignant) = intercept + slope × calibrated "
            "log-odds (ideal: slope 1, intercept 0); Brier and reliability on probabilities."
        ],
    )
    fig = figure(
        F.calibration_figure(curves, f"Reliability, {name} patients"),
        "calibration plot",
        "Mean predicted probability against the observed malignant fraction in 10 equal-width "
        "bins (marker area ∝ patients).",
    )
    return T.to_html(table, title=False) + fig


def image_bytes(path: Path) -> tuple[bytes, str]:
    """The image as PNG bytes, downscaled when large (keeps the page small)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if max(im.size) <= MAX_GRADCAM_PX and im.format == "PNG":
            return path.read_bytes(), "image/png"
        im = im.convert("RGB") if im.mode not in ("RGB", "L", "RGBA") else im
        im.thumbnail((MAX_GRADCAM_PX, MAX_GRADCAM_PX))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue(), "image/png"


def _img(path: Path, alt: str) -> str:
    try:
        data, mime = image_bytes(Path(path))
    except (OSError, ValueError) as exc:
        return f'<span class="broken">{esc(path)}: {esc(exc)}</span>'
    return f'<img src="{F.data_uri(data, mime)}" alt="{esc(alt)}">'


def section_gradcam(inp: ReportInputs) -> str:
    if not inp.gradcam:
        return missing("no Grad-CAM images (08_final: gradcam/)")
    tiles = []
    for item in inp.gradcam:
        caption = item.caption or Path(item.path).stem
        raw = (
            _img(item.raw, f"raw image: {caption}")
            if item.raw is not None
            else '<span class="note">raw image not recorded</span>'
        )
        tiles.append(
            f'<figure class="tile"><div class="pair">{raw}{_img(item.path, caption)}</div>'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    return (
        '<p class="note">Each tile: the model input (left, when recorded) and its Grad-CAM '
        "overlay (right).</p>" + '<div class="gallery">' + "".join(tiles) + "</div>"
    )
