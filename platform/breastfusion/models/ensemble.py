"""A calibrated model: one or more classifiers whose Platt-calibrated log-odds are averaged.

Every classifier returns logits ``(B, 2)``; its score is the malignant log-odds
``z = logit[1] - logit[0]`` (float64). Fold models trained a few epochs differ in scale by
orders of magnitude, so their raw scores cannot be averaged or thresholded together. Each
member therefore carries its own Platt calibration ``c = a·z + b`` (fitted on its validation
fold, ``breastfusion.evaluate.calibration``), and :class:`CalibratedEnsemble` outputs

    ``[0, mean_k(a_k·z_k + b_k)]``  (float64, shape ``(B, 2)``)

so that ``logit[1] - logit[0]`` is the calibrated log-odds and ``softmax(logits)[:, 1]`` the
calibrated probability. A threshold chosen on the pooled calibrated out-of-fold scores then
means the same on the ensemble's scores. A refit model is a one-member ensemble carrying the
mean of the fold calibrations (transferred, not fitted on it).

The calibration is stored as float64 buffers (``cal_a``, ``cal_b``), so the state dict and
the ONNX export carry it at full precision. Members are ordinary breastfusion classifiers
(or any module with the same call signature); Grad-CAM gets one target layer per member.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Malignant log-odds of ``(B, 2)`` logits in float64 (the engine's score)."""
    logits = logits.double()
    return logits[:, 1] - logits[:, 0]


class CalibratedEnsemble(nn.Module):
    """``members`` (same inputs) with per-member calibrations ``a``, ``b``; see module doc."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        a: Sequence[float],
        b: Sequence[float],
        input_names: Sequence[str],
    ) -> None:
        super().__init__()
        if not members or len(members) != len(a) or len(a) != len(b):
            raise ValueError("CalibratedEnsemble needs one (a, b) calibration per member")
        self.members = nn.ModuleList(members)
        self.input_names = tuple(input_names)
        self.register_buffer("cal_a", torch.tensor([float(v) for v in a], dtype=torch.float64))
        self.register_buffer("cal_b", torch.tensor([float(v) for v in b], dtype=torch.float64))

    def member_log_odds(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Raw (uncalibrated) log-odds of every member, ``(B, K)`` float64."""
        return torch.stack([log_odds(m(*inputs)) for m in self.members], dim=1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        calibrated = self.member_log_odds(*inputs) * self.cal_a + self.cal_b
        c = calibrated.mean(dim=1)
        return torch.stack([torch.zeros_like(c), c], dim=1)

    def gradcam_target_layers(self, branch: str) -> list[nn.Module]:
        return [m.gradcam_target_layer(branch) for m in self.members]  # type: ignore[operator]

    @property
    def calibrations(self) -> list[tuple[float, float]]:
        return [(float(a), float(b)) for a, b in zip(self.cal_a, self.cal_b, strict=True)]
