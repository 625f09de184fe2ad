"""``breastfusion roi train|crop``: the ultrasound lesion detector from the command line.

Thin: parse, load the manifest (and splits), call :mod:`breastfusion.roi.yolo` /
:mod:`breastfusion.roi.crop`, print a summary. Ultralytics is imported only when a command
runs, and only through ``roi.yolo`` after its offline set-up.
"""

from __future__ import annotations

from pathlib import Path

import click

from breastfusion.roi.crop import FALLBACKS, ROI_SOURCES


@click.group("roi")
def roi_group() -> None:
    """Ultrasound lesion ROI: train a YOLOv8 detector on manifest boxes, then crop."""


@roi_group.command("train")
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--splits",
    "splits",
    type=click.Path(dir_okay=False),
    help="Splits JSON: its holdout patients are never used by the detector.",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--epochs", default=300, show_default=True, type=int)
@click.option("--imgsz", default=640, show_default=True, type=int)
@click.option("--batch", default=8, show_default=True, type=int)
@click.option(
    "--weights",
    default="none",
    show_default=True,
    help="'none' (build from yolov8n.yaml) or a local .pt file to fine-tune; never downloaded.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    type=float,
    help="Share of development patients held out to validate the detector.",
)
@click.option("--device", default=None, help="'cpu', '0', '0,1' … (default: GPU if available).")
@click.option("--plots/--no-plots", default=False, show_default=True)
def train_command(
    manifest: str,
    splits: str | None,
    out: str,
    epochs: int,
    imgsz: int,
    batch: int,
    weights: str,
    seed: int,
    val_fraction: float,
    device: str | None,
    plots: bool,
) -> None:
    """Train the lesion detector on development patients' US boxes.

    Holdout patients (from --splits) are never used. Development patients are split by
    patient into detector-train and detector-validation; metrics.json reports mAP50,
    mAP50-95, precision and recall on the validation slice and states the policy (boxes of
    cross-validation fold patients are seen by the detector: they are annotations, not labels).
    """
    from breastfusion.data.manifest import load_manifest
    from breastfusion.roi.yolo import train_detector

    df = load_manifest(manifest)
    holdout = None
    source = {"manifest": str(Path(manifest).absolute())}
    if splits:
        from breastfusion.data.splits import load_splits

        holdout = list(load_splits(splits, df).holdout)
        source["splits"] = str(Path(splits).absolute())
    metrics = train_detector(
        df,
        out,
        holdout=holdout,
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        weights=None if weights.lower() == "none" else weights,
        seed=seed,
        val_fraction=val_fraction,
        device=device,
        plots=plots,
        source=source,
    )
    n = metrics["n_images"]
    click.echo(
        f"detector trained on {n['train']} images, validated on {n['val']} "
        f"({metrics['n_patients']['excluded_holdout']} holdout patients excluded): "
        f"mAP50 {metrics['mAP50']:.3f}, mAP50-95 {metrics['mAP50-95']:.3f}, "
        f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f}"
    )
    click.echo(f"wrote {Path(out) / 'weights' / 'best.pt'} and {Path(out) / 'metrics.json'}")


@roi_group.command("crop")
@click.option("--manifest", "manifest", required=True, type=click.Path(dir_okay=False))
@click.option(
    "--weights",
    default=None,
    help="Trained detector (.pt). Optional only with --use-boxes when every US row has a box.",
)
@click.option("--out", "out", required=True, type=click.Path(file_okay=False))
@click.option("--conf", default=0.25, show_default=True, type=float)
@click.option("--iou", default=0.7, show_default=True, type=float)
@click.option(
    "--margin",
    default=0.1,
    show_default=True,
    type=float,
    help="Context added on each side, as a fraction of the box's width/height.",
)
@click.option(
    "--fallback",
    default="centre",
    show_default=True,
    type=click.Choice(FALLBACKS),
    help="When nothing is detected: centre crop, whole image, or drop the row (warned).",
)
@click.option(
    "--use-boxes",
    is_flag=True,
    help="Crop around the manifest's box where a row has one (trusted annotations).",
)
@click.option("--centre-fraction", default=0.6, show_default=True, type=float)
@click.option("--imgsz", default=None, type=int, help="Detection size (default: training size).")
@click.option("--batch", default=16, show_default=True, type=int)
@click.option("--device", default=None)
def crop_command(
    manifest: str,
    weights: str | None,
    out: str,
    conf: float,
    iou: float,
    margin: float,
    fallback: str,
    use_boxes: bool,
    centre_fraction: float,
    imgsz: int | None,
    batch: int,
    device: str | None,
) -> None:
    """Detect the lesion on each US image, crop it with a margin, write OUT/manifest.csv.

    US rows point to the crops and carry roi_source (detected | box | fallback) and
    roi_confidence; DM rows are kept with paths valid from OUT.
    """
    import tempfile

    from breastfusion.data.manifest import load_manifest
    from breastfusion.roi.crop import crop_manifest

    df = load_manifest(manifest)
    with tempfile.TemporaryDirectory(prefix="breastfusion-roi-") as scratch:
        detector = None
        if weights is not None and weights.lower() != "none":
            from breastfusion.roi.yolo import YoloDetector

            detector = YoloDetector(
                weights, conf=conf, iou=iou, imgsz=imgsz, device=device, work_dir=scratch
            )
        result = crop_manifest(
            df,
            out,
            detector,
            margin=margin,
            fallback=fallback,  # type: ignore[arg-type]
            use_boxes=use_boxes,
            centre_fraction=centre_fraction,
            batch=batch,
            extra_summary={
                "manifest": str(Path(manifest).absolute()),
                "weights": str(Path(weights).absolute()) if detector is not None else None,
                "conf": conf,
                "iou": iou,
            },
        )
    counts = ", ".join(f"{s} {result.counts[s]}" for s in ROI_SOURCES)
    click.echo(f"US crops by roi_source: {counts}, dropped {result.counts['dropped']}")
    click.echo(f"wrote {result.manifest}")
