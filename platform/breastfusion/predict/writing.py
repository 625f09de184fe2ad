"""``predict``'s output files, written into its staging folder (``final.outdir``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from breastfusion.io import atomic_write_json, atomic_write_text
from breastfusion.runs import csv_text

if TYPE_CHECKING:
    from breastfusion.final.bundle import Bundle
    from breastfusion.predict.inputs import Inputs
    from breastfusion.predict.run import Scored


def evaluate_main(
    bundle: Bundle, table: pd.DataFrame, n_boot: int, seed: int, out: Path
) -> dict[str, Any]:
    """Metrics (with CIs) of the patients the bundle's own model scored, at its threshold."""
    from breastfusion.errors import UserError
    from breastfusion.final import evaluation

    mine = table[table["status"] == "scored"]
    if mine.empty:
        raise UserError("nothing to evaluate: the model scored no patient")
    patients = mine[["patient_id", "y_true", "y_score"]].astype({"y_true": int})
    result, scores = evaluation.evaluate(
        patients,
        bundle.name,
        threshold=bundle.threshold,
        n_boot=n_boot,
        seed=seed,
        source="predictions",
        prefix="predict",
    )
    others = table[table["status"] != "scored"]
    if len(others):
        result["warnings"] = [
            *result.get("warnings", []),
            f"{len(others)} patient(s) not scored by {bundle.name} are not in these metrics "
            "(see predictions.csv, column status)",
        ]
    evaluation.write(result, scores, out)
    return result


def write_outputs(
    out: Path,
    bundle: Bundle,
    inputs: Inputs,
    table: pd.DataFrame,
    scored: list[Scored],
    evaluate: bool,
    gradcam: int,
    n_boot: int,
    seed: int,
    say: Callable[[str], None],
) -> dict[str, Any] | None:
    atomic_write_text(out / "predictions.csv", csv_text(table))
    atomic_write_text(out / "images.csv", csv_text(scored[0].images))
    metrics = evaluate_main(bundle, table, n_boot, seed, out) if evaluate else None
    main = scored[0]
    if gradcam > 0 and main.dataset is not None and len(main.scores):
        from breastfusion.explain.gradcam import write_gallery

        say(f"Grad-CAM for up to {gradcam} patient(s) per category")
        shown = table[table["status"] == "scored"]
        cols = ["patient_id", "y_score"] + (["y_true"] if "y_true" in shown else [])
        write_gallery(
            bundle.load_model(), main.dataset, shown[cols], bundle.threshold, out / "gradcam",
            per_category=gradcam,
        )  # fmt: skip
    atomic_write_json(
        out / "predict.json",
        {
            "bundle": str(bundle.path),
            "model_name": bundle.name,
            "format": bundle.meta["format"],
            "source": str(inputs.source),
            "threshold": bundle.threshold,
            "score": "calibrated malignant log-odds; call malignant when score >= threshold",
            "status_counts": {str(k): int(v) for k, v in table["status"].value_counts().items()},
            "intended_use": bundle.meta.get("intended_use"),
        },
    )
    return metrics
