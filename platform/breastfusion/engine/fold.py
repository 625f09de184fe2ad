"""One fold, from a validated config to its outputs: what ``train``, the search and ``final`` call.

``run_fold(cfg, out_dir)``: manifest + splits → cached datasets → loaders → model → ``fit`` →
outputs. The search calls it for every (trial, fold); ``breastfusion train`` (``engine/cli.py``)
turns flags into dotted config overrides and calls it.

Outputs in ``out_dir`` (a later stage trusts them, so each is written atomically):
``config.yaml`` (resolved, with its hash), ``predictions.csv`` (one row per validation patient),
``model.pt`` (best weights + config + metrics) and, last, ``metrics.json``. ``metrics.json``
is the "finished" marker: it is removed when a run starts and written only after everything
else, so a crashed run never looks complete.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.config import Config, save_yaml
from breastfusion.errors import ConfigError, SplitError, UserError
from breastfusion.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
MODEL_NAME = "model.pt"
CHECKPOINT_DIR = "checkpoints"  # fit's best.pt/last.pt while training; removed on success

Progress = Callable[[str], None]


@dataclass
class FoldData:
    """Loaders for one fold plus the counts worth reporting."""

    train_loader: Any
    val_loader: Any
    summary: dict[str, Any]


@dataclass
class FoldResult:
    """What one finished fold produced (also on disk in ``out_dir``)."""

    out_dir: Path
    config_hash: str
    metrics: dict[str, Any]  # as in metrics.json
    predictions: pd.DataFrame  # patient_id, y_true, y_score (one row per validation patient)
    fit: Any  # breastfusion.engine.loop.FitResult


# -- the reusable part -------------------------------------------------------------------------


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
) -> FoldResult:
    """Train and validate fold ``cfg.data.fold``; write the outputs listed in the module doc.

    ``callback``, ``device``, ``prepare_model`` and ``prepare_loader`` go to ``fit`` (the Ray
    touch points). ``resume`` continues from ``out_dir/checkpoints/last.pt`` if present.
    ``progress`` receives human-readable lines (the CLI passes ``click.echo``).
    """
    from breastfusion.engine.loop import fit

    say = progress or (lambda line: log.info("%s", line))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_NAME).unlink(missing_ok=True)  # a re-run is unfinished until it finishes

    data = build_fold_data(cfg)
    say(_describe(cfg, data.summary))
    model = build_model_from_config(cfg)
    save_yaml(cfg, out / CONFIG_NAME)

    hooks = {
        k: v for k, v in (("prepare_model", prepare_model), ("prepare_loader", prepare_loader)) if v
    }
    epochs = cfg.optim.epochs

    def on_epoch(metrics: dict[str, float]) -> Any:
        say(format_epoch(metrics, epochs))
        return callback(metrics) if callback is not None else None

    result = fit(
        cfg,
        data.train_loader,
        data.val_loader,
        model,
        callback=on_epoch,
        out_dir=out / CHECKPOINT_DIR,
        device=device,
        resume=resume,
        **hooks,
    )
    predictions = _patient_predictions(result, model, data, cfg, device)
    metrics = fold_metrics(predictions, cfg, result, data.summary)
    _write_outputs(out, cfg, model, predictions, metrics)
    say(
        f"fold {cfg.data.fold}: validation AUC {fmt_metric(metrics['auc'])} over "
        f"{metrics['n_patients']} patients (best epoch {result.best_epoch}, "
        f"{result.stop_reason}); outputs in {out}"
    )
    return FoldResult(out, cfg.config_hash(), metrics, predictions, result)


def build_fold_data(cfg: Config) -> FoldData:
    """Manifest + splits → the fold's training and validation loaders (cache warmed)."""
    from breastfusion.data.augment import AugmentSpec
    from breastfusion.data.datasets import make_loader

    df, train_ids, val_ids = _fold_patients(cfg)
    aug = AugmentSpec(
        hflip=cfg.augment.hflip,
        vflip=cfg.augment.vflip,
        elastic=cfg.augment.elastic,
        strength=cfg.augment.strength,
    )
    train_ds = _dataset(cfg, df, train_ids, augment=aug)
    val_ds = _dataset(cfg, df, val_ids, augment=None)
    for name, ds, ids in (("training", train_ds, train_ids), ("validation", val_ds, val_ids)):
        if len(ds) == 0:
            raise UserError(
                f"fold {cfg.data.fold}: no {name} samples for modality {cfg.data.modality!r} "
                f"({len(ids)} patients, {ds.n_excluded} without the needed image(s))"
            )
    common = {"batch_size": cfg.optim.batch_size, "seed": cfg.optim.seed}
    train_loader = make_loader(
        train_ds,
        train=True,
        oversample=cfg.augment.oversample,
        num_workers=cfg.data.num_workers,
        **common,
    )
    val_loader = make_loader(val_ds, train=False, num_workers=cfg.data.num_workers, **common)
    summary = {
        "train_patients": len(train_ds.patients),
        "val_patients": len(val_ds.patients),
        "train_samples": len(train_ds),
        "val_samples": len(val_ds),
        "excluded_patients": train_ds.n_excluded + val_ds.n_excluded,
    }
    return FoldData(train_loader, val_loader, summary)


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
    )


