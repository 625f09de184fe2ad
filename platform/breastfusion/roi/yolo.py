"""YOLOv8 lesion detector for ultrasound: export a YOLO data set, train, detect.

This is the only module that imports ultralytics, and it does so lazily, inside
:func:`import_ultralytics`, after :func:`configure_offline` has switched off everything that
would reach the network or the user's home folder. Exporting the data set needs neither torch
nor ultralytics, so it is tested on its own.

Offline switches (ultralytics 8.4 reads most of them once, at import):

- ``YOLO_OFFLINE=1``: skips the DNS look-ups of ``one.one.one.one``/``dns.google`` at import,
  which also disables telemetry (``events``) and hub/platform uploads.
- ``YOLO_AUTOINSTALL=0``: never ``pip install`` a missing extra.
- ``YOLO_CONFIG_DIR``: the settings file and fonts. Honoured when the user sets it; otherwise
  a private cache folder ``<tempdir>/breastfusion-<uid>/ultralytics`` (never ``~/.config``).
  Ultralytics fixes this folder at import, once per process, so it cannot live in a per-run
  output folder that may later be renamed or deleted.
- ``MPLCONFIGDIR`` (unless set): matplotlib's font cache, which ultralytics' import would
  otherwise write to ``~/.cache/matplotlib``.
- ``YOLO_VERBOSE`` (unless set): False, so ultralytics logs errors only; progress is logged
  by this module through ``logging`` instead (``-vv`` turns ultralytics' own output on).
- A font: matplotlib's DejaVuSans.ttf copied to ``Arial.ttf``/``Arial.Unicode.ttf`` in the
  config folder, because ultralytics' data-set check looks for Arial there and otherwise
  ``requests.head``-s a GitHub URL even when offline.
- Settings (``settings.update``): ``sync``, ``raytune``, ``mlflow``, ``comet``, ``clearml``,
  ``dvc``, ``wandb``, ``tensorboard``, ``vscode_msg``, ``openvino_msg`` off; ``api_key``
  empty; ``runs_dir``/``datasets_dir``/``weights_dir`` inside the config folder. ``raytune``
  matters when Ray is installed: its callback warns outside a Tune trial.
- ``ULTRALYTICS_API_KEY`` is removed from this process's environment (it would enable
  platform uploads).
- Per call: ``project=``/``name=`` inside our output folder (never ``./runs``), ``amp=False``
  (ultralytics' AMP check downloads ``yolo26n.pt`` on GPUs), ``workers=0`` by default, and
  weights only from existing local files (a bare name like ``yolov8n.pt`` would download).

Detector training policy (patient-level; :data:`DETECTOR_POLICY` is written to
``metrics.json``): see :func:`plan_detector_patients`.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import ConfigError, ManifestError, UserError
from breastfusion.io import atomic_dir, dumps_json
from breastfusion.roi.crop import (
    BOX_COLUMNS,
    Detection,
    row_box,
    safe_name,
    save_png,
    to_uint8,
)

logger = logging.getLogger(__name__)

CLASS_NAME = "lesion"
# Settings that would phone home, upload, or hook third-party loggers into training.
_SETTINGS_OFF = (
    "sync",
    "hub",
    "raytune",
    "mlflow",
    "comet",
    "clearml",
    "dvc",
    "wandb",
    "tensorboard",
    "vscode_msg",
    "openvino_msg",
)

DETECTOR_POLICY: dict[str, str] = {
    "classes": (
        f"one class, '{CLASS_NAME}': the detector localises lesions and never sees benign/"
        "malignant labels"
    ),
    "train": "development patients (not in the holdout) with US boxes, minus the detector-"
    "validation slice",
    "validation": "a seeded, label-stratified slice of development patients (--val-fraction); "
    "ultralytics also selects best.pt on it, so its metrics are mildly optimistic",
    "holdout": "holdout patients are never used: not for training, validation or metrics, so "
    "their crops come from a detector that has never seen them",
    "evaluation_folds": "cross-validation fold patients are development patients, so their "
    "boxes are in the detector's training data. Boxes are localisation annotations, not the "
    "benign/malignant labels, so no label leaks; but crops of fold-validation patients may be "
    "slightly better localised than crops of unseen patients, which can make fold estimates "
    "mildly optimistic about ROI quality. Holdout estimates are unaffected. Removing this "
    "would need one detector per fold (K times the cost).",
}


# ------------------------------------------------------------------------ offline set-up


def default_config_dir() -> Path:
    """Where ultralytics keeps settings and fonts: ``$YOLO_CONFIG_DIR`` if the user set it,
    else a private cache folder under the system temp dir (not the home folder)."""
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"breastfusion-{uid}" / "ultralytics"


def configure_offline(config_dir: str | os.PathLike | None = None) -> Path:
    """Set the environment so that a later ``import ultralytics`` stays offline and quiet.

    Returns ultralytics' config folder (``YOLO_CONFIG_DIR``; ultralytics adds ``Ultralytics/``).
    Safe to call repeatedly; has no effect on env-driven switches if ultralytics is already
    imported (the settings and font are still applied by :func:`import_ultralytics`).
    """
    base = Path(config_dir) if config_dir is not None else default_config_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ["YOLO_CONFIG_DIR"] = str(base)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    verbose = logging.getLogger("breastfusion").isEnabledFor(logging.DEBUG)
    os.environ.setdefault("YOLO_VERBOSE", "True" if verbose else "False")
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    if os.environ.pop("ULTRALYTICS_API_KEY", None):
        logger.warning("ULTRALYTICS_API_KEY ignored: breastfusion keeps ultralytics offline")
    _install_font(base / "Ultralytics")
    return base


def _install_font(folder: Path) -> None:
    """Put a font where ultralytics looks first, so it never tries to download Arial."""
    targets = [folder / "Arial.ttf", folder / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    folder.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if not target.exists():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def import_ultralytics() -> Any:
    """Import ultralytics offline and switch off its integrations; returns the module."""
    configure_offline(os.environ.get("YOLO_CONFIG_DIR") or None)
    import ultralytics
    from ultralytics.utils import USER_CONFIG_DIR

    settings = ultralytics.settings
    root = Path(USER_CONFIG_DIR)
    # If someone imported ultralytics before us, its config folder is wherever they chose.
    _install_font(root)
    update: dict[str, Any] = {k: False for k in _SETTINGS_OFF if k in settings.defaults}
    update.update(
        api_key="",
        runs_dir=str(root / "runs"),
        datasets_dir=str(root / "datasets"),
        weights_dir=str(root / "weights"),
    )
    update = {k: v for k, v in update.items() if k in settings.defaults}
    if any(settings.get(k) != v for k, v in update.items()):
        settings.update(update)
    return ultralytics


def _load_model(weights: str | os.PathLike | None) -> Any:
    """A YOLO model from ``yolov8n.yaml`` (no weights) or from an existing local file."""
    if weights is None or str(weights).lower() in {"", "none"}:
        return import_ultralytics().YOLO("yolov8n.yaml", task="detect")
    path = Path(weights).expanduser()
    if not path.is_file():
        # A bare name such as "yolov8n.pt" would make ultralytics download it.
        raise UserError(
            f"--weights {weights}: no such file; breastfusion never downloads weights, give a "
            "local .pt (or .yaml) file, or 'none' to train from yolov8n.yaml"
        )
    return import_ultralytics().YOLO(str(path.resolve()), task="detect")


# ------------------------------------------------------------------- patients and export


@dataclass(frozen=True)
class DetectorPatients:
    """Which patients' boxes train and validate the detector, and which are kept out."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    excluded_holdout: tuple[str, ...]
    splits_used: bool


