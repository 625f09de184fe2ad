"""Train the YOLOv8 lesion detector: export the boxes, train offline, keep a tidy folder.

The output folder (``weights/best.pt``, ``metrics.json``, ``dataset/``, ``yolo/results.csv``
and ``yolo/args.yaml``) is built in a temporary sibling that is removed on every exit path,
Ctrl-C and SIGTERM included (:func:`breastfusion.roi.workdir.build_dir`). Every path it stores
is relative to the folder: ultralytics' own records (the checkpoint's ``train_args``,
``args.yaml``) name the temporary build folder, so they are rewritten, its label caches
(absolute paths, rebuilt on demand) and duplicate weight files are removed.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from breastfusion.io import dumps_json, relative_ref
from breastfusion.roi.dataset import (
    DETECTOR_POLICY,
    DetectorPatients,
    ExportSummary,
    export_yolo_dataset,
    plan_detector_patients,
)
from breastfusion.roi.settings import DetectorTrainSettings
from breastfusion.roi.workdir import build_dir
from breastfusion.roi.yolo import load_yolo, relativise, sanitise_checkpoint, ultralytics_version

logger = logging.getLogger(__name__)

_METRIC_KEYS = {
    "mAP50": "metrics/mAP50(B)",
    "mAP50-95": "metrics/mAP50-95(B)",
    "precision": "metrics/precision(B)",
    "recall": "metrics/recall(B)",
}


@dataclass(frozen=True)
class EpochProgress:
    """One finished training epoch: ``epoch`` of ``epochs`` (1-based), seconds since the
    start of training and the estimated seconds left (an upper bound: early stopping may
    end sooner), and the validation metrics (``mAP50``, ``mAP50-95``, ...; NaN if absent)."""

    epoch: int
    epochs: int
    elapsed_s: float
    eta_s: float
    metrics: dict[str, float]


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_progress(p: EpochProgress) -> str:
    """One plain line per epoch (no colour codes, no carriage returns)."""
    width = len(str(p.epochs))
    return (
        f"detector epoch {p.epoch:>{width}}/{p.epochs}  mAP50 {p.metrics['mAP50']:.3f}  "
        f"mAP50-95 {p.metrics['mAP50-95']:.3f}  elapsed {_clock(p.elapsed_s)}  "
        f"eta {_clock(p.eta_s)}"
    )


def _progress_callbacks(
    epochs: int, report: Callable[[EpochProgress], None]
) -> dict[str, Callable[[Any], None]]:
    """Ultralytics callbacks that call ``report`` once per training epoch.

    ``on_fit_epoch_end`` also fires for the final validation of best.pt (with the epoch
    counter advanced by one); only events preceded by ``on_train_epoch_end`` are epochs.
    """
    state = {"start": time.monotonic(), "pending": False}

    def on_train_start(trainer: Any) -> None:
        state["start"] = time.monotonic()

    def on_train_epoch_end(trainer: Any) -> None:
        state["pending"] = True

    def on_fit_epoch_end(trainer: Any) -> None:
        if not state["pending"]:
            return
        state["pending"] = False
        epoch = int(trainer.epoch) + 1
        total = max(int(getattr(trainer, "epochs", epochs) or epochs), epoch)
        elapsed = time.monotonic() - state["start"]
        done = epoch - int(getattr(trainer, "start_epoch", 0) or 0)
        eta = elapsed / max(done, 1) * (total - epoch)
        m = trainer.metrics or {}
        metrics = {k: float(m.get(v, float("nan"))) for k, v in _METRIC_KEYS.items()}
        report(EpochProgress(epoch, total, elapsed, eta, metrics))

    return {
        "on_train_start": on_train_start,
        "on_train_epoch_end": on_train_epoch_end,
        "on_fit_epoch_end": on_fit_epoch_end,
    }


def _log_progress(p: EpochProgress) -> None:
    logger.info("%s", format_progress(p))


def _settings(
    settings: DetectorTrainSettings | None, weights: str | os.PathLike | None, **overrides: Any
) -> DetectorTrainSettings:
    given = {k: v for k, v in overrides.items() if v is not None}
    if weights is not None:
        given["weights"] = os.fspath(weights)
    return (settings or DetectorTrainSettings()).replace(**given)


def train_detector(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    settings: DetectorTrainSettings | None = None,
    *,
    holdout: Sequence[str] | None = None,
    epochs: int | None = None,
    imgsz: int | None = None,
    batch: int | None = None,
    weights: str | os.PathLike | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    patience: int | None = None,
    device: str | None = None,
    workers: int = 0,
    plots: bool = False,
    source: dict[str, str | os.PathLike] | None = None,
    progress: Callable[[EpochProgress], None] | None = None,
) -> dict[str, Any]:
    """Export the boxes, train YOLOv8 and write ``weights/best.pt`` and ``metrics.json``.

    ``settings`` (default: the study's) may be overridden per keyword (``None``: keep).
    ``holdout`` is the splits file's holdout (None: no splits given; every patient with boxes
    is treated as development, and a warning says nothing is protected). ``source`` names
    input files for the record (stored relative to ``out_dir``). ``progress`` is called once
    per epoch (default: an INFO log line). Returns the metrics dict.
    """
    s = _settings(settings, weights, epochs=epochs, imgsz=imgsz, batch=batch, seed=seed,
                  val_fraction=val_fraction, patience=patience)  # fmt: skip
    patients = plan_detector_patients(
        df, holdout or (), splits_used=holdout is not None, val_fraction=s.val_fraction, seed=s.seed
    )
    out = Path(out_dir).absolute()
    # Fails fast on a missing or unsafe weights file, before any export.
    model = load_yolo(s.weights, what="roi.train.weights", allow_yaml=True)
    if holdout is None:
        logger.warning(
            "no splits given: the detector trains on every patient with boxes; crops of "
            "any later holdout patients would come from a detector that has seen them"
        )
    with build_dir(out, marker="metrics.json") as tmp:
        export = export_yolo_dataset(df, tmp / "dataset", patients)
        logger.info(
            "detector data: %d train / %d val images (%d / %d patients), %d holdout patients "
            "excluded",
            export.n_images["train"],
            export.n_images["val"],
            export.n_patients["train"],
            export.n_patients["val"],
            len(patients.excluded_holdout),
        )
        for event, fn in _progress_callbacks(s.epochs, progress or _log_progress).items():
            model.add_callback(event, fn)
        result = _fit(model, s, export.data_yaml, tmp, device=device, workers=workers, plots=plots)
        trainer = model.trainer
        _tidy(tmp, Path(trainer.best if Path(trainer.best).is_file() else trainer.last))
        metrics = {
            **_metrics(result, trainer),
            **_record(export, patients, s, out, source),
            "runtime": {"device": str(trainer.device), "workers": workers},
        }
        (tmp / "metrics.json").write_text(dumps_json(metrics), encoding="utf-8")
    return metrics


def _record(
    export: ExportSummary,
    patients: DetectorPatients,
    s: DetectorTrainSettings,
    out: Path,
    source: dict[str, str | os.PathLike] | None,
) -> dict[str, Any]:
    """What metrics.json says besides the scores: data, policy, settings, provenance."""
    return {
        "n_images": export.n_images,
        "n_boxes": export.n_boxes,
        "n_patients": {**export.n_patients, "excluded_holdout": len(patients.excluded_holdout)},
        "evaluated_on": "detector-validation slice of development patients (see policy)",
        "policy": DETECTOR_POLICY,
        "splits_used": patients.splits_used,
        "settings": s.to_dict() | {"weights": _ref(s.weights, out)},
        "ultralytics_version": ultralytics_version(),
        "weights_file": "weights/best.pt",
        "sources": {k: _ref(v, out) for k, v in (source or {}).items()},
    }


def _fit(
    model: Any,
    s: DetectorTrainSettings,
    data_yaml: Path,
    tmp: Path,
    *,
    device: str | None,
    workers: int,
    plots: bool,
) -> Any:
    """ultralytics' training, its run folder inside ``tmp`` (never ``./runs``)."""
    return model.train(
        data=str(data_yaml),
        epochs=s.epochs,
        imgsz=s.imgsz,
        batch=s.batch,
        seed=s.seed,
        deterministic=True,
        device=device,
        workers=workers,
        amp=False,  # its AMP check would download a model on GPUs
        patience=s.patience,
        plots=plots,
        project=str(tmp),
        name="yolo",
        exist_ok=True,
        verbose=False,
        flipud=0.5,  # the study enlarged its US training set x4 with both flips
        single_cls=True,
    )


