"""MLflow record of a finished study (``tracking.mlflow_uri``): one run per study result.

The run is named after the study and holds its resolved settings as parameters, the holdout
AUCs as metrics, and the report, ``study.json`` and the final model folder as artefacts. A
study that ran no stage since it was last logged to the same URI is not logged again (its
run id is kept in ``STUDY/.breastfusion-mlflow.json``). The searches log their own trials
(the search area). mlflow is imported only here, and only when tracking is on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from breastfusion import runs
from breastfusion.errors import UserError
from breastfusion.io import atomic_write_json
from breastfusion.study_stages import StageContext

log = logging.getLogger(__name__)

RECORD_FILE = ".breastfusion-mlflow.json"
_PARAM_LIMIT = 500  # characters per parameter value (MLflow's limit is larger; keep it short)


def log_study(ctx: StageContext, *, changed: bool) -> str:
    """Log the study's results to ``tracking.mlflow_uri``; return the MLflow run id."""
    uri = str(ctx.study.tracking.mlflow_uri)
    record_path = ctx.root / RECORD_FILE
    try:
        previous = runs.read_json(record_path, "MLflow record")
    except UserError:
        previous = {}
    if not changed and previous.get("uri") == uri and previous.get("run_id"):
        ctx.echo(f"mlflow: unchanged since run {previous['run_id']} ({uri})")
        return str(previous["run_id"])
    try:
        run_id = _log(ctx, uri)
    except Exception as exc:  # noqa: BLE001  (mlflow raises many kinds; all mean "not logged")
        raise UserError(
            f"tracking.mlflow_uri: cannot log the study to {uri} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}); the study itself is finished "
            "and recorded — rerun with --resume to retry the logging"
        ) from exc
    atomic_write_json(record_path, {"uri": uri, "run_id": run_id, "experiment": ctx.study.name})
    ctx.echo(f"mlflow: logged run {run_id} to {uri}")
    return run_id


def _log(ctx: StageContext, uri: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    name = ctx.study.name
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
    mlflow.set_experiment(name)
    final = ctx.outputs.get("08_final") or {}
    with mlflow.start_run(run_name=f"study {name}") as run:
        mlflow.set_tags({"breastfusion.kind": "study", "breastfusion.root": str(ctx.root)})
        mlflow.log_params(_params(ctx.study.to_dict(portable=True)))
        mlflow.log_metrics(_metrics(ctx.dir("08_final") / "metrics.json"))
        mlflow.log_artifact(str(runs.StudyDir(ctx.root).study_file))
        report = (ctx.outputs.get("09_report") or {}).get("report")
        if report and Path(report).is_file():
            mlflow.log_artifact(str(report), "report")
        model = final.get("model_dir")
        if model and Path(model).is_dir():
            mlflow.log_artifacts(str(model), "final_model")
        if (ctx.dir("08_final") / "metrics.json").is_file():
            mlflow.log_artifact(str(ctx.dir("08_final") / "metrics.json"), "final_model")
        return str(run.info.run_id)


def _artifact_location(uri: str) -> str | None:
    """Artefacts of a local SQLite store go next to its database (MLflow's default would be
    ``./mlruns`` in whatever folder the study was started from); servers choose their own."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        folder = (db if db.is_absolute() else Path(os.getcwd()) / db).parent / "mlartifacts"
        return folder.as_uri()
    return None


def _params(resolved: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in resolved.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and name.count(".") < 3:
            out.update(_params(value, name))
        else:
            out[name] = str(value)[:_PARAM_LIMIT]
    return out


def _metrics(path: Path) -> dict[str, float]:
    """Holdout AUC (and CI) per model, as ``holdout_auc.<model>``."""
    try:
        metrics = runs.read_json(path, "holdout metrics")
    except UserError:
        return {}
    out: dict[str, float] = {}
    for model, m in (metrics.get("models") or {}).items():
        auc = (m or {}).get("auc") if isinstance(m, Mapping) else None
        if not isinstance(auc, Mapping):
            continue
        tag = "".join(c if c.isalnum() else "_" for c in str(model))
        for key, label in (("value", "auc"), ("ci_low", "auc_ci_low"), ("ci_high", "auc_ci_high")):
            value = auc.get(key)
            if isinstance(value, int | float) and value == value:
                out[f"holdout_{label}.{tag}"] = float(value)
    return out
