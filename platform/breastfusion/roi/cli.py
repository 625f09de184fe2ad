"""``breastfusion roi train|crop``: the ultrasound lesion detector from the command line.

Thin: map flags onto the study's settings keys (``roi.train.*``, ``roi.crop.*``), load the
manifest (and splits), call :mod:`breastfusion.roi.train` / :mod:`breastfusion.roi.crop`,
print. Library errors name settings keys; this face adds the flag that set them. Ultralytics
is imported only when a command runs, and only through ``roi.yolo`` after its offline set-up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from breastfusion.errors import UserError
from breastfusion.roi.settings import FALLBACKS, CropSettings, DetectorTrainSettings

TRAIN_FLAGS = {
    "roi.train.epochs": "--epochs",
    "roi.train.imgsz": "--imgsz",
    "roi.train.batch": "--batch",
    "roi.train.weights": "--weights",
    "roi.train.seed": "--seed",
    "roi.train.val_fraction": "--val-fraction",
    "roi.train.patience": "--patience",
    "data.allow_outside": "--allow-outside",
}
CROP_FLAGS = {
    "roi.crop.margin": "--margin",
    "roi.crop.fallback": "--fallback",
    "roi.crop.conf": "--conf",
    "roi.crop.iou": "--iou",
    "roi.crop.centre_fraction": "--centre-fraction",
    "roi.train.imgsz": "--imgsz",
    "detector weights": "--weights",
    "crop batch size": "--batch",
    "data.allow_outside": "--allow-outside",
}


@contextlib.contextmanager
def flags_named(flags: dict[str, str]) -> Iterator[None]:
    """Re-raise user errors with the flag after each settings key they name."""
    try:
        yield
    except UserError as exc:
        message = str(exc)
        for key, flag in sorted(flags.items(), key=lambda kv: -len(kv[0])):
            for end in (" ", ":", ";", ","):
                if f"{key}{end}" in message:
                    message = message.replace(f"{key}{end}", f"{key} ({flag}){end}", 1)
                    break
        if message == str(exc):
            raise
        raise type(exc)(message) from None


def _given(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@click.group("roi")
def roi_group() -> None:
    """Ultrasound lesion ROI: train a YOLOv8 detector on manifest boxes, then crop."""


_T = DetectorTrainSettings()
_C = CropSettings()
_allow_outside = click.option(
    "--allow-outside",
    is_flag=True,
    help="Accept image paths outside the manifest's folder ('..', absolute paths, symbolic "
    "links leading elsewhere); the study key is data.allow_outside.",
)


@roi_group.command("train")
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--splits",
    "splits",
    type=click.Path(dir_okay=False),
    help="Splits JSON: its holdout patients are never used by the detector.",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--epochs", type=int, help=f"roi.train.epochs [default: {_T.epochs}]")
@click.option("--imgsz", type=int, help=f"roi.train.imgsz [default: {_T.imgsz}]")
@click.option("--batch", type=int, help=f"roi.train.batch [default: {_T.batch}]")
@click.option(
    "--weights",
    help="roi.train.weights: 'none' (build from yolov8n.yaml, the default) or a local .pt "
    "file to fine-tune; never downloaded, loaded without running code from the file.",
)
@click.option("--seed", type=int, help=f"roi.train.seed [default: {_T.seed}]")
@click.option(
    "--val-fraction",
    type=float,
    help="roi.train.val_fraction: share of development patients held out to validate the "
    f"detector [default: {_T.val_fraction}]",
)
@click.option("--patience", type=int, help=f"roi.train.patience [default: {_T.patience}]")
@click.option("--device", default=None, help="'cpu', '0', '0,1' … (default: GPU if available).")
@click.option("--plots/--no-plots", default=False, show_default=True)
@_allow_outside
def train_command(
    manifest: str,
    splits: str | None,
    out: str,
    device: str | None,
    plots: bool,
    allow_outside: bool,
    **flags: Any,
) -> None:
    """Train the lesion detector on development patients' US boxes.

    Holdout patients (from --splits) are never used. Development patients are split by
    patient into detector-train and detector-validation; metrics.json reports mAP50,
    mAP50-95, precision and recall on the validation slice and states the policy (boxes of
    cross-validation fold patients are seen by the detector: they are annotations, not labels).
    One line per epoch shows progress, elapsed time and an estimate of the time left.
    """
    from breastfusion.data.manifest import load_manifest
    from breastfusion.roi.train import format_progress, train_detector

    with flags_named(TRAIN_FLAGS):
        settings = DetectorTrainSettings.from_dict(_given(**flags))
        df = load_manifest(manifest, allow_outside=allow_outside)
        holdout = None
        source = {"manifest": manifest}
        if splits:
            from breastfusion.data.splits import load_splits

            holdout = list(load_splits(splits, df).holdout)
            source["splits"] = splits
        metrics = train_detector(
            df,
            out,
            settings,
            holdout=holdout,
            device=device,
            plots=plots,
            source=source,
            progress=lambda p: click.echo(format_progress(p)),
        )
    n = metrics["n_images"]
    scores = ", ".join(
        f"{k} {_num(metrics[k])}" for k in ("mAP50", "mAP50-95", "precision", "recall")
    )
    click.echo(
        f"detector trained on {n['train']} images, validated on {n['val']} "
        f"({metrics['n_patients']['excluded_holdout']} holdout patients excluded): {scores}"
    )
    # The bundle `final --detector` and `predict` read: these weights with the default crop
    # rule (a study writes its own, with its roi.crop settings).
    from breastfusion.roi.bundle import export_detector

    bundle = export_detector(
        Path(out) / "bundle", Path(out) / "weights" / "best.pt", settings, _C, metrics
    )
    click.echo(
        f"wrote {Path(out) / 'weights' / 'best.pt'}, {Path(out) / 'metrics.json'} and the "
        f"detector bundle {bundle.parent} (crop rule: roi.crop defaults)"
    )


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@roi_group.command("crop")
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--weights",
    default=None,
    help="Trained detector (.pt), loaded without running code from the file. Optional only "
    "with --use-boxes when every US row has a box.",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--conf", type=float, help=f"roi.crop.conf [default: {_C.conf}]")
@click.option("--iou", type=float, help=f"roi.crop.iou [default: {_C.iou}]")
@click.option(
    "--margin",
    type=float,
    help="roi.crop.margin: context added on each side, as a fraction of the box's "
    f"width/height [default: {_C.margin}]",
)
@click.option(
    "--fallback",
    type=click.Choice(FALLBACKS),
    help="roi.crop.fallback: when nothing is detected, centre crop, whole image, or drop the "
    f"row (warned) [default: {_C.fallback}]",
)
@click.option(
    "--use-boxes",
    is_flag=True,
    help="Crop around the manifest's box where a row has one (trusted annotations).",
)
@click.option(
    "--centre-fraction",
    type=float,
    help=f"roi.crop.centre_fraction [default: {_C.centre_fraction}]",
)
@click.option(
    "--splits",
    type=click.Path(dir_okay=False),
    help="Splits JSON: adds IoU statistics on holdout patients (never seen by the detector).",
)
@click.option("--imgsz", default=None, type=int, help="Detection size (default: training size).")
@click.option("--batch", default=16, show_default=True, type=int)
@click.option("--device", default=None)
@_allow_outside
def crop_command(
    manifest: str,
    weights: str | None,
    out: str,
    use_boxes: bool,
    splits: str | None,
    imgsz: int | None,
    batch: int,
    device: str | None,
    allow_outside: bool,
    **flags: Any,
) -> None:
    """Detect the lesion on each US image, crop it with a margin, write OUT/manifest.csv.

    US rows point to the crops and carry roi_source (detected | box | fallback) and
    roi_confidence; DM rows are linked into OUT/dm. OUT/crops.csv records each raw detection,
    OUT/roi_summary.json the counts per source, the no-detection share, the mean confidence
    and the IoU against manifest boxes; a no-detection share above 20% is warned about.
    """
    with flags_named(CROP_FLAGS):
        result = _crop(
            manifest, weights, out, use_boxes, splits, imgsz, batch, device, allow_outside, flags
        )
    for line in result.summary.lines():
        click.echo(line)
    click.echo(f"wrote {result.manifest}, {result.crops_csv.name}, {result.summary_json.name}")


def _crop(
    manifest: str,
    weights: str | None,
    out: str,
    use_boxes: bool,
    splits: str | None,
    imgsz: int | None,
    batch: int,
    device: str | None,
    allow_outside: bool,
    flags: dict[str, Any],
) -> Any:
    import tempfile

    from breastfusion.data.manifest import load_manifest
    from breastfusion.roi.crop import crop_manifest

    settings = CropSettings.from_dict(_given(**flags))
    df = load_manifest(manifest, allow_outside=allow_outside)
    holdout = None
    if splits:
        from breastfusion.data.splits import load_splits

        holdout = list(load_splits(splits, df).holdout)
    use_weights = weights is not None and weights.strip().lower() not in {"", "none"}
    with tempfile.TemporaryDirectory(prefix="breastfusion-roi-") as scratch:
        detector = None
        if use_weights:
            from breastfusion.roi.yolo import YoloDetector

            detector = YoloDetector(weights, settings, imgsz=imgsz, device=device, work_dir=scratch)
        return crop_manifest(
            df,
            out,
            detector,
            settings,
            use_boxes=use_boxes,
            batch=batch,
            holdout=holdout,
            source_manifest=manifest,
            weights=weights if use_weights else None,
        )
