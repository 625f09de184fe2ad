"""The one place ``final`` and ``predict`` call the evaluate module (``metrics.json`` in the
shape ``breastfusion evaluate`` writes, with CIs), so a change of its API is one edit here."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

SOURCE = "holdout predictions"
VALIDATION_SOURCE = "development out-of-fold predictions"


def evaluate(
    patients: pd.DataFrame,
    name: str,
    *,
    threshold: float,
    n_boot: int,
    seed: int,
    oof: pd.DataFrame | None = None,
    target_sensitivity: float | None = None,
    source: str = SOURCE,
    prefix: str = "final",
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics of calibrated log-odds ``patients`` (``patient_id, y_true, y_score``) as model
    ``name``: at ``threshold``, or (with ``oof`` and a target) at the threshold the evaluate
    module chooses on ``oof`` — the same rule as ``final.operating.from_oof``."""
    from breastfusion.evaluate.holdout import evaluate_predictions

    table = patients[["patient_id", "y_true", "y_score"]].assign(model=name)
    use_oof = oof is not None and target_sensitivity is not None
    validation = None
    if use_oof:
        validation = oof[["patient_id", "y_true", "y_score"]].assign(model=name)
    return evaluate_predictions(
        table,
        threshold=None if use_oof else threshold,
        target_sensitivity=target_sensitivity if use_oof else None,
        validation=validation,
        n_boot=n_boot,
        seed=seed,
        source=source,
        validation_source=VALIDATION_SOURCE,
        score_scale="logit",
        prefix=prefix,
    )


def write(result: dict[str, Any], scores: pd.DataFrame, out: Path) -> dict[str, Path]:
    """``metrics.json``, ``metrics.md``, ``reliability.png``, ``patient_scores.csv``."""
    from breastfusion.report.holdout import write_outputs

    return write_outputs(result, scores, out)


def render(result: dict[str, Any]) -> str:
    from breastfusion.report.holdout import render_markdown

    return render_markdown(result)
