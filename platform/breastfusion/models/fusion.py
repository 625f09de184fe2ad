"""Classifier heads and the single-modal / dual-branch late-fusion models.

Every model returns logits of shape (B, 2); the malignant score is
``softmax(logits, 1)[:, 1]`` (the study's softmax, applied at inference, so that training
can use ``cross_entropy`` on logits). Single-modal: ``model(x)``; fusion: ``model(dm, us)``.

Heads (registered in :mod:`breastfusion.models.registry`):

- ``single``: dropout → Linear(d, 2) on one branch's pooled features.
- ``sum`` (the study): pooled DM and US features are added element-wise → dropout → Linear
  → 2 logits. When the two backbones give different feature sizes (e.g. ResNet-18 512 and
  ResNet-50 2048) both are projected by a Linear to the smaller size first (projecting only
  one would let one modality keep its raw features while the other is learnt); with equal
  sizes there is no projection, so two ResNet-18 are exactly the study's model.
- ``concat``: features concatenated → dropout → Linear(d_dm + d_us, 2). Keeps the modalities
  apart, so the classifier can weigh them differently (sum cannot).
- ``gated``: (projected as in ``sum``) a learnt per-feature sigmoid gate from both
  modalities mixes them, ``g * f_dm + (1 - g) * f_us``: the model can lean on US for one
  patient and on DM for another, at the cost of one d×2d layer.

All models expose ``branches`` (``nn.ModuleDict`` modality → :class:`Backbone`) and
``gradcam_target_layer(branch)``; they are scriptable and traceable (checked in tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from breastfusion.errors import ConfigError
from breastfusion.models.backbones import Backbone, build_backbone
from breastfusion.models.registry import HEADS, fusion_names

NUM_CLASSES = 2
MODALITIES = ("dm", "us", "fusion")


class LinearHead(nn.Module):
    """Single-modal head: dropout → Linear(d, 2)."""

    def __init__(self, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        (dim,) = dims
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, NUM_CLASSES)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(features))


def _projections(dims: Sequence[int]) -> tuple[nn.Module, nn.Module, int]:
    """Identity when both sizes agree; otherwise Linear projections to the smaller size."""
    dim_a, dim_b = dims
    if dim_a == dim_b:
        return nn.Identity(), nn.Identity(), dim_a
    common = min(dim_a, dim_b)
    return nn.Linear(dim_a, common), nn.Linear(dim_b, common), common


class SumHead(nn.Module):
    """The study's fusion: f_dm + f_us → dropout → Linear → 2 logits."""

    def __init__(self, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_dm, self.proj_us, common = _projections(dims)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(common, NUM_CLASSES)

    def forward(self, f_dm: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.proj_dm(f_dm) + self.proj_us(f_us)))


class ConcatHead(nn.Module):
    """[f_dm, f_us] → dropout → Linear(d_dm + d_us, 2)."""

    def __init__(self, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        dim_dm, dim_us = dims
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim_dm + dim_us, NUM_CLASSES)

    def forward(self, f_dm: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.cat([f_dm, f_us], dim=1)))


class GatedHead(nn.Module):
    """g = σ(W[f_dm, f_us] + b); g·f_dm + (1 − g)·f_us → dropout → Linear → 2 logits."""

    def __init__(self, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_dm, self.proj_us, common = _projections(dims)
        self.gate = nn.Linear(2 * common, common)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(common, NUM_CLASSES)

    def forward(self, f_dm: torch.Tensor, f_us: torch.Tensor) -> torch.Tensor:
        a, b = self.proj_dm(f_dm), self.proj_us(f_us)
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=1)))
        return self.fc(self.dropout(g * a + (1.0 - g) * b))


class _Classifier(nn.Module):
    """Shared helpers: branch access for Grad-CAM and a readable description."""

    def gradcam_target_layer(self, branch: str) -> nn.Module:
        """Last conv block of branch ``branch`` ("dm" or "us") for Grad-CAM."""
        if branch not in self.branches:
            raise ConfigError(
                f"model has no branch {branch!r}; branches: {', '.join(self.branches.keys())}"
            )
        backbone = self.branches[branch]
        assert isinstance(backbone, Backbone)
        return backbone.gradcam_target_layer()


