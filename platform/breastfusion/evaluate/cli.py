"""``breastfusion evaluate`` and ``breastfusion aggregate``: the command-line faces only.

The logic lives in ``evaluate.holdout`` (metrics of held-out predictions),
``evaluate.aggregate`` (search folders → CV tables and the best configuration) and
``report`` (Markdown, figures). These commands map their flags onto settings keys, so every
error names the flag the user typed.

Transition: ``evaluate_predictions`` is re-exported here for callers not yet switched to
``evaluate.holdout`` (``benchmarks/replicate_study.py``).
"""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.evaluate.holdout import evaluate_predictions
from breastfusion.io import read_csv_table, sha256_file
from breastfusion.report.holdout import write_outputs
from breastfusion.report.table import f3, small

__all__ = ["aggregate_command", "evaluate_command", "evaluate_predictions"]

EVALUATE_FLAGS = {
    "threshold": "--threshold",
    "target_sensitivity": "--target-sensitivity",
    "bootstrap": "--bootstrap",
    "seed": "--seed",
    "score_scale": "--score-scale",
}
AGGREGATE_FLAGS = {
    "threshold": "--threshold",
    "bootstrap": "--bootstrap",
    "seed": "--seed",
    "tie_tolerance": "--tie-tolerance",
    "best_from": "--best-from",
    "score_scale": "--score-scale",
}
SCALE_CHOICE = click.Choice(["auto", "logit", "probability"])


def _ci(d: dict) -> str:
    return f"{f3(d.get('value'))} ({f3(d.get('ci_low'))}–{f3(d.get('ci_high'))})"


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
    default=None,
    type=float,
    help="Fixed decision threshold (score >= threshold → malignant). "
    "[default: 0.5 for probabilities, 0.0 for log-odds]",
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
@click.option(
    "--score-scale",
    type=SCALE_CHOICE,
    default="auto",
    show_default=True,
    help="Scale of y_score (auto: probability when every score is in [0, 1], else log-odds); "
    "used for the Brier score, reliability and calibration slope.",
)
@click.option("--bootstrap", default=2000, show_default=True, type=int, help="Resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
def evaluate_command(
    predictions: Path,
    out: Path,
    threshold: float | None,
    target_sensitivity: float | None,
    threshold_from: Path | None,
    score_scale: str,
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
    result, scores = evaluate_predictions(
        _read(predictions),
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        validation=_read(threshold_from) if threshold_from is not None else None,
        n_boot=bootstrap,
        seed=seed,
        source=str(predictions),
        validation_source=str(threshold_from) if threshold_from else "validation",
        score_scale=score_scale,
        names=EVALUATE_FLAGS,
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
            f"{name}: AUC {_ci(e['auc'])}, sensitivity {f3(e['sensitivity']['value'])}, "
            f"specificity {f3(e['specificity']['value'])} at threshold {small(e['threshold'])} "
            f"({e['threshold_source']}; {e['n_patients']} patients)"
        )
    for c in result["comparisons"]:
        click.echo(
            f"{c['a']} vs {c['b']}: AUC {f3(c['auc_a'])} vs {f3(c['auc_b'])}, "
            f"p = {small(c['p_value'])}"
        )
    click.echo(f"wrote {out / 'metrics.json'}, metrics.md, reliability.png, patient_scores.csv")


def _read(path: Path) -> pd.DataFrame:
    """Read a predictions CSV without validating (evaluate_predictions validates)."""
    return read_csv_table(path, what="predictions file", str_columns=("patient_id", "model"))


@click.command("aggregate")
@click.argument(
    "search_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path)
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for tables/, best_config.json, aggregate.json, oof_best.csv, summary.md.",
)
@click.option(
    "--threshold",
    default=None,
    type=float,
    help="Threshold for the proportions on the pooled OOF scores. "
    "[default: the folds' recorded threshold, else 0.5 probability / 0.0 log-odds]",
)
@click.option(
    "--score-scale", type=SCALE_CHOICE, default="auto", show_default=True, help="Scale of y_score."
)
@click.option("--bootstrap", default=2000, show_default=True, type=int, help="Resamples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Bootstrap seed.")
@click.option(
    "--tie-tolerance",
    default=runs.DEFAULT_TIE_TOLERANCE,
    show_default=True,
    type=float,
    help="Mean AUCs this close to the best count as tied (then: fewer parameters wins).",
)
@click.option(
    "--best-from",
    type=click.Choice(["any", *runs.MODALITY_ORDER]),
    default="any",
    show_default=True,
    help="Choose the best configuration among this modality only.",
)
def aggregate_command(
    search_dirs: tuple[Path, ...],
    out: Path,
    threshold: float | None,
    score_scale: str,
    bootstrap: int,
    seed: int,
    tie_tolerance: float,
    best_from: str,
) -> None:
    """Tables (study Tables 1-3) and the best configuration from SEARCH_DIR folders."""
    from breastfusion.evaluate.aggregate import aggregate
    from breastfusion.report.cv import metrics_table, write_markdown
    from breastfusion.report.table import to_markdown

    result = aggregate(
        list(search_dirs),
        out,
        threshold=threshold,
        n_boot=bootstrap,
        seed=seed,
        tie_tolerance=tie_tolerance,
        best_from=None if best_from == "any" else best_from,
        score_scale=score_scale,
        names=AGGREGATE_FLAGS,
    )
    write_markdown(result, out)
    click.echo(to_markdown(metrics_table(result, "table3_modalities")))
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    b = result.best
    click.echo(
        f"best: {b['search']}/{b['trial']} (mean fold AUC {f3(b['score']['value'])}); "
        f"rule: {result.rule}"
    )
    click.echo(f"wrote {out / 'best_config.json'}, {out / 'tables'}/, {out / 'aggregate.json'}")