def _ref(path: str | os.PathLike | None, out: Path) -> str | None:
    return None if path is None else relative_ref(path, out)


def _tidy(tmp: Path, best: Path) -> None:
    """Keep one clean ``weights/best.pt``; drop caches and duplicates that name ``tmp``."""
    (tmp / "weights").mkdir()
    sanitise_checkpoint(best, tmp / "weights" / "best.pt", tmp)
    shutil.rmtree(tmp / "yolo" / "weights", ignore_errors=True)
    for cache in (tmp / "dataset").rglob("*.cache"):
        cache.unlink()
    args = tmp / "yolo" / "args.yaml"
    if args.is_file():
        import yaml

        record = yaml.safe_load(args.read_text(encoding="utf-8")) or {}
        args.write_text(yaml.safe_dump(relativise(record, tmp), sort_keys=False), encoding="utf-8")


def _metrics(result: Any, trainer: Any) -> dict[str, float | None]:
    """The final validation of best.pt as plain floats at full precision (None if absent)."""
    raw = getattr(result, "results_dict", None) or dict(getattr(trainer, "metrics", {}) or {})
    out: dict[str, float | None] = {}
    for key, name in _METRIC_KEYS.items():
        value = float(raw.get(name, float("nan")))
        out[key] = value if math.isfinite(value) else None
    return out
