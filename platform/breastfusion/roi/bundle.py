"""The detector bundle: the study's own detector and crop rule, for ``predict``.

A bundle folder holds ``detector.pt`` (the YOLO weights) and ``detector.json``::

    {"format": "breastfusion-detector", "format_version": 1, "weights": "detector.pt",
     "weights_sha256": ..., "imgsz": 640, "class_name": "lesion",
     "crop": {CropSettings at full precision}, "fallback_rule": "...",
     "train": {DetectorTrainSettings}, "metrics": {"mAP50": ..., ...},
     "ultralytics_version": "8.4.x"}

``predict`` reproduces the study's crops with :func:`load_detector` and
:func:`breastfusion.roi.geometry.crop_image`::

    detector, crop = load_detector(bundle)
    raw = read_grey(path)
    found = detector([detector_image(raw)])[0]
    array, info = crop_image(raw, found, crop)

Only the bundle's two files are written (atomically); the folder may hold other exports.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import ConfigError, UserError
from breastfusion.io import atomic_write_json, ensure_dir, link_or_copy
from breastfusion.roi.dataset import CLASS_NAME
from breastfusion.roi.settings import CropSettings, DetectorTrainSettings

if TYPE_CHECKING:
    from breastfusion.roi.yolo import YoloDetector

FORMAT = "breastfusion-detector"
FORMAT_VERSION = 1
WEIGHTS_FILE = "detector.pt"
META_FILE = "detector.json"
_METRICS = ("mAP50", "mAP50-95", "precision", "recall")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fallback_rule(crop: CropSettings) -> str:
    """The crop rule in words, for people reading detector.json."""
    rule = {
        "centre": f"the central {crop.centre_fraction!r} of each side of the image",
        "whole": "the whole image",
        "drop": "no crop: the image is left out",
    }[crop.fallback]
    return (
        f"detected box (best confidence, conf >= {crop.conf!r}, NMS IoU {crop.iou!r}) widened "
        f"by {crop.margin!r} of its width/height on each side and clipped to the image; when "
        f"nothing is detected: {rule}"
    )


def export_detector(
    dest_dir: str | os.PathLike,
    weights_path: str | os.PathLike,
    train_settings: DetectorTrainSettings,
    crop_settings: CropSettings,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``dest_dir/detector.pt`` (a copy of ``weights_path``) and ``detector.json``.

    ``metrics`` is ``train_detector``'s result (its mAP50, mAP50-95, precision, recall and
    the ultralytics version are recorded). Returns the path of ``detector.json``.
    """
    weights = Path(weights_path)
    if not weights.is_file():
        raise UserError(f"{weights}: detector weights not found")
    dest = ensure_dir(dest_dir)
    link_or_copy(weights, dest / WEIGHTS_FILE)
    metrics = dict(metrics or {})
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights": WEIGHTS_FILE,
        "weights_sha256": _sha256(dest / WEIGHTS_FILE),
        "imgsz": train_settings.imgsz,
        "class_name": CLASS_NAME,
        "crop": crop_settings.to_dict(),
        "fallback_rule": fallback_rule(crop_settings),
        "train": train_settings.to_dict() | {"weights": None},
        "metrics": {k: metrics.get(k) for k in _METRICS},
        "ultralytics_version": metrics.get("ultralytics_version") or _installed_ultralytics(),
    }
    return atomic_write_json(dest / META_FILE, record)


def _installed_ultralytics() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ultralytics")
    except PackageNotFoundError:
        return None


def read_bundle(dest_dir: str | os.PathLike) -> tuple[dict[str, Any], CropSettings]:
    """Validate a bundle folder without loading the weights: (detector.json, CropSettings)."""
    folder = Path(dest_dir)
    meta = folder / META_FILE
    if not folder.is_dir():
        raise UserError(f"{folder}: no such detector bundle folder")
    if not meta.is_file():
        raise UserError(f"{meta}: not found; {folder} is not a detector bundle")
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{meta}: not a readable detector description ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{meta}: not a detector bundle (format is not {FORMAT!r})")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{meta}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise UserError(
            f"{meta}: format_version {version} is newer than this breastfusion reads "
            f"({FORMAT_VERSION}); upgrade breastfusion"
        )
    try:
        crop = CropSettings.from_dict(record.get("crop"), prefix=f"{meta}: crop")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    imgsz = record.get("imgsz")
    if isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1:
        raise UserError(f"{meta}: imgsz must be an integer >= 1, got {imgsz!r}")
    name = record.get("weights")
    if not isinstance(name, str) or name in {"", ".", ".."} or Path(name).name != name:
        raise UserError(f"{meta}: weights must name a file inside the bundle folder, got {name!r}")
    weights = folder / name
    if not weights.is_file():
        raise UserError(f"{weights}: detector weights named by {meta} not found")
    if record.get("weights_sha256") != _sha256(weights):
        raise UserError(f"{weights}: checksum does not match {meta}; the bundle was altered")
    return record, crop


def load_detector(
    dest_dir: str | os.PathLike,
    *,
    device: str | None = None,
    work_dir: str | os.PathLike | None = None,
) -> tuple[YoloDetector, CropSettings]:
    """The bundle's detector (weights loaded safely, at its training size) and crop rule."""
    record, crop = read_bundle(dest_dir)
    from breastfusion.roi.yolo import YoloDetector

    detector = YoloDetector(
        Path(dest_dir) / record["weights"],
        crop,
        imgsz=int(record["imgsz"]),
        device=device,
        work_dir=work_dir,
    )
    return detector, crop