def fold_metrics(
    predictions: pd.DataFrame, cfg: Config, result: Any, summary: dict[str, Any]
) -> dict[str, Any]:
    """Patient-level validation metrics at ``cfg.train.threshold`` plus run facts (JSON-safe)."""
    from breastfusion.evaluate.metrics import binary_metrics

    y = predictions["y_true"].to_numpy()
    s = predictions["y_score"].to_numpy()
    m = binary_metrics(y, s, threshold=cfg.train.threshold).as_dict()
    m.update(
        n_patients=int(len(predictions)),
        n_malignant=int(np.sum(y)),
        fold=cfg.data.fold,
        modality=cfg.data.modality,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        stop_reason=result.stop_reason,
        config_hash=cfg.config_hash(),
        **summary,
    )
    # JSON has no NaN: an undefined metric (e.g. precision with no positive call) is null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}


def format_epoch(metrics: dict[str, float], epochs: int) -> str:
    """One progress line per epoch."""
    return (
        f"epoch {int(metrics['epoch'])}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
        f"val_loss {metrics['val_loss']:.4f}  val_auc {fmt_metric(metrics['val_auc'])}  "
        f"best {fmt_metric(metrics['best_val_auc'])}@{int(metrics['best_epoch'])}  "
        f"{metrics['samples_per_s']:.1f} samples/s  {metrics['epoch_time_s']:.1f} s"
    )


# -- internals ---------------------------------------------------------------------------------


def fmt_metric(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _fold_patients(cfg: Config) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The manifest table and the fold's (train, validation) patient ids, checked."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    if not cfg.data.manifest:
        raise ConfigError("no manifest given (--manifest or data.manifest in the config)")
    if not cfg.data.splits:
        raise ConfigError("no splits file given (--splits or data.splits in the config)")
    df = load_manifest(cfg.data.manifest)
    splits = load_splits(cfg.data.splits, df)
    fold = cfg.data.fold
    if not 0 <= fold < splits.k:
        raise SplitError(
            f"fold {fold} is out of range: {cfg.data.splits} has {splits.k} folds "
            f"(0..{splits.k - 1})"
        )
    train_ids, val_ids = splits.train_val(fold)
    if cfg.data.max_patients is not None:
        labels = df.assign(patient_id=df["patient_id"].astype(str)).groupby("patient_id")["y"].max()
        train_ids = _subset(train_ids, labels, cfg.data.max_patients, cfg.optim.seed)
        val_ids = _subset(val_ids, labels, cfg.data.max_patients, cfg.optim.seed + 1)
    return df, list(train_ids), list(val_ids)


def _subset(ids: Sequence[str], labels: pd.Series, n: int, seed: int) -> list[str]:
    """At most ``n`` ids, drawn per class in proportion (each class kept if present), seeded."""
    if len(ids) <= n:
        return list(ids)
    rng = np.random.default_rng(seed)
    y = labels.loc[list(ids)].to_numpy()
    ids_arr = np.asarray(ids)
    pos, neg = ids_arr[y == 1], ids_arr[y == 0]
    n_pos = min(len(pos), max(1 if len(pos) else 0, round(n * len(pos) / len(ids))))
    n_neg = min(len(neg), n - n_pos)
    keep = set(rng.choice(pos, n_pos, replace=False)) | set(rng.choice(neg, n_neg, replace=False))
    return [p for p in ids if p in keep]  # keep the splits' (sorted) order


def _dataset(cfg: Config, df: pd.DataFrame, ids: list[str], *, augment: Any) -> Any:
    from breastfusion.data.cache import PreprocessSpec
    from breastfusion.data.datasets import PairedDataset, SingleModalDataset

    d = cfg.data
    cache_dir = d.cache_dir or str(Path(d.manifest).resolve().parent / ".cache")
    spec = {
        "dm": PreprocessSpec(size=d.size_dm, resize="pad" if d.resize == "auto" else d.resize),
        "us": PreprocessSpec(size=d.size_us, resize="squash" if d.resize == "auto" else d.resize),
    }
    seed = cfg.optim.seed
    if d.modality == "fusion":
        return PairedDataset(df, ids, spec["dm"], spec["us"], cache_dir, augment=augment, seed=seed)
    return SingleModalDataset(
        df, ids, d.modality.upper(), spec[d.modality], cache_dir, augment=augment, seed=seed
    )


def _describe(cfg: Config, summary: dict[str, Any]) -> str:
    unit = "pairs" if cfg.data.modality == "fusion" else "images"
    excluded = summary["excluded_patients"]
    note = f"; {excluded} patient(s) left out for a missing modality" if excluded else ""
    return (
        f"fold {cfg.data.fold} ({cfg.data.modality}): {summary['train_patients']} training / "
        f"{summary['val_patients']} validation patients, {summary['train_samples']} / "
        f"{summary['val_samples']} {unit}{note}"
    )


def _patient_predictions(
    result: Any, model: Any, data: FoldData, cfg: Config, device: Any
) -> pd.DataFrame:
    """One row per validation patient from the best epoch's per-sample scores."""
    from breastfusion.engine.loop import evaluate
    from breastfusion.evaluate.metrics import patient_scores

    per_sample = result.val_predictions
    if per_sample is None:  # resumed run: the best epoch's scores were not kept in memory
        per_sample = evaluate(
            model, data.val_loader, device if device is not None else cfg.train.device
        )
    patients = patient_scores(per_sample, source=f"fold {cfg.data.fold} validation")
    return patients[["patient_id", "y_true", "y_score"]].reset_index(drop=True)


def _write_outputs(
    out: Path, cfg: Config, model: Any, predictions: pd.DataFrame, metrics: dict[str, Any]
) -> None:
    from breastfusion.engine.checkpoint import save_checkpoint

    atomic_write_text(out / PREDICTIONS_NAME, predictions.to_csv(index=False))
    save_checkpoint(out / MODEL_NAME, model, cfg.to_dict(), meta={"metrics": metrics})
    atomic_write_json(out / METRICS_NAME, metrics)  # last: marks the fold as finished
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
