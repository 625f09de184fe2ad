"""Renderings of an aggregation (``evaluate.aggregate.AggregateResult``): the study's Tables 1–3,
the paired comparisons and the list of trials as ``Table``s, ``summary.md`` and the
``tables/<table>.md`` files. Degenerate configurations show "degenerate (reason)" instead of
numbers.
"""

from __future__ import annotations

from pathlib import Path

from breastfusion import runs
from breastfusion.evaluate.results import AggregateResult, Comparison, TrialResult
from breastfusion.io import atomic_write_text
from breastfusion.report import table as T
from breastfusion.report.table import Cell, Table

TABLE_TITLES = {
    "table1_dm_backbones": "Table 1 — DM only, by backbone (cross-validation)",
    "table2_us_backbones": "Table 2 — US only, by backbone (cross-validation)",
    "fusion_backbones": "DM+US fusion, by backbone pair (cross-validation)",
    "table3_modalities": "Table 3 — by modality: best configuration of each (cross-validation)",
}
COMPARISONS_TITLE = "Table 3 — paired comparisons (stratified DeLong, cross-validation)"
METRIC_COLUMNS = (
    "model",
    "AUC mean ± SD (folds)",
    "fold-stratified AUC (95% CI)",
    "sensitivity %",
    "specificity %",
    "precision %",
    "accuracy %",
    "threshold",
    "pooled OOF AUC (95% CI, secondary)",
    "patients (malignant)",
    "configuration",
)
EMPTY = "No complete trial of this kind among the given searches."


def degenerate_cell(t: TrialResult) -> Cell:
    return T.flagged("degenerate", str(t.degenerate))


def metric_row(label: str, t: TrialResult) -> tuple[Cell, ...]:
    config = Cell(t.key, code=True)
    if t.degenerate is not None:
        blanks = [Cell("—")] * (len(METRIC_COLUMNS) - 3)
        return (Cell(label), degenerate_cell(t), *blanks, config)
    c = t.cv
    if c is None:
        return (Cell(label), T.mean_sd(t.mean_auc, t.std_auc), *[Cell("n/a")] * 8, config)
    props = [T.interval(getattr(c, k).to_dict(), percent=True) for k in _PROPS]
    return (
        Cell(label),
        T.mean_sd(t.mean_auc, t.std_auc),
        T.interval(c.stratified_auc.to_dict()),
        *props,
        Cell(T.small(c.threshold), f"p = {T.small(c.threshold_probability)}"),
        T.interval(c.pooled_auc.to_dict()),
        Cell(f"{c.n_patients} ({c.n_malignant})"),
        config,
    )


_PROPS = ("sensitivity", "specificity", "precision", "accuracy")


def cv_notes(result: AggregateResult) -> tuple[str, ...]:
    words = {"logit": "calibrated log-odds", "probability": "probability"}
    scales = sorted({words.get(t.cv.score_scale, t.cv.score_scale) for t in result.trials if t.cv})
    scale = " and ".join(scales) or "calibrated log-odds"
    return (
        "Cross-validation, patient level. Headline: AUC mean ± SD over the folds and the "
        "fold-stratified AUC (concordance counted only within folds) with a stratified DeLong "
        "95% CI. Proportions (%, Wilson 95% CI) at the threshold on the pooled calibrated "
        f"out-of-fold scores ({scale} scale; p = the threshold as a probability). The pooled OOF "
        "AUC ranks patients of different fold models against each other and is secondary.",
        "CV intervals are conditional on the fold models (patient sampling only). These numbers "
        "also chose the configurations, so they are optimistic for the chosen ones; the "
        "holdout is the unbiased estimate.",
    )


def metrics_table(result: AggregateResult, name: str) -> Table:
    rows = tuple(metric_row(r.label, result.trial(r.trial)) for r in result.tables.get(name, []))
    return Table(TABLE_TITLES[name], METRIC_COLUMNS, rows, cv_notes(result), EMPTY, kind="metrics")