def box_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The US rows of a loaded manifest that carry a complete box."""
    if not all(c in df.columns for c in BOX_COLUMNS):
        return df.iloc[0:0]
    us = df[df["modality"].astype(str).str.upper().eq("US")]
    return us[us[list(BOX_COLUMNS)].notna().all(axis=1)]


def plan_detector_patients(
    df: pd.DataFrame,
    holdout: Sequence[str] = (),
    *,
    splits_used: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DetectorPatients:
    """Split the patients with US boxes into detector-train and detector-validation sets.

    Holdout patients are removed first and never used. The remaining (development) patients
    are split by patient, stratified by the patient's label so both sets hold benign and
    malignant lesions (their appearance differs), with a seeded permutation of sorted ids so
    the split does not depend on manifest order. See :data:`DETECTOR_POLICY`.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    rows = box_rows(df)
    if rows.empty:
        raise ManifestError(
            "no US rows with a complete box (box_x0, box_y0, box_x1, box_y1) in the manifest: "
            "the detector has nothing to learn from"
        )
    held = {str(p) for p in holdout}
    patients = rows.groupby(rows["patient_id"].astype(str))["y"].max()
    excluded = tuple(sorted(p for p in patients.index if p in held))
    dev = patients[~patients.index.isin(held)]
    if len(dev) < 2:
        raise UserError(
            f"only {len(dev)} development patient(s) have US boxes; the detector needs at "
            "least 2 (one to train, one to validate)"
        )
    rng = np.random.default_rng(seed)
    n_val_total = min(max(1, round(val_fraction * len(dev))), len(dev) - 1)
    groups = {c: sorted(dev.index[dev == c]) for c in sorted(dev.unique())}
    # Largest-remainder allocation of the validation slots over the classes.
    quotas = {c: n_val_total * len(g) / len(dev) for c, g in groups.items()}
    alloc = {c: int(q) for c, q in quotas.items()}
    for c in sorted(quotas, key=lambda c: (alloc[c] - quotas[c], c))[
        : n_val_total - sum(alloc.values())
    ]:
        alloc[c] += 1
    val: list[str] = []
    for c, ids in groups.items():
        perm = rng.permutation(len(ids))
        val.extend(ids[j] for j in perm[: alloc[c]])
    val_set = set(val)
    train = tuple(sorted(p for p in dev.index if p not in val_set))
    return DetectorPatients(train, tuple(sorted(val_set)), excluded, splits_used)


