"""``metadata.json``: the model card of a bundle — everything a user needs to feed the model,
reproduce its inputs without breastfusion, and judge it.

No patient identifiers go in (counts only) unless ``final.keep_patient_ids`` is set; no
absolute paths (file names and checksums of the training data only).
"""

from __future__ import annotations

import contextlib
import platform as _platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.final.bundle import (
    DETECTOR_DIR,
    FORMAT_ID,
    INTENDED_USE,
    ONNX_FILE,
    WEIGHTS_FILE,
)
from breastfusion.io import sha256_file

if TYPE_CHECKING:
    import pandas as pd

    from breastfusion.config import Config
    from breastfusion.engine.data import Cohort
    from breastfusion.final.operating import OperatingPoint
    from breastfusion.final.refit import Trained

_BRANCH_TEXT = {
    "dm": "whole digital mammogram (DM)",
    "us": "ultrasound (US) image: the lesion crop (see roi) of the raw image",
}


def architecture(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    pretrained = m.pretrained if m.pretrained in ("none", "imagenet") else "a weights file"
    return {
        "modality": cfg.data.modality,
        "backbone_dm": m.backbone_dm,
        "backbone_us": m.backbone_us,
        "fusion": m.fusion if cfg.data.modality == "fusion" else "none",
        "initialised_from": pretrained,
        "input_mode": m.input_mode,
        "dropout": m.dropout,
    }


def inputs(cfg: Config) -> list[dict[str, Any]]:
    out = []
    for i, b in enumerate(cfg.branches):
        size = getattr(cfg.data, f"size_{b}")
        out.append(
            {
                "name": b,
                "position": i,
                "modality": b.upper(),
                "description": _BRANCH_TEXT[b],
                "shape": ["batch", 1, size, size],
                "dtype": "float32",
                "value_range": [0.0, 1.0],
                "channels": "1 grey channel in [0, 1]; the network replicates it to RGB (or "
                "uses a 1-channel stem) and applies its normalisation itself",
            }
        )
    return out


def preprocessing(cfg: Config) -> dict[str, Any]:
    from breastfusion.engine.data import preprocess_specs

    specs = preprocess_specs(cfg)
    return {
        "branches": {b: spec.describe() for b, spec in specs.items()},
        "samples": (
            "every US × DM image pair of a patient (fusion)"
            if cfg.data.modality == "fusion"
            else f"every {cfg.data.modality.upper()} image of a patient"
        ),
        "patient_score": "mean of the calibrated log-odds of the patient's samples",
    }


def roi_section(detector: Mapping[str, Any] | None, crop: Any | None) -> dict[str, Any]:
    """How raw US images became the model's US inputs (before ``preprocessing``)."""
    if detector is None and crop is None:
        return {
            "mode": "none",
            "rule": "US images are used as given (no lesion crop): pass crops made the way "
            "the training data's were",
        }
    from breastfusion.roi.bundle import fallback_rule

    crop = detector["crop"] if detector is not None else crop
    steps = [
        "read_grey the raw US image (see preprocessing.read_grey)",
        "detector input: per-image min-max to [0, 1], then uint8(round(x * 255)), replicated "
        "to 3 channels"
        if detector is not None
        else "the manifest's box of the image",
        "crop window: " + fallback_rule(crop),
        "crop the raw intensities (not the normalised image); the crop then goes through "
        "preprocessing like any image (its own min-max)",
    ]
    section: dict[str, Any] = {
        "mode": "detect" if detector is not None else "boxes",
        "crop": crop.to_dict(),
        "rule": fallback_rule(crop),
        "steps": steps,
        "detector": DETECTOR_DIR if detector is not None else None,
    }
    if detector is not None:
        rec = detector["record"]
        section["detector_imgsz"] = rec.get("imgsz")
        section["detector_metrics"] = rec.get("metrics")
    return section


def _per_class(table: pd.DataFrame, ids: Sequence[str]) -> dict[str, Any]:
    sub = table[table["patient_id"].astype(str).isin(set(ids))]
    per_patient = sub.groupby(sub["patient_id"].astype(str))["y"].max()
    images = sub.groupby([sub["modality"].astype(str).str.upper(), "y"]).size()
    return {
        "patients": {"benign": int((per_patient == 0).sum()), "malignant": int(per_patient.sum())},
        "images": {
            mod: {"benign": int(images.get((mod, 0), 0)), "malignant": int(images.get((mod, 1), 0))}
            for mod in ("DM", "US")
        },
    }


def training_data(
    trained: Trained, cohort: Cohort, holdout_excluded: Mapping[str, str], keep_ids: bool
) -> dict[str, Any]:
    splits = cohort.splits
    out: dict[str, Any] = {
        "unit": "patient",
        "train": _per_class(cohort.table, trained.train_patients),
        "train_patients_left_out": len(trained.excluded),
        "holdout": _per_class(cohort.table, splits.holdout),
        "holdout_patients_not_scored": len(holdout_excluded),
        "n_development_patients": len(splits.development),
        "n_holdout_patients": len(splits.holdout),
        "holdout_in_training": 0,  # asserted by check_no_leak before anything is written
        "manifest": {"name": Path(cohort.manifest).name, "sha256": sha256_file(cohort.manifest)},
        "splits": {
            "name": Path(cohort.splits_path).name,
            "sha256": sha256_file(cohort.splits_path),
        },
        "splits_seed": splits.seed,
        "folds": splits.k,
    }
    if keep_ids:
        out["patient_ids"] = {
            "train": sorted(trained.train_patients),
            "holdout": sorted(splits.holdout),
            "train_left_out": dict(sorted(trained.excluded.items())),
            "holdout_not_scored": dict(sorted(holdout_excluded.items())),
        }
    return out


def model_section(trained: Trained, onnx: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "class": "breastfusion.models.ensemble.CalibratedEnsemble",
        "members": len(trained.calibrations),
        "calibrations": [c.to_dict() for c in trained.calibrations],
        "calibration_source": (
            "each member's Platt calibration, fitted on its own validation fold"
            if trained.mode == "ensemble"
            else trained.calibrations[0].note
        ),
        "weights": WEIGHTS_FILE,
        "onnx": dict(onnx) if onnx else None,
        "n_parameters": int(sum(p.numel() for p in trained.model.parameters())),
    }


def output_section() -> dict[str, Any]:
    return {
        "shape": ["batch", 2],
        "dtype": "float64",
        "meaning": "[0, c] with c = mean over members of (a_k * z_k + b_k), z_k = member k's "
        "logit[1] - logit[0]: c is the calibrated malignant log-odds",
        "score": "logits[:, 1] - logits[:, 0] (calibrated log-odds); probability = "
        "softmax(logits)[:, 1] = 1 / (1 + exp(-score))",
        "call": "malignant when score >= operating_point.threshold",
        "classes": ["benign", "malignant"],
    }


def usage(cfg: Config) -> dict[str, str]:
    args = ", ".join(cfg.branches)
    return {
        "predict": "breastfusion predict BUNDLE --manifest M.csv --out DIR",
        "onnxruntime": f"onnxruntime.InferenceSession('{ONNX_FILE}').run(None, {{...{args}}})",
        "torch": "breastfusion.final.bundle.read_bundle(BUNDLE).load_model()",
    }


def software_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape the model's numbers."""
    from importlib import metadata

    import breastfusion

    versions: dict[str, str | None] = {
        "python": sys.version.split()[0],
        "platform": _platform.platform(),
        "breastfusion": breastfusion.__version__,
    }
    for dist in ("torch", "torchvision", "numpy", "opencv-python-headless", "pillow", "pydicom",
                 "onnx", "onnxruntime", "ultralytics", "grad-cam"):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
        versions.setdefault(dist, None)
    return versions


def holdout_metrics(result: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The holdout entry of ``metrics.json`` (counts and CIs; no patient ids)."""
    return {
        "holdout": dict(result["models"][name]),
        "method": result.get("method"),
        "warnings": list(result.get("warnings") or []),
    }


def build(
    *,
    trained: Trained,
    selected: Config,
    name: str,
    op: OperatingPoint,
    result: Mapping[str, Any],
    cohort: Cohort,
    holdout_excluded: Mapping[str, str],
    roi: Mapping[str, Any],
    onnx: Mapping[str, Any] | None,
    fallbacks: Mapping[str, str],
    keep_ids: bool,
) -> dict[str, Any]:
    from breastfusion.final.export import bundle_config

    cfg = trained.config
    return {
        "format": FORMAT_ID,
        "intended_use": INTENDED_USE,
        "model_name": name,
        "mode": trained.mode,
        "architecture": architecture(cfg),
        "inputs": inputs(cfg),
        "output": output_section(),
        "model": model_section(trained, onnx),
        "operating_point": op.to_dict(),
        "preprocessing": preprocessing(cfg),
        "roi": dict(roi),
        "fallbacks": dict(fallbacks),
        "config": bundle_config(cfg).to_dict(),
        "config_hash": cfg.config_hash(),
        "selected_config_hash": selected.config_hash(),
        "metrics": holdout_metrics(result, name),
        "training_data": training_data(trained, cohort, holdout_excluded, keep_ids),
        "training": trained.training,
        "usage": usage(cfg),
        "software": software_versions(),
    }
