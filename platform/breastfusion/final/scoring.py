"""Scoring a dataset with an exported model: one code path for ``final`` and ``predict``.

A *runner* maps a batch of model inputs (one ``(B, 1, H, W)`` float32 array per branch, in
the model's input order) to logits ``(B, 2)``. :class:`TorchRunner` runs the in-memory or
reloaded module; :class:`OnnxRunner` runs ``model.onnx`` with onnxruntime (imported only
here, only when asked for). Scores are ``logit[1] - logit[0]`` in float64: for a bundle's
model (``models.ensemble.CalibratedEnsemble``) that is the calibrated malignant log-odds.
A patient's score is the mean over its samples (images, or US × DM pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.errors import UserError

BACKENDS = ("torch", "onnxruntime")


class TorchRunner:
    def __init__(self, model: Any, device: Any = "cpu") -> None:
        import torch

        from breastfusion.engine.loop import resolve_device

        self.device = resolve_device(device or "cpu")
        self.model = model.to(self.device).eval()
        self._torch = torch

    def __call__(self, inputs: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            xs = [torch.as_tensor(x).to(self.device, torch.float32) for x in inputs]
            return self.model(*xs).double().cpu().numpy()


class OnnxRunner:
    def __init__(self, path: str | Path, input_names: Sequence[str]) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # a dependency, but be clear if an install lacks it
            raise UserError("the onnxruntime backend needs the onnxruntime package") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no ONNX model in this bundle (export it with final.onnx)")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise UserError(f"{path}: cannot load the ONNX model ({type(exc).__name__})") from None
        self.names = tuple(input_names)

    def __call__(self, inputs: Sequence[Any]) -> np.ndarray:
        feed = {
            n: np.ascontiguousarray(np.asarray(x, dtype=np.float32))
            for n, x in zip(self.names, inputs, strict=True)
        }
        return np.asarray(self.session.run(None, feed)[0], dtype=np.float64)


def batch_inputs(batch: dict[str, Any], names: Sequence[str]) -> list[Any]:
    """A dataset batch's images in the model's input order."""
    if len(names) == 1 and "image" in batch:
        return [batch["image"]]
    return [batch[n] for n in names]


def score_samples(runner: Any, loader: Any, names: Sequence[str]) -> pd.DataFrame:
    """Per-sample ``patient_id, y_true, y_score`` (float64 log-odds) over an evaluation loader."""
    ids: list[str] = []
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    for batch in loader:
        logits = runner(batch_inputs(batch, names))
        scores.append(logits[:, 1] - logits[:, 0])
        labels.append(np.asarray(batch["y"]).astype(int))
        ids.extend(str(p) for p in batch["patient_id"])
    return pd.DataFrame(
        {
            "patient_id": pd.Series(ids, dtype=str),
            "y_true": np.concatenate(labels) if labels else np.empty(0, int),
            "y_score": np.concatenate(scores) if scores else np.empty(0),
        }
    )


def per_patient(samples: pd.DataFrame) -> pd.DataFrame:
    """``patient_id, y_true, y_score, n_samples``: the mean score of each patient's samples,
    patients in first-seen order."""
    g = samples.groupby("patient_id", sort=False)
    out = g.agg(
        y_true=("y_true", "first"), y_score=("y_score", "mean"), n_samples=("y_score", "size")
    )
    return out.reset_index()


def score_dataset(runner: Any, dataset: Any, names: Sequence[str], batch_size: int) -> pd.DataFrame:
    """Patient scores of an (unaugmented) breastfusion dataset; see ``per_patient``."""
    from breastfusion.data.datasets import make_loader

    loader = make_loader(dataset, batch_size=batch_size, train=False, num_workers=0)
    return per_patient(score_samples(runner, loader, names))
