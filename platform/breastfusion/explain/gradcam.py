"""Grad-CAM heat maps per branch of a (fusion or single-modal) classifier.

The only module that imports ``pytorch_grad_cam``. That library calls ``model(input)`` with
one tensor, so a two-input fusion model is wrapped: :class:`BranchInput` feeds the branch being
explained from pytorch-grad-cam's tensor and holds the other branch's input fixed. One
``GradCAM`` per branch, with ``model.gradcam_target_layer(branch)`` as its only target layer:
putting both branches' layers into one ``GradCAM`` would average them into a single map,
which is not a map per modality (checked with pytorch-grad-cam 1.5). Holding the other input fixed (rather
than concatenating both inputs on channels) also lets DM and US have different sizes.

The explained output is the malignant logit (class 1): Grad-CAM then shows what pushes the
model towards "malignant", for every case category, including false negatives (where it
shows the little evidence the model found).

Case selection (:func:`select_cases`) works on patient-level holdout scores at the operating
threshold: true positives (highest scores first), false negatives (lowest scores first: the
most confidently missed cancers) and false positives (highest scores first: the most
confident false alarms). Without labels (``breastfusion predict`` on new patients) the
categories are the calls: called malignant (highest first) and called benign (lowest first).

The gallery (:func:`write_gallery`) writes, per tile, the overlay and the model's own input
image un-overlaid (``raw/``, the preprocessed grey image), so a report can show them side by
side; ``index.csv`` names both.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from breastfusion.errors import UserError
from breastfusion.io import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MALIGNANT = 1
CATEGORIES = ("true_positive", "false_negative", "false_positive")
UNLABELLED_CATEGORIES = ("called_malignant", "called_benign")
INDEX_NAME = "index.csv"
CAPTIONS_NAME = "captions.json"
RAW_DIR = "raw"  # the un-overlaid input images, beside the overlays
INDEX_COLUMNS = ["patient_id", "category", "branch", "file", "raw_file", "score"]
_LABELS = {
    "true_positive": "TP",
    "false_negative": "FN",
    "false_positive": "FP",
    "called_malignant": "called malignant",
    "called_benign": "called benign",
}


# -- the wrapper and the maps -------------------------------------------------------------------


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The model's inputs in call order: ("dm", "us") for fusion, (modality,) otherwise."""
    names = getattr(model, "input_names", None)
    if names is None:
        names = tuple(model.branches.keys())  # type: ignore[union-attr]
    return tuple(names)


def target_layers(model: nn.Module, branch: str) -> list[nn.Module]:
    """Grad-CAM target layer(s) of ``branch``: one per model (several for an ensemble)."""
    if hasattr(model, "gradcam_target_layers"):
        return list(model.gradcam_target_layers(branch))
    return [model.gradcam_target_layer(branch)]  # type: ignore[operator]