@dataclass(frozen=True)
class ExportSummary:
    data_yaml: Path
    n_images: dict[str, int]
    n_boxes: dict[str, int]
    n_patients: dict[str, int]


def yolo_label(box: Sequence[float], width: int, height: int) -> tuple[float, ...] | None:
    """A pixel box as YOLO's normalised (cx, cy, w, h), clipped to the image; None if empty."""
    x0, x1 = sorted((float(box[0]), float(box[2])))
    y0, y1 = sorted((float(box[1]), float(box[3])))
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)


def export_yolo_dataset(
    df: pd.DataFrame, out_dir: str | os.PathLike, patients: DetectorPatients
) -> ExportSummary:
    """Write ``images/{train,val}``, ``labels/{train,val}``, ``data.yaml`` and ``patients.json``.

    Images are our reader's min-max normalised grey as 8-bit PNG, whatever the source format
    (16-bit, DICOM, RGB), so the detector sees exactly what ``roi crop`` feeds it. Rows that
    share an image (several lesions) become one image with several label lines. ``data.yaml``
    uses paths relative to itself, so the folder can be moved.
    """
    from breastfusion.data.imaging import load_normalised

    out = Path(out_dir)
    rows = box_rows(df)
    where = {p: "train" for p in patients.train} | {p: "val" for p in patients.val}
    n_images = {"train": 0, "val": 0}
    n_boxes = {"train": 0, "val": 0}
    for part in ("train", "val"):
        (out / "images" / part).mkdir(parents=True, exist_ok=True)
        (out / "labels" / part).mkdir(parents=True, exist_ok=True)
    for abs_path, group in rows.groupby("abs_path", sort=True):
        pids = set(group["patient_id"].astype(str))
        if len(pids) > 1:
            raise ManifestError(
                f"{abs_path}: one image listed for several patients ({', '.join(sorted(pids))})"
            )
        part = where.get(pids.pop())
        if part is None:  # holdout patient, or not planned
            continue
        first = group.sort_values("row").iloc[0]
        image = to_uint8(load_normalised(abs_path))
        height, width = image.shape
        lines = []
        for _, r in group.sort_values("row").iterrows():
            label = yolo_label(row_box(r), width, height)  # type: ignore[arg-type]
            if label is None:
                raise ManifestError(
                    f"row {int(r['row'])} (patient {r['patient_id']}): box "
                    f"{tuple(r[c] for c in BOX_COLUMNS)} lies outside the "
                    f"{width}x{height} image {abs_path}"
                )
            lines.append("0 " + " ".join(f"{v:.6f}" for v in label))
        stem = f"{safe_name(first['patient_id'])}_r{int(first['row'])}"
        save_png(image, out / "images" / part / f"{stem}.png")
        (out / "labels" / part / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        n_images[part] += 1
        n_boxes[part] += len(lines)
    data_yaml = out / "data.yaml"
    # No 'path:' key: ultralytics then resolves train/val against the yaml's own folder.
    data_yaml.write_text(
        "# YOLO data set exported by breastfusion roi train\n"
        f"train: images/train\nval: images/val\nnc: 1\nnames:\n  0: {CLASS_NAME}\n",
        encoding="utf-8",
    )
    record = {
        "train": list(patients.train),
        "val": list(patients.val),
        "excluded_holdout": list(patients.excluded_holdout),
        "splits_used": patients.splits_used,
        "policy": DETECTOR_POLICY,
    }
    (out / "patients.json").write_text(dumps_json(record), encoding="utf-8")
    return ExportSummary(
        data_yaml,
        n_images,
        n_boxes,
        {"train": len(patients.train), "val": len(patients.val)},
    )


# ------------------------------------------------------------------------------ training


def train_detector(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    holdout: Sequence[str] | None = None,
    epochs: int = 300,
    imgsz: int = 640,
    batch: int = 8,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    device: str | None = None,
    workers: int = 0,
    patience: int = 100,
    plots: bool = False,
    source: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Export the boxes, train YOLOv8 and write ``weights/best.pt`` and ``metrics.json``.

    ``holdout`` is the splits file's holdout (None: no splits given; every patient with boxes
    is treated as development, and a warning says nothing is protected). The whole ``out_dir``
    is built under a temporary name and replaces ``out_dir`` only when training finished.
    Returns the metrics dict. Defaults are the study's (300 epochs, 640 px, batch 8).
    """
    for name, value in (("--epochs", epochs), ("--imgsz", imgsz), ("--batch", batch)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if holdout is None:
        logger.warning(
            "no --splits given: the detector trains on every patient with boxes; crops of "
            "any later holdout patients would come from a detector that has seen them"
        )
    patients = plan_detector_patients(
        df,
        holdout or (),
        splits_used=holdout is not None,
        val_fraction=val_fraction,
        seed=seed,
    )
    out_dir = Path(out_dir).absolute()
    model = _load_model(weights)  # fails fast on a missing weights file, before any export
    with atomic_dir(out_dir, owned_marker="metrics.json") as tmp:
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
        model.add_callback("on_fit_epoch_end", _progress_callback(epochs))
        result = model.train(
            data=str(export.data_yaml),
            epochs=epochs,
            imgsz=imgsz,
            batch=batch,
            seed=seed,
            deterministic=True,
            device=device,
            workers=workers,
            amp=False,
            patience=patience,
            plots=plots,
            project=str(tmp),
            name="yolo",
            exist_ok=True,
            verbose=False,
            flipud=0.5,  # the study enlarged its US training set x4 with both flips
            single_cls=True,
        )
        trainer = model.trainer
        best = Path(trainer.best if Path(trainer.best).is_file() else trainer.last)
        (tmp / "weights").mkdir()
        shutil.copyfile(best, tmp / "weights" / "best.pt")
        metrics = _metrics(result, trainer)
        metrics.update(
            n_images=export.n_images,
            n_boxes=export.n_boxes,
            n_patients={**export.n_patients, "excluded_holdout": len(patients.excluded_holdout)},
            evaluated_on="detector-validation slice of development patients (see policy)",
            policy=DETECTOR_POLICY,
            splits_used=patients.splits_used,
            params={
                "epochs": epochs,
                "imgsz": imgsz,
                "batch": batch,
                "weights": str(weights) if weights else "none (yolov8n.yaml)",
                "seed": seed,
                "val_fraction": val_fraction,
                "patience": patience,
                "device": str(trainer.device),
            },
            ultralytics_version=_ultralytics_version(),
            **(source or {}),
        )
        (tmp / "metrics.json").write_text(dumps_json(metrics), encoding="utf-8")
    return metrics


def _metrics(result: Any, trainer: Any) -> dict[str, Any]:
    """The final validation of best.pt as plain floats."""
    raw = getattr(result, "results_dict", None) or dict(getattr(trainer, "metrics", {}) or {})
    keys = {
        "mAP50": "metrics/mAP50(B)",
        "mAP50-95": "metrics/mAP50-95(B)",
        "precision": "metrics/precision(B)",
        "recall": "metrics/recall(B)",
    }
    return {k: round(float(raw.get(v, float("nan"))), 6) for k, v in keys.items()}


def _progress_callback(epochs: int):
    """Log a line every ~30th of the run (ultralytics itself is silenced)."""
    every = max(1, epochs // 30)

    def on_fit_epoch_end(trainer: Any) -> None:
        epoch = trainer.epoch + 1
        # ultralytics fires this once more for the final validation of best.pt; skip that.
        if epoch <= epochs and (epoch % every == 0 or epoch == epochs):
            m = trainer.metrics or {}
            logger.info(
                "detector epoch %d/%d: mAP50 %.3f, mAP50-95 %.3f",
                epoch,
                epochs,
                float(m.get("metrics/mAP50(B)", float("nan"))),
                float(m.get("metrics/mAP50-95(B)", float("nan"))),
            )

    return on_fit_epoch_end


def _ultralytics_version() -> str:
    import ultralytics

    return str(ultralytics.__version__)


# ----------------------------------------------------------------------------- detection


class YoloDetector:
    """A trained detector as a :data:`breastfusion.roi.crop.Detector`: best box per image.

    Images are 8-bit grey H x W arrays (``crop.to_uint8`` of the min-max normalised image,
    as in training), replicated to the 3 channels YOLO expects. ``imgsz=None`` uses the size
    the weights were trained at.
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        *,
        conf: float = 0.25,
        iou: float = 0.7,
        imgsz: int | None = None,
        device: str | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        if not 0 <= conf <= 1 or not 0 <= iou <= 1:
            raise ConfigError(f"--conf and --iou must be in [0, 1], got {conf} and {iou}")
        if weights is None or str(weights).lower() in {"", "none"}:
            raise UserError("--weights: a trained detector (.pt) is needed to detect lesions")
        self.model = _load_model(weights)
        self.conf, self.iou, self.imgsz, self.device = conf, iou, imgsz, device
        # Predictions are never saved, but ultralytics still derives a run folder name:
        # point it at our own folder rather than ./runs.
        self.work_dir = Path(work_dir or default_config_dir() / "runs").absolute()

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detection | None]:
        if not images:
            return []
        arrays = [np.repeat(np.asarray(im, dtype=np.uint8)[..., None], 3, axis=2) for im in images]
        kwargs: dict[str, Any] = dict(
            conf=self.conf,
            iou=self.iou,
            device=self.device,
            batch=len(arrays),
            save=False,
            verbose=False,
            project=str(self.work_dir),
            name="predict",
            exist_ok=True,
        )
        if self.imgsz is not None:
            kwargs["imgsz"] = self.imgsz
        results = self.model.predict(arrays, **kwargs)
        found: list[Detection | None] = []
        for r in results:
            boxes = r.boxes
            if boxes is None or len(boxes) == 0:
                found.append(None)
                continue
            conf = boxes.conf.cpu().numpy()
            best = int(np.argmax(conf))
            x0, y0, x1, y1 = (float(v) for v in boxes.xyxy[best].cpu().numpy())
            found.append(Detection(x0, y0, x1, y1, float(conf[best])))
        return found