class SingleModalClassifier(_Classifier):
    """One backbone + ``single`` head: ``model(x) -> logits (B, 2)``."""

    def __init__(self, modality: str, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.modality = modality
        self.fusion = "none"
        self.backbone_names = {modality: backbone.name}
        self.branches = nn.ModuleDict({modality: backbone})
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x
        for branch in self.branches.values():  # exactly one; iteration is TorchScript-safe
            features = branch(x)
        return self.head(features)


class LateFusionClassifier(_Classifier):
    """DM and US backbones + a fusion head: ``model(dm, us) -> logits (B, 2)``."""

    def __init__(self, dm: Backbone, us: Backbone, head: nn.Module, fusion: str) -> None:
        super().__init__()
        self.modality = "fusion"
        self.fusion = fusion
        self.backbone_names = {"dm": dm.name, "us": us.name}
        self.branches = nn.ModuleDict({"dm": dm, "us": us})
        self.head = head

    def forward(self, dm: torch.Tensor, us: torch.Tensor) -> torch.Tensor:
        return self.head(self.branches["dm"](dm), self.branches["us"](us))


def build_head(name: str, dims: Sequence[int], dropout: float = 0.0) -> nn.Module:
    """Build registered head ``name`` for branch feature sizes ``dims``."""
    inputs = HEADS.meta(name)["inputs"]
    if len(dims) != inputs:
        raise ConfigError(f"head {name!r} takes {inputs} feature input(s), got {len(dims)}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
    return HEADS.get(name)(dims, dropout)


def _per_branch(value: str | Path | Mapping[str, str | Path], branch: str) -> str | Path:
    if isinstance(value, Mapping):
        if branch not in value:
            raise ConfigError(f"pretrained has no entry for branch {branch!r}: {dict(value)}")
        return value[branch]
    return value


def build_model(
    modality: str,
    backbone_dm: str = "resnet18",
    backbone_us: str = "resnet18",
    fusion: str = "sum",
    pretrained: str | Path | Mapping[str, str | Path] = "none",
    input_mode: str = "replicate",
    dropout: float = 0.0,
    upsample_small: bool = False,
) -> SingleModalClassifier | LateFusionClassifier:
    """Build the classifier for ``modality`` ("dm", "us" or "fusion").

    Single-modal models use ``backbone_dm`` or ``backbone_us`` (the other is ignored, and so
    is ``fusion``). ``pretrained`` is one value for all branches or a mapping
    ``{"dm": ..., "us": ...}``; each value is ``none | imagenet | PATH``. ``upsample_small``:
    a backbone enlarges inputs below its minimum size instead of refusing them.
    """
    model = _build_model(
        modality, backbone_dm, backbone_us, fusion, pretrained, input_mode, dropout
    )
    for branch in model.branches.values():
        assert isinstance(branch, Backbone)
        branch.upsample_small = upsample_small
    return model


def _build_model(
    modality: str,
    backbone_dm: str,
    backbone_us: str,
    fusion: str,
    pretrained: str | Path | Mapping[str, str | Path],
    input_mode: str,
    dropout: float,
) -> SingleModalClassifier | LateFusionClassifier:
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
    if modality == "fusion":
        if fusion not in fusion_names():
            raise ConfigError(f"unknown fusion {fusion!r}; known: {', '.join(fusion_names())}")
        dm, dim_dm = build_backbone(backbone_dm, _per_branch(pretrained, "dm"), input_mode)
        us, dim_us = build_backbone(backbone_us, _per_branch(pretrained, "us"), input_mode)
        return LateFusionClassifier(dm, us, build_head(fusion, (dim_dm, dim_us), dropout), fusion)
    name = backbone_dm if modality == "dm" else backbone_us
    backbone, dim = build_backbone(name, _per_branch(pretrained, modality), input_mode)
    return SingleModalClassifier(modality, backbone, build_head("single", (dim,), dropout))