def comparison_row(c: Comparison) -> tuple[Cell, ...]:
    return tuple(
        T.cell(v)
        for v in (
            c.a,
            c.b,
            f"{c.n_patients} ({c.n_folds} folds)",
            T.f3(c.auc_a),
            T.f3(c.auc_b),
            T.f3(c.difference),
            T.small(c.p_value),
            c.note or "",
        )
    )


def comparisons_table(result: AggregateResult) -> Table:
    return Table(
        COMPARISONS_TITLE,
        ("a", "b", "shared patients", "AUC a", "AUC b", "difference", "p", "note"),
        tuple(comparison_row(c) for c in result.comparisons),
        (
            "Fold-stratified AUCs of the two configurations on the patients both scored in the "
            "same fold; two-sided stratified paired DeLong test (folds as strata).",
        ),
        "Fewer than two modalities have an eligible configuration: nothing to compare.",
    )


def trials_table(result: AggregateResult) -> Table:
    rows = []
    order = sorted(result.trials, key=lambda t: (t.search, -_finite(t.mean_auc), t.trial))
    for t in order:
        head = [Cell(t.search), Cell(t.trial, code=True), Cell(t.status), Cell(t.modality)]
        head.append(Cell(t.backbone_label))
        if t.degenerate is not None:
            rows.append((*head, degenerate_cell(t), Cell("—"), Cell("—")))
            continue
        c = t.cv
        strat = T.interval(c.stratified_auc.to_dict()) if c else Cell("n/a")
        pooled = T.f3(c.pooled_auc.value) if c else "n/a"
        rows.append((*head, T.mean_sd(t.mean_auc, t.std_auc), strat, Cell(pooled)))
    columns = ("search", "trial", "status", "modality", "backbone", "AUC mean ± SD")
    columns += ("fold-stratified AUC (95% CI)", "pooled OOF AUC")
    return Table("All trials", columns, tuple(rows), (), "No trials.")


def _finite(x: float) -> float:
    return x if x == x and abs(x) != float("inf") else -float("inf")


def all_tables(result: AggregateResult) -> dict[str, Table]:
    """Every table, keyed as the CSV files in ``tables/``."""
    out = {name: metrics_table(result, name) for name in TABLE_TITLES}
    out["table3_comparisons"] = comparisons_table(result)
    out["trials"] = trials_table(result)
    return out


def render_summary(result: AggregateResult) -> str:
    """``summary.md``: the best configuration and its rule, every table, method, warnings."""
    b = result.best
    label = runs.MODALITY_LABELS.get(str(b.get("modality")), b.get("modality"))
    score = b.get("score") or {}
    lines = [
        "# Aggregated search results",
        "",
        f"Searches: {', '.join(str(s['name']) for s in result.searches)}.",
        "",
        f"**Best configuration**: {b.get('search')}/{b.get('trial')} ({label}, "
        f"{b.get('backbone_label', b.get('backbone'))}), mean fold AUC "
        f"{T.f3(score.get('value'))} ± {T.f3(score.get('sd'))}.",
        "",
        f"**Rule**: {result.rule}; chosen from {b.get('selected_from')}.",
        "",
    ]
    tables = all_tables(result)
    for name in ("table3_modalities", "table3_comparisons", *list(TABLE_TITLES)[:3], "trials"):
        lines.append(T.to_markdown(tables[name]))
    lines += ["## Method", ""] + [f"- **{k}**: {v}" for k, v in result.method.items()]
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    return "\n".join(lines) + "\n"


def write_markdown(result: AggregateResult, out: Path) -> dict[str, Path]:
    """``summary.md`` and ``tables/<table>.md`` next to the aggregation's CSV files."""
    out = Path(out)
    files = {
        f"tables/{name}.md": atomic_write_text(out / "tables" / f"{name}.md", T.to_markdown(t))
        for name, t in all_tables(result).items()
    }
    files["summary.md"] = atomic_write_text(out / "summary.md", render_summary(result))
    return files