class BranchInput(nn.Module):
    """``model`` seen as a one-input network of ``branch``; the other inputs are held fixed.

    ``fixed`` maps every other input name to a tensor whose batch size matches the explained
    input's (pytorch-grad-cam passes the whole batch at once).
    """

    def __init__(self, model: nn.Module, branch: str, fixed: Mapping[str, torch.Tensor]):
        super().__init__()
        self.model = model
        self.branch = branch
        self.names = input_names(model)
        if branch not in self.names:
            raise UserError(f"model has no branch {branch!r}; branches: {', '.join(self.names)}")
        self.fixed = {k: v for k, v in fixed.items() if k != branch}
        missing = [n for n in self.names if n != branch and n not in self.fixed]
        if missing:
            raise ValueError(f"BranchInput: no fixed input for branch(es) {missing}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = [x if name == self.branch else self.fixed[name] for name in self.names]
        return self.model(*args)


def gradcam_maps(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    branches: Sequence[str] | None = None,
    target_class: int = MALIGNANT,
) -> dict[str, np.ndarray]:
    """Grad-CAM of ``target_class`` per branch: ``{branch: (B, H, W) float32 in [0, 1]}``.

    ``inputs`` holds one (B, 1, H, W) tensor per model input (all on the model's device); each
    map has its branch's input size. The model is put in eval mode (BatchNorm statistics,
    no dropout), as at inference.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    out: dict[str, np.ndarray] = {}
    for branch in branches or input_names(model):
        x = inputs[branch]
        wrapper = BranchInput(model, branch, {k: v.detach() for k, v in inputs.items()})
        targets = [ClassifierOutputTarget(target_class) for _ in range(x.shape[0])]
        with GradCAM(model=wrapper, target_layers=target_layers(model, branch)) as cam:
            out[branch] = np.asarray(cam(input_tensor=x.detach(), targets=targets), np.float32)
    return out


# -- picture making ----------------------------------------------------------------------------


def overlay(image: np.ndarray, heat: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """An RGB uint8 picture: the grey image under a jet-coloured heat map (both H×W in [0, 1])."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    grey = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return show_cam_on_image(rgb, np.clip(heat, 0.0, 1.0), use_rgb=True, image_weight=image_weight)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- case selection and the gallery --------------------------------------------------------------


def select_cases(predictions: pd.DataFrame, threshold: float, n: int) -> pd.DataFrame:
    """Up to ``n`` patients per category (``CATEGORIES``) at ``threshold`` (score >= → malignant).

    ``predictions``: one row per patient (``patient_id, y_true, y_score``). Returns
    ``patient_id, category, y_true, y_score``, categories in ``CATEGORIES`` order.
    """
    df = predictions[["patient_id", "y_true", "y_score"]].copy()
    called = df["y_score"] >= threshold
    masks = {
        "true_positive": (df["y_true"] == 1) & called,
        "false_negative": (df["y_true"] == 1) & ~called,
        "false_positive": (df["y_true"] == 0) & called,
    }
    # Most telling cases first; patient id breaks ties so the choice is repeatable.
    descending = {"true_positive": True, "false_negative": False, "false_positive": True}
    parts = []
    for category in CATEGORIES:
        sub = df[masks[category]].sort_values("patient_id")
        sub = sub.sort_values("y_score", ascending=not descending[category], kind="stable")
        parts.append(sub.head(max(n, 0)).assign(category=category))
    picked = pd.concat(parts, ignore_index=True)
    return picked[["patient_id", "category", "y_true", "y_score"]]


def select_unlabelled(predictions: pd.DataFrame, threshold: float, n: int) -> pd.DataFrame:
    """Up to ``n`` patients per call (``UNLABELLED_CATEGORIES``) when there are no labels:
    called malignant (highest scores first) and called benign (lowest first)."""
    df = predictions[["patient_id", "y_score"]].copy()
    called = df["y_score"] >= threshold
    parts = []
    for category, mask, descending in (
        ("called_malignant", called, True),
        ("called_benign", ~called, False),
    ):
        sub = df[mask].sort_values("patient_id")
        sub = sub.sort_values("y_score", ascending=not descending, kind="stable")
        parts.append(sub.head(max(n, 0)).assign(category=category))
    picked = pd.concat(parts, ignore_index=True).assign(y_true=np.nan)
    return picked[["patient_id", "category", "y_true", "y_score"]]


def _labelled(predictions: pd.DataFrame) -> bool:
    return "y_true" in predictions.columns and bool(predictions["y_true"].notna().all())


def first_sample_of(dataset: Any, patient_ids: Sequence[str]) -> dict[str, int]:
    """Index of each patient's first sample (image or US×DM pair) in a breastfusion dataset."""
    wanted = set(patient_ids)
    found: dict[str, int] = {}
    for i, pid in enumerate(dataset.sample_patient_ids):
        if pid in wanted and pid not in found:
            found[pid] = i
    return found


def write_gallery(
    model: nn.Module,
    dataset: Any,
    predictions: pd.DataFrame,
    threshold: float,
    out_dir: str | Path,
    *,
    per_category: int = 3,
    device: str | torch.device = "cpu",
) -> pd.DataFrame:
    """Overlays for chosen patients, one PNG per (patient, branch), the un-overlaid input
    beside each (``raw/``), plus an index.

    ``dataset``: the (unaugmented) dataset the predictions came from; each patient is shown
    with its first image (or US×DM pair). ``predictions`` without labels (``y_true`` missing
    or empty) are grouped by call (:func:`select_unlabelled`). Writes
    ``<out_dir>/<category>_<patient>_<branch>.png``, ``raw/<same name>``, ``index.csv``
    (``INDEX_COLUMNS``) and ``captions.json`` (for the report). Returns the index.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _labelled(predictions):
        cases = select_cases(predictions, threshold, per_category)
    else:
        cases = select_unlabelled(predictions, threshold, per_category)
    where = first_sample_of(dataset, cases["patient_id"].tolist())
    model = model.to(device)
    rows: list[dict[str, Any]] = []
    captions: dict[str, str] = {}
    for case in cases.itertuples(index=False):
        if case.patient_id not in where:  # scored patients always have a sample; be safe
            continue
        sample = dataset[where[case.patient_id]]
        inputs = _sample_inputs(sample, input_names(model), device)
        maps = gradcam_maps(model, inputs)
        for branch, heat in maps.items():
            name = _file_name(case.category, case.patient_id, branch)
            image = inputs[branch][0, 0].detach().cpu().numpy()
            atomic_write_bytes(out / name, png_bytes(overlay(image, heat[0])))
            atomic_write_bytes(out / RAW_DIR / name, png_bytes(_grey_uint8(image)))
            rows.append(
                {
                    "patient_id": case.patient_id,
                    "category": case.category,
                    "branch": branch,
                    "file": name,
                    "raw_file": f"{RAW_DIR}/{name}",
                    "score": float(case.y_score),
                }
            )
            captions[name] = (
                f"{_LABELS[case.category]} · patient {case.patient_id} · {branch.upper()} · "
                f"score {case.y_score:.3g} (threshold {threshold:.3g})"
            )
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    atomic_write_text(out / INDEX_NAME, index.to_csv(index=False))
    atomic_write_json(out / CAPTIONS_NAME, captions)
    log.info("Grad-CAM: %d overlays for %d patients in %s", len(index), len(where), out)
    return index


def _grey_uint8(image: np.ndarray) -> np.ndarray:
    """The model's [0, 1] grey input as 8-bit (exact: the inputs are k/255)."""
    return np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def _sample_inputs(
    sample: Mapping[str, Any], names: Sequence[str], device: str | torch.device
) -> dict[str, torch.Tensor]:
    """A dataset sample's image tensor(s) as a batch of one, keyed by model input name."""
    if len(names) == 1:
        x = sample["image"] if "image" in sample else sample[names[0]]
        return {names[0]: x.unsqueeze(0).to(device)}
    return {n: sample[n].unsqueeze(0).to(device) for n in names}


def _file_name(category: str, patient_id: str, branch: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(patient_id))
    return f"{category}_{safe}_{branch}.png"
