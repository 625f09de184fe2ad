"""The model bundle: what ``final`` exports and ``predict`` loads, and its format check.

A bundle is a self-contained, relocatable folder (every path it stores is relative to it)::

    metadata.json   format "breastfusion-model/2", the model (config, members, calibrations
                    and operating point at full precision), preprocessing, ROI step, intended
                    use, training data summary (counts only), holdout metrics with CIs
    model.pt        the state dict of models.ensemble.CalibratedEnsemble (torch.save)
    model.onnx      the same network for onnxruntime (outputs [0, calibrated log-odds])
    config.yaml     the training config (without the training data's paths)
    detector/       the US lesion detector and crop rule (``roi.bundle``), when the study
                    cropped US images with a detector

``final``'s output folder holds the bundle as ``bundle/`` next to the files that name
patients (holdout and out-of-fold predictions, Grad-CAM gallery); :func:`find_bundle`
accepts either folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastfusion.errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from breastfusion.config import Config

FORMAT = "breastfusion-model"
FORMAT_VERSION = 2
FORMAT_ID = f"{FORMAT}/{FORMAT_VERSION}"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.pt"
ONNX_FILE = "model.onnx"
NO_ONNX = (
    " (exported with final.onnx false, or a study's model that is neither the chosen one nor "
    "one of its fallbacks)"
)
CONFIG_FILE = "config.yaml"
DETECTOR_DIR = "detector"
BUNDLE_DIR = "bundle"  # inside final's output folder
INTENDED_USE = "research use only, not for diagnosis"


def build_untrained(cfg: Config) -> nn.Module:
    """The architecture of ``cfg`` with fresh weights (no pretrained download: the weights
    come from a state dict)."""
    from breastfusion.engine.fold import build_model_from_config

    return build_model_from_config(cfg.with_overrides({"model.pretrained": "none"}))


def build_module(cfg: Config, calibrations: list[tuple[float, float]]) -> nn.Module:
    """An untrained ``CalibratedEnsemble`` of ``len(calibrations)`` members of ``cfg``."""
    from breastfusion.models.ensemble import CalibratedEnsemble

    members = [build_untrained(cfg) for _ in calibrations]
    a, b = zip(*calibrations, strict=True)
    return CalibratedEnsemble(members, a, b, cfg.branches)


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder at ``path``, or ``path/bundle`` (a ``final`` output folder)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no such folder (expected a model bundle from breastfusion final)"
        )
    for candidate in (folder, folder / BUNDLE_DIR):
        if (candidate / METADATA_FILE).is_file():
            return candidate
    raise UserError(
        f"{folder / METADATA_FILE}: not found; {folder} is not a breastfusion model bundle "
        "(pass the folder breastfusion final exported, or its bundle/ folder)"
    )


def check_format(meta: Any, where: Path) -> None:
    """Refuse anything but a ``breastfusion-model/<n>`` document this version can read."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(fmt, str) or not fmt.startswith(FORMAT + "/"):
        raise UserError(f"{where}: not a breastfusion model bundle (format is {fmt!r})")
    version = fmt.rpartition("/")[2]
    if not version.isdigit():
        raise UserError(f"{where}: unknown bundle format {fmt!r}")
    if int(version) > FORMAT_VERSION:
        raise UserError(
            f"{where}: bundle format {fmt} is newer than this breastfusion reads ({FORMAT_ID}); "
            "upgrade breastfusion"
        )
    if int(version) < FORMAT_VERSION:
        raise UserError(
            f"{where}: bundle format {fmt} is older (no calibrated scores); re-export it with "
            "breastfusion final"
        )


@dataclass(frozen=True)
class Bundle:
    """A validated bundle folder (nothing heavy is loaded until asked)."""

    path: Path
    meta: dict[str, Any]

    @property
    def config(self) -> Config:
        from breastfusion.config import Config

        return Config.from_dict(self.meta["config"])

    @property
    def name(self) -> str:
        return str(self.meta.get("model_name") or self.path.name)

    @property
    def modality(self) -> str:
        return str(self.meta["architecture"]["modality"])

    @property
    def branches(self) -> tuple[str, ...]:
        return tuple(i["name"] for i in self.meta["inputs"])

    @property
    def threshold(self) -> float:
        return float(self.meta["operating_point"]["threshold"])

    @property
    def calibrations(self) -> list[tuple[float, float]]:
        return [(float(c["a"]), float(c["b"])) for c in self.meta["model"]["calibrations"]]

    @property
    def roi(self) -> dict[str, Any]:
        return dict(self.meta.get("roi") or {"mode": "none"})

    def fallback(self, modality: str) -> Path | None:
        """The single-modal bundle to score patients lacking the other modality, if named."""
        rel = (self.meta.get("fallbacks") or {}).get(modality)
        return (self.path / rel) if rel else None

    def load_model(self) -> nn.Module:
        """The ``CalibratedEnsemble`` with the bundle's weights (CPU, eval mode)."""
        model = build_module(self.config, self.calibrations)
        state = load_state(self.path / WEIGHTS_FILE)
        try:
            model.load_state_dict(state)
        except RuntimeError:
            raise UserError(
                f"{self.path / WEIGHTS_FILE}: the weights do not fit the model that "
                f"{METADATA_FILE} describes (mixed files from two bundles?)"
            ) from None
        return model.eval()

    def runner(self, backend: str = "torch", device: str | None = None) -> Any:
        from breastfusion.final.scoring import OnnxRunner, TorchRunner

        if backend == "onnxruntime":
            if not (self.path / ONNX_FILE).is_file():
                why = ((self.meta.get("model") or {}).get("onnx") or {}).get("skipped")
                raise UserError(
                    f"{self.path / ONNX_FILE}: this bundle has no ONNX model"
                    f"{f' ({why})' if why else NO_ONNX}; "
                    "use --backend torch"
                )
            return OnnxRunner(self.path / ONNX_FILE, self.branches)
        return TorchRunner(self.load_model(), device or "cpu")


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Find and validate a bundle (format, version, files); errors name the file."""
    folder = find_bundle(path)
    where = folder / METADATA_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{where}: cannot read the bundle description ({exc})") from None
    check_format(meta, where)
    for key in ("config", "model", "inputs", "operating_point", "architecture"):
        if key not in meta:
            raise UserError(f"{where}: incomplete bundle description (no {key!r})")
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder / WEIGHTS_FILE}: the bundle's weights are missing")
    return Bundle(folder, meta)


def load_state(path: Path) -> dict[str, Any]:
    """A state dict from ``torch.save``; a damaged file is explained in words."""
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):
        raise UserError(
            f"{path}: the weights file is damaged or incomplete (not a complete torch "
            "archive; a truncated copy?); copy the bundle again or re-export it"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for a damaged archive
        raise UserError(f"{path}: the weights file is damaged (torch cannot read it)") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return state
