"""The answer first: the box at the top of the report (data source, cohort, holdout AUCs with
CIs for each model, the operating point) and every warning the study produced.
"""

from __future__ import annotations

from typing import Any

from breastfusion.report import table as T
from breastfusion.report.holdout import ordered
from breastfusion.report.inputs import ReportInputs
from breastfusion.report.sections import cohort_counts
from breastfusion.report.table import esc

SYNTHETIC_BANNER = "Synthetic data — demonstrates the pipeline, not clinical performance."
MAX_DEGENERATE_LISTED = 5


def _cohort_line(inp: ReportInputs) -> str:
    parts = []
    df = inp.manifest
    if df is not None and {"patient_id", "modality"} <= set(df.columns):
        try:
            p = cohort_counts(df)
            n_mal = int((p["y"] == 1).sum())
            parts.append(f"{len(p)} patients ({n_mal} malignant, {len(p) - n_mal} benign)")
        except (KeyError, ValueError, TypeError):
            pass
    sp = inp.splits or {}
    if "n_holdout" in sp:
        parts.append(
            f"holdout {sp['n_holdout']} patients ({sp.get('n_holdout_malignant', '?')} "
            f"malignant), {len(sp.get('folds') or [])} development folds"
        )
    return "; ".join(parts)


def _operating(e: dict[str, Any]) -> tuple[str, str]:
    op = e.get("operating_point")
    thr = f"{T.small(e.get('threshold'))} (p = {T.small(e.get('threshold_probability'))})"
    if op:
        return f"sensitivity ≥ {T.small(op.get('target_sensitivity'))} on validation", thr
    return "fixed threshold", thr


def holdout_rows(inp: ReportInputs) -> list[list[Any]]:
    models = (inp.holdout_metrics or {}).get("models") or {}
    rows = []
    for name in ordered(models):
        e = models[name]
        target, thr = _operating(e)
        rows.append(
            [
                name,
                T.interval(e.get("auc")),
                target,
                thr,
                T.interval(e.get("sensitivity"), percent=True),
                T.interval(e.get("specificity"), percent=True),
                f"{e.get('n_patients')} ({e.get('n_malignant')})",
            ]
        )
    return rows


def all_warnings(inp: ReportInputs) -> list[str]:
    """Every warning: unreadable inputs, holdout (incl. unreachable targets), targets missed
    on the holdout, aggregation, degenerate configurations, ROI fallbacks."""
    out = [f"{sid}: {p}" for sid, p in sorted(inp.problems.items())]
    hm = inp.holdout_metrics or {}
    out += [str(w) for w in hm.get("warnings") or []]
    for name, e in (hm.get("models") or {}).items():
        op = e.get("operating_point") or {}
        sens = (e.get("sensitivity") or {}).get("value")
        target = op.get("target_sensitivity")
        if target is not None and sens is not None and sens < target:
            out.append(
                f"{name}: holdout sensitivity {T.f3(sens)} is below the target {T.small(target)} "
                "that the threshold reached on validation"
            )
    agg = inp.aggregate
    if agg is not None:
        out += list(agg.warnings)
        bad = [t for t in agg.trials if t.complete and t.degenerate is not None]
        if bad:
            listed = "; ".join(f"{t.key} ({t.degenerate})" for t in bad[:MAX_DEGENERATE_LISTED])
            more = f"; … and {len(bad) - MAX_DEGENERATE_LISTED} more" if len(bad) > 5 else ""
            out.append(
                f"{len(bad)} configuration(s) with degenerate fold models were never chosen and "
                f"show no result: {listed}{more}"
            )
    out += _roi_warnings(inp)
    return out


def _roi_warnings(inp: ReportInputs) -> list[str]:
    s = (inp.roi or {}).get("summary") or {}
    out = [f"ROI: {w}" for w in s.get("warnings") or []]
    counts = s.get("counts") or {}
    fallback = int(counts.get("fallback") or 0) + int(counts.get("dropped") or 0)
    if fallback and not s.get("warnings"):
        share = s.get("fallback_share")
        pct = f" ({100 * share:.0f}% of the images sent to the detector)" if share else ""
        out.append(
            f"ROI: the detector found no lesion in {fallback} US image(s){pct}; those crops use "
            "the fallback rule, not a lesion ROI"
        )
    return out


def headline(inp: ReportInputs) -> str:
    """The box that opens the report."""
    parts = ['<section id="answer" class="answer"><h2>The answer</h2>']
    if inp.synthetic:
        parts.append(f'<p class="banner">{esc(SYNTHETIC_BANNER)}</p>')
    facts = []
    if inp.data_source:
        facts.append(("Data", inp.data_source))
    if cohort := _cohort_line(inp):
        facts.append(("Cohort", cohort))
    if inp.aggregate is not None and inp.aggregate.best:
        b = inp.aggregate.best
        facts.append(("Chosen configuration", f"{b.get('search')}/{b.get('trial')}"))
    parts.append("".join(f"<p><b>{esc(k)}:</b> {esc(v)}</p>" for k, v in facts))
    rows = holdout_rows(inp)
    if rows:
        table = T.make(
            "",
            ["model", "holdout AUC (95% CI)", "operating point", "threshold",
             "holdout sensitivity %", "holdout specificity %", "patients (malignant)"],
            rows,
            notes=["Holdout: patients never used to train or choose anything; AUC CI by "
                   "stratified patient bootstrap, proportions with Wilson 95% CIs."],
            kind="metrics",
        )  # fmt: skip
        parts.append(T.to_html(table, title=False))
    else:
        parts.append('<p class="missing">No holdout evaluation yet (stage 08_final).</p>')
    warnings = all_warnings(inp)
    if warnings:
        items = "".join(f"<li>{esc(w)}</li>" for w in warnings)
        parts.append(
            f'<div class="warnings"><b>Warnings ({len(warnings)})</b><ul>{items}</ul></div>'
        )
    else:
        parts.append('<p class="note">No warnings.</p>')
    parts.append("</section>")
    return "".join(parts)
