"""One fold, from a validated config to its outputs: what ``train``, the search and ``final`` call.

``run_fold(cfg, out_dir)``: cohort → the fold's datasets → loaders → model → ``fit`` → scores
→ calibration → outputs. The search calls it for every (trial, fold), passing the ``Cohort`` it
loaded once; ``breastfusion train`` (``engine/cli.py``) turns flags into a config and calls it.

Which model is reported: with ``optim.patience == 0`` the last epoch's, trained on the whole
training fold; with ``patience > 0`` the best epoch on an inner patient-level split of the
training fold (``optim.inner_val_fraction``). Either way the fold's validation patients are
scored once, by that model: the reported AUC is never the maximum over epochs of itself.

Scores: each validation patient's mean malignant log-odds (``y_score_raw``), then Platt
calibration fitted on this validation fold (``y_score`` = ``a·raw + b``, the scale that pooled
out-of-fold scores and fold ensembles share; see ``evaluate.calibration``). A fold whose raw
scores are (nearly) constant is marked ``degenerate`` (``evaluate.metrics.degenerate_reason``).

Outputs in ``out_dir`` (file names from ``breastfusion.runs``; each written atomically):
``config.yaml``, ``predictions.csv``, ``history.csv``, ``tensorboard/``, ``model.pt`` (weights +
config + metrics, calibration included) and, last, ``metrics.json`` — the "finished" marker,
removed when a run starts, so a crashed run never looks complete.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion import runs
from breastfusion.config import Config, save_yaml
from breastfusion.engine.data import (
    Cohort,
    build_dataset,
    build_loader,
    cache_dir,
    cohort_for,
    fold_patients,
    inner_split,
    require_samples,
)
from breastfusion.engine.progress import Curves, EpochProgress, fmt_metric
from breastfusion.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CONFIG_NAME = runs.FOLD_CONFIG
METRICS_NAME = runs.FOLD_METRICS
PREDICTIONS_NAME = runs.FOLD_PREDICTIONS
MODEL_NAME = runs.FOLD_MODEL
CHECKPOINT_DIR = runs.FOLD_CHECKPOINTS  # fit's best.pt/last.pt while training; removed on success

Progress = Callable[[str], None]
# A fold model whose patient log-odds vary by less than this is degenerate: collapsed models
# measured here (plain VGG16 from scratch at lr 1e-3) gave SD 1e-4..3e-3, working ones >= 0.4.
MIN_LOG_ODDS_SD = 0.01
SELECTION_LAST = "last epoch (optim.patience 0: the validation fold never picks an epoch)"
SELECTION_INNER = (
    "best epoch on an inner patient-level split of the training fold (optim.patience > 0); "
    "the validation fold never picks an epoch"
)


@dataclass
class FoldData:
    """Loaders for one fold plus the counts worth reporting. ``monitor_loader`` is what the
    epochs are watched on (the validation fold, or the inner split when early stopping)."""

    train_loader: Any
    val_loader: Any
    summary: dict[str, Any]
    monitor_loader: Any = None
    inner: bool = False


@dataclass
class FoldResult:
    """What one finished fold produced (also on disk in ``out_dir``)."""

    out_dir: Path
    config_hash: str
    metrics: dict[str, Any]  # as in metrics.json
    predictions: pd.DataFrame  # patient_id, y_true, y_score, y_score_raw (validation patients)
    fit: Any  # breastfusion.engine.loop.FitResult


def run_fold(
    cfg: Config,
    out_dir: str | Path,
    callback: Callable[[dict[str, float]], Any] | None = None,
    *,
    device: Any = None,
    prepare_model: Callable[[Any], Any] | None = None,
    prepare_loader: Callable[[Any], Any] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    cohort: Cohort | None = None,
    curves: bool = True,
    fallback_cache: str | Path | None = None,
) -> FoldResult:
    """Train and validate fold ``cfg.data.fold``; write the outputs listed in the module doc.

    ``callback``, ``device``, ``prepare_model`` and ``prepare_loader`` go to ``fit`` (the Ray
    touch points). ``resume`` continues from ``out_dir/checkpoints/last.pt`` if present.
    ``progress`` receives human-readable lines (the CLI passes ``click.echo``). ``cohort``: the
    already-loaded manifest and splits (a search passes it to every fold).
    ``fallback_cache``: where the preprocessing cache goes when ``data.cache_dir`` is unset
    and the manifest's folder is read-only (default: ``out_dir/.cache``).
    """
    from breastfusion.engine.loop import fit

    say = progress or (lambda line: log.info("%s", line))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_NAME).unlink(missing_ok=True)  # a re-run is unfinished until it finishes

    fallback = Path(fallback_cache) if fallback_cache is not None else out / ".cache"
    data = build_fold_data(cfg, cohort, fallback_cache=fallback)
    say(_describe(cfg, data.summary))
    model = build_model_from_config(cfg)
    save_yaml(cfg, out / CONFIG_NAME)

    hooks = {
        k: v for k, v in (("prepare_model", prepare_model), ("prepare_loader", prepare_loader)) if v
    }
    shown = EpochProgress(say, cfg.optim.epochs, label=f"fold {cfg.data.fold}")
    history = Curves(out / runs.FOLD_TENSORBOARD if curves else None, f"fold{cfg.data.fold}/")

    def on_epoch(metrics: dict[str, float]) -> Any:
        shown.on_epoch(metrics)
        history.add(metrics)
        return callback(metrics) if callback is not None else None

    try:
        result = fit(
            cfg,
            data.train_loader,
            data.monitor_loader,
            model,
            callback=on_epoch,
            out_dir=out / CHECKPOINT_DIR,
            device=device,
            resume=resume,
            heartbeat=shown.heartbeat,
            **hooks,
        )
    finally:
        shown.close()
        history.close()
    predictions = _patient_predictions(result, model, data, cfg, device)
    metrics = fold_metrics(predictions, cfg, result, data.summary, inner=data.inner)
    atomic_write_text(out / runs.FOLD_HISTORY, history.history_csv())
    _write_outputs(out, cfg, model, predictions, metrics)
    flag = f"; DEGENERATE: {metrics['degenerate_reason']}" if metrics["degenerate"] else ""
    say(
        f"fold {cfg.data.fold}: validation AUC {fmt_metric(metrics['auc'])} over "
        f"{metrics['n_patients']} patients (model of epoch {metrics['reported_epoch']}, "
        f"{result.stop_reason}){flag}; outputs in {out}"
    )
    if metrics["degenerate"]:
        log.warning("fold %s: degenerate model: %s", cfg.data.fold, metrics["degenerate_reason"])
    return FoldResult(out, cfg.config_hash(), metrics, predictions, result)


def preload() -> None:
    """Import now what ``run_fold`` imports lazily (torchvision's models, albumentations,
    TensorBoard's writer, the loop, the metrics: ~2.5 s on 2 CPU cores). A search's
    trial process calls it once, when it starts, so that its first fold costs what its later
    folds cost; everything else (``breastfusion --help``, ``validate``…) keeps them lazy."""
    import albumentations  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import torchvision.models  # noqa: F401

    import breastfusion.engine.loop  # noqa: F401
    import breastfusion.evaluate.metrics  # noqa: F401


def build_fold_data(
    cfg: Config, cohort: Cohort | None = None, *, fallback_cache: Path | None = None
) -> FoldData:
    """The fold's training, monitoring and validation loaders (cache warmed)."""
    cohort = cohort_for(cfg, cohort)
    train_ids, val_ids = fold_patients(cfg, cohort)
    where = cache_dir(cfg, fallback_cache)
    inner = cfg.optim.patience > 0
    monitor_ids: list[str] = []
    if inner:
        seed = cfg.optim.seed + cfg.data.fold
        train_ids, monitor_ids = inner_split(
            train_ids, cohort.labels(), cfg.optim.inner_val_fraction, seed
        )
    train_ds = build_dataset(cfg, cohort.table, train_ids, train=True, cache=where)
    val_ds = build_dataset(cfg, cohort.table, val_ids, train=False, cache=where)
    require_samples(cfg, train_ds, train_ids, "training")
    require_samples(cfg, val_ds, val_ids, "validation")
    val_loader = build_loader(cfg, val_ds, train=False)
    monitor_loader = val_loader
    summary = {
        "train_patients": len(train_ds.patients),
        "val_patients": len(val_ds.patients),
        "train_samples": len(train_ds),
        "val_samples": len(val_ds),
        "excluded_patients": train_ds.n_excluded + val_ds.n_excluded,
    }
    if inner:
        monitor_ds = build_dataset(cfg, cohort.table, monitor_ids, train=False, cache=where)
        require_samples(cfg, monitor_ds, monitor_ids, "inner monitoring")
        monitor_loader = build_loader(cfg, monitor_ds, train=False)
        summary["inner_patients"] = len(monitor_ds.patients)
    train_loader = build_loader(cfg, train_ds, train=True)
    return FoldData(train_loader, val_loader, summary, monitor_loader, inner)


def build_model_from_config(cfg: Config) -> Any:
    """The classifier ``cfg.model`` describes (seeded, so initial weights repeat)."""
    from breastfusion.engine.loop import seed_everything
    from breastfusion.models.fusion import build_model

    seed_everything(cfg.optim.seed)
    m = cfg.model
    return build_model(
        modality=cfg.data.modality,
        backbone_dm=m.backbone_dm,
        backbone_us=m.backbone_us,
        fusion=m.fusion,
        pretrained=m.pretrained,
        input_mode=m.input_mode,
        dropout=m.dropout,
        upsample_small=m.upsample_small,
    )


def fold_metrics(
    predictions: pd.DataFrame,
    cfg: Config,
    result: Any,
    summary: dict[str, Any],
    *,
    inner: bool = False,
) -> dict[str, Any]:
    """Patient-level validation metrics at ``train.threshold`` (a probability, applied to the
    calibrated log-odds) plus the calibration, the degenerate check and run facts."""
    from breastfusion.evaluate.calibration import Calibration, logit
    from breastfusion.evaluate.metrics import binary_metrics, degenerate_reason, roc_auc

    y = predictions["y_true"].to_numpy()
    raw = predictions["y_score_raw"].to_numpy()
    threshold = logit(cfg.train.threshold)
    m = binary_metrics(y, predictions["y_score"].to_numpy(), threshold=threshold).as_dict()
    # The AUC is the model's own ranking: a fold whose calibration slope is 0 has constant
    # calibrated scores, which would report any ranking (even a reversed one) as exactly 0.5.
    m["auc"] = roc_auc(y, raw) if len(np.unique(y)) == 2 else math.nan
    reason = degenerate_reason(raw, min_sd=MIN_LOG_ODDS_SD)
    cal: Calibration = predictions.attrs["calibration"]
    m.update(
        threshold_probability=cfg.train.threshold,
        score_scale="calibrated malignant log-odds",
        calibration=cal.to_dict(),
        degenerate=reason is not None,
        degenerate_reason=reason,
        score_sd=float(np.std(raw)) if len(raw) else None,
        distinct_scores=int(len(np.unique(raw))),
        n_patients=int(len(predictions)),
        n_malignant=int(np.sum(y)),
        fold=cfg.data.fold,
        modality=cfg.data.modality,
        best_epoch=result.best_epoch,
        reported_epoch=result.best_epoch,
        selection=SELECTION_INNER if inner else SELECTION_LAST,
        epochs_run=result.epochs_run,
        stop_reason=result.stop_reason,
        config_hash=cfg.config_hash(),
        **summary,
    )
    # JSON has no NaN: an undefined metric (e.g. precision with no positive call) is null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def format_epoch(metrics: dict[str, float], epochs: int) -> str:
    """One progress line per epoch (without timing; ``EpochProgress`` adds elapsed/ETA)."""
    return EpochProgress(lambda _: None, epochs).epoch_line(metrics)


# -- internals ---------------------------------------------------------------------------------


def _describe(cfg: Config, summary: dict[str, Any]) -> str:
    unit = "pairs" if cfg.data.modality == "fusion" else "images"
    excluded = summary["excluded_patients"]
    note = f"; {excluded} patient(s) left out for a missing modality" if excluded else ""
    inner = summary.get("inner_patients")
    how = f" (+{inner} inner early-stopping patients)" if inner else ""
    return (
        f"fold {cfg.data.fold} ({cfg.data.modality}): {summary['train_patients']} training{how}"
        f" / {summary['val_patients']} validation patients, {summary['train_samples']} / "
        f"{summary['val_samples']} {unit}{note}"
    )


def _patient_predictions(
    result: Any, model: Any, data: FoldData, cfg: Config, device: Any
) -> pd.DataFrame:
    """One row per validation patient: raw mean log-odds and Platt-calibrated log-odds."""
    from breastfusion.engine.loop import evaluate
    from breastfusion.evaluate.calibration import fit_platt
    from breastfusion.evaluate.metrics import patient_scores

    per_sample = None if data.inner else result.val_predictions
    if per_sample is None:  # early stopping on the inner split, or a resumed run
        per_sample = evaluate(
            model, data.val_loader, device if device is not None else cfg.train.device
        )
    patients = patient_scores(per_sample, source=f"fold {cfg.data.fold} validation")
    raw = patients["y_score"].to_numpy(dtype=np.float64)
    y = patients["y_true"].to_numpy()
    calibration = fit_platt(y, raw)
    out = pd.DataFrame(
        {
            "patient_id": patients["patient_id"].to_numpy(),
            "y_true": y,
            "y_score": calibration.apply(raw),
            "y_score_raw": raw,
        }
    )
    out.attrs["calibration"] = calibration
    return out


def _write_outputs(
    out: Path, cfg: Config, model: Any, predictions: pd.DataFrame, metrics: dict[str, Any]
) -> None:
    from breastfusion.engine.checkpoint import save_checkpoint

    atomic_write_text(out / PREDICTIONS_NAME, runs.csv_text(predictions))
    save_checkpoint(out / MODEL_NAME, model, cfg.to_dict(), meta={"metrics": metrics})
    atomic_write_json(out / METRICS_NAME, metrics)  # last: marks the fold as finished
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
