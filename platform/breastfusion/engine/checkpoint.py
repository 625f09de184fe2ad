"""Model checkpoints that carry the configuration they were trained with.

A checkpoint is a plain dict saved with ``torch.save``: weights, the config dict and its hash,
free-form ``meta`` (epoch, validation AUC, ...) and optionally the training state needed to
resume (optimizer, scheduler, grad scaler, early-stopping counters). Everything in it is
tensors and plain Python values, so it loads with ``weights_only=True`` (no pickle code runs).
Writes are atomic: a crash mid-save never leaves a truncated file that a later run trusts.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from breastfusion.errors import UserError
from breastfusion.io import atomic_write_bytes, sha256_json

FORMAT = "breastfusion-checkpoint/1"


@dataclass
class Checkpoint:
    """A loaded checkpoint; ``config`` is the dict form of ``breastfusion.config.Config``."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    config_hash: str
    meta: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP/DataParallel wrapper, so saved keys carry no ``module.``."""
    return model.module if hasattr(model, "module") else model


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def save_checkpoint(
    path: str | Path,
    state_dict: dict[str, torch.Tensor] | nn.Module,
    config: dict[str, Any],
    *,
    meta: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write weights + config + hash (+ meta, + resumable training state) atomically."""
    if isinstance(state_dict, nn.Module):
        state_dict = cpu_state_dict(state_dict)
    payload = {
        "format": FORMAT,
        "state_dict": state_dict,
        "config": config,
        "config_hash": sha256_json(config),
        "meta": dict(meta or {}),
    }
    if train_state is not None:
        payload["train_state"] = train_state
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint safely (``weights_only``) and check its config hash."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, not a torch file, unsafe pickle content
        raise UserError(f"checkpoint {path} cannot be read: {load_error_text(exc)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a breastfusion checkpoint (expected format {FORMAT})")
    config = payload["config"]
    if sha256_json(config) != payload["config_hash"]:
        raise UserError(f"checkpoint {path}: stored config does not match its hash (edited?)")
    return Checkpoint(
        state_dict=payload["state_dict"],
        config=config,
        config_hash=payload["config_hash"],
        meta=payload.get("meta", {}),
        train_state=payload.get("train_state"),
    )


def load_error_text(exc: BaseException) -> str:
    """Words for why ``torch.load(..., weights_only=True)`` failed (torch's own messages say
    e.g. ``[Errno 22] Invalid argument`` for a truncated file)."""
    import pickle

    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return (
            "it holds Python objects other than tensors and plain data, which are never "
            "unpickled (weights_only loading: a weight file must not run code)"
        )
    if isinstance(exc, OSError | EOFError | RuntimeError) or "zip" in text.lower():
        return "the file is truncated or corrupted (not a complete PyTorch file)"
    return f"not a PyTorch weight file ({type(exc).__name__})"


def load_weights(model: nn.Module, checkpoint: Checkpoint | str | Path) -> Checkpoint:
    """Load a checkpoint's weights into ``model`` (strict: architectures must match)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    try:
        unwrap(model).load_state_dict(checkpoint.state_dict)
    except RuntimeError as exc:
        raise UserError(f"checkpoint weights do not fit this model: {exc}") from exc
    return checkpoint
