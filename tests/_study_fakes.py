"""Stand-in stages 03-09 for tests of the study runner (locking, interrupts, resuming, moving).

The real ``01_data`` and ``02_splits`` run (a tiny synthetic cohort, seconds); the rest write
the files their real counterparts would record, so a whole study takes a few seconds. Used
in-process (``install(monkeypatch.setattr)``) and as a script, for tests that must send a
real signal to a separate ``breastfusion run`` process::

    python tests/_study_fakes.py run STUDY.yaml --out DIR [--resume]

``FAKE_SEARCH_UNFINISHED=1``: the searches end without a finished trial (as an interrupted
Ray Tune run can).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from breastfusion import runs, study_stages  # noqa: E402
from breastfusion.io import atomic_write_json, atomic_write_text  # noqa: E402

TINY_STUDY = {
    "name": "tiny",
    "data": {"synthetic": {"patients": 20, "size": 32, "seed": 0, "difficulty": "easy"}},
    "splits": {"folds": 2, "holdout": 0.2, "seed": 0},
    "roi": {"mode": "none"},
    "fusion": {
        "algorithm": "random",
        "num_samples": 1,
        "scheduler": "none",
        "fixed": {"data.modality": "fusion"},
        "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
    },
}
# A holdout metrics.json with the numbers the headline must not round to zero.
METRICS = {
    "models": {
        "DM+US": {
            "n_patients": 8,
            "n_malignant": 2,
            "threshold": -0.000123456,
            "threshold_probability": 0.49996913600,
            "auc": {"value": 0.8125, "ci_low": 0.5, "ci_high": 1.0},
            "sensitivity": {"value": 1.0, "ci_low": 0.342, "ci_high": 1.0},
            "specificity": {"value": 0.5, "ci_low": 0.188, "ci_high": 0.812},
        }
    },
    "comparisons": [
        {"a": "DM+US", "b": "DM only", "difference": 0.0625, "p_value": 4.5e-07},
    ],
}


def roi(ctx, out):
    return {"manifest": ctx.outputs["01_data"]["manifest"], "mode": "none"}


def search_stage(key):
    def run(ctx, out):
        import pandas as pd

        folder = runs.SearchDir(out)
        atomic_write_json(folder.experiment_path, {"space": key})
        finished = os.environ.get("FAKE_SEARCH_UNFINISHED") != "1"
        status = "complete" if finished else "terminated"
        folder.write_trials_table(
            pd.DataFrame({"trial": ["t0"], "status": [status], "mean_auc": [math.nan]})
        )
        folder.write_best({"trial": "t0" if finished else None, "score": math.nan})
        study_stages.check_search_finished(folder, ctx.resume_command)
        return {"search_dir": out, "best_score": math.nan}

    return run


def aggregate(ctx, out):
    atomic_write_json(out / "aggregate.json", {"best": {"trial": "t0"}})
    atomic_write_json(out / "best_config.json", {"trial": "t0"})
    return {"aggregate_dir": out, "best_config": out / "best_config.json"}


def final(ctx, out):
    atomic_write_json(out / "metrics.json", METRICS)
    atomic_write_text(out / "model" / "bundle.txt", "a model")
    return {"final_dir": out, "model_dir": out / "model", "headline": "fake"}


def report(ctx, out):
    return {"report": atomic_write_text(out / "index.html", "<html>fake report</html>")}


def install(setattr_) -> None:
    """Replace stages 03-09 (``setattr_`` is ``monkeypatch.setattr`` or ``setattr``)."""
    for name, fake in (
        ("roi_stage", roi),
        ("search_stage", search_stage),
        ("aggregate_stage", aggregate),
        ("final_stage", final),
        ("report_stage", report),
    ):
        setattr_(study_stages, name, fake)


if __name__ == "__main__":
    from breastfusion.cli import main

    install(setattr)
    sys.exit(main(sys.argv[1:]))
