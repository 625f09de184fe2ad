"""Plain-PyTorch training and evaluation: ``fit`` and ``evaluate``.

The loop knows nothing about Ray: three arguments of ``fit`` are its touch points,
``prepare_model`` / ``prepare_loader`` (Ray Train's DDP wrappers; identity by default) and
``callback`` (each epoch's metrics; truthy = stop). Checkpoints go to ``out_dir``:
``last.pt`` (resumable state) and, once a later epoch is worse, ``best.pt`` (best weights).

Scores are malignant log-odds ``logit[1] - logit[0]`` in float64, never softmax probabilities
(those saturate to exactly 0 or 1 in float32 after a few epochs and turn rankings into ties).

Which epoch's weights ``fit`` returns: with ``optim.patience == 0`` the LAST epoch's (the
monitoring set is only watched, never used to pick an epoch); with ``patience > 0`` the best
epoch by patient-level AUC on the monitoring loader, which ``engine.fold`` makes an inner
split of the training fold, so a fold's reported AUC is never the maximum over epochs of the
score being reported. Patient level: each patient's image/pair scores are averaged first,
because that is the unit a screening decision is made on.

BatchNorm statistics are recomputed over training batches (no gradient step) after every
training epoch ("precise BN", ``train.bn_recalibration_batches``): after a few optimiser steps
the running averages (momentum 0.1) do not match the weights, which collapsed GoogLeNet to
constant eval-mode logits and drove Inception v3 to ±500.

Batches are dicts from ``breastfusion.data.datasets``: ``{"image", "y", "patient_id"}`` for a
single modality (``model(image)``) or ``{"dm", "us", "y", "patient_id"}`` for fusion
(``model(dm, us)``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from breastfusion.config import Config, OptimConfig
from breastfusion.engine.amp import AmpPolicy
from breastfusion.engine.checkpoint import cpu_state_dict, load_checkpoint, save_checkpoint, unwrap
from breastfusion.errors import UserError

log = logging.getLogger(__name__)

BEST_NAME = "best.pt"
LAST_NAME = "last.pt"

# Receives one epoch's metrics; returning True (or anything truthy) stops training.
Callback = Callable[[dict[str, float]], Any]


def _identity(x: Any) -> Any:
    return x


@dataclass
class FitResult:
    """What ``fit`` returns; the model passed in now holds the best weights."""

    best_epoch: int  # 1-based; 0 if no epoch finished
    best_val_auc: float  # NaN without validation data or with one class only
    epochs_run: int
    stop_reason: str  # "completed" | "early_stopping" | "callback" | "diverged"
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per-sample validation predictions of the best epoch (patient_id, y_true, y_score).
    val_predictions: pd.DataFrame | None = None

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason != "completed"


# -- public API ------------------------------------------------------------------------------


def fit(
    cfg: Config,
    train_loader: Iterable[dict[str, Any]],
    val_loader: Iterable[dict[str, Any]] | None,
    model: nn.Module,
    *,
    callback: Callback | None = None,
    out_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] = _identity,
    prepare_loader: Callable[[Any], Any] = _identity,
    resume: bool = False,
    heartbeat: Callable[[int, int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` per ``cfg.optim``; return the last epoch's state, or with
    ``optim.patience > 0`` the best by patient-level AUC on ``val_loader`` (see module doc).

    ``device`` overrides ``cfg.train.device`` (Ray Train passes the worker's device).
    ``resume`` continues from ``out_dir/last.pt`` when it exists and was written for the same
    config hash. ``heartbeat(batch, n_batches, seconds)`` is called after every training batch
    (progress within long epochs).
    """
    seed_everything(cfg.optim.seed)
    dev = resolve_device(device if device is not None else cfg.train.device)
    channels_last = cfg.train.channels_last and dev.type == "cuda"
    model = _to_device(model, dev, channels_last)
    model = prepare_model(model)
    select_best = val_loader is not None and cfg.optim.patience > 0
    # Only the training loader is sharded. Every rank validates on the whole validation set
    # with identical weights and buffers, so every rank takes the same early-stopping decision
    # (ranks that disagree would hang in the next all-reduce).
    train_loader = prepare_loader(train_loader)

    optimizer = build_optimizer(cfg.optim, model.parameters())
    scheduler = build_scheduler(cfg.optim, optimizer)
    amp = AmpPolicy(dev, cfg.train.amp)
    state = _State()
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is not None and (out / LAST_NAME).is_file():
        state = _resume(out / LAST_NAME, cfg, model, optimizer, scheduler, amp)

    config_dict = cfg.to_dict()
    stop_reason = "completed"
    for epoch in range(state.epoch + 1, cfg.optim.epochs + 1):
        # Per-epoch seeds make a resumed run draw the same batches/augmentations as an
        # uninterrupted one, without saving every library's RNG state.
        seed_everything(cfg.optim.seed * 100_003 + epoch)
        _reseed_loader(train_loader, cfg.optim.seed * 100_003 + epoch)
        _set_epoch(train_loader, epoch)
        lr = optimizer.param_groups[0]["lr"]
        train_loss, n_train, train_s = _train_epoch(
            model,
            train_loader,
            optimizer,
            amp,
            dev,
            channels_last,
            heartbeat,
            warmup=(epoch, cfg.optim.warmup_epochs),
        )
        if scheduler is not None:
            scheduler.step()
        recalibrate_batchnorm(
            unwrap(model), train_loader, cfg.train.bn_recalibration_batches, dev, amp, channels_last
        )
        every, last = cfg.train.validate_every, cfg.optim.epochs
        if val_loader is not None and (select_best or epoch % every == 0 or epoch == last):
            _sync_buffers(model)
            val_df, val_loss = _predict(unwrap(model), val_loader, dev, amp, channels_last)
            val_auc = patient_auc(val_df)
        else:
            val_df, val_loss, val_auc = None, math.nan, math.nan

        # A diverged epoch (non-finite loss) never replaces a finite one as the result.
        finite = math.isfinite(train_loss) or state.best_epoch == 0
        improved = finite and _improves(val_auc, state.best_auc, not select_best, state.best_epoch)
        if improved:
            state.best_auc, state.best_epoch, state.since_best = val_auc, epoch, 0
            state.best_state = cpu_state_dict(model)
            state.best_predictions = val_df
        else:
            state.since_best += 1
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_auc": val_auc,
            "best_val_auc": state.best_auc,
            "best_epoch": state.best_epoch,
            "improved": bool(improved),
            "lr": lr,
            "samples_per_s": n_train / train_s if train_s > 0 else math.nan,
            "epoch_time_s": train_s,
        }
        state.history.append(metrics)
        state.epoch = epoch
        if out is not None and _is_rank_zero():
            _save(out, cfg, config_dict, model, optimizer, scheduler, amp, state, improved)
        log.debug("epoch %d: %s", epoch, metrics)

        # The callback sees every epoch, a diverged one included (the search records it).
        asked_to_stop = bool(callback(dict(metrics))) if callback is not None else False
        if not math.isfinite(train_loss):
            stop_reason = "diverged"
            break
        if asked_to_stop:
            stop_reason = "callback"
            break
        if select_best and cfg.optim.patience <= state.since_best:
            stop_reason = "early_stopping"
            break

    if state.best_state:
        unwrap(model).load_state_dict(state.best_state)
    return FitResult(
        best_epoch=state.best_epoch,
        best_val_auc=state.best_auc,
        epochs_run=state.epoch,
        stop_reason=stop_reason,
        history=state.history,
        best_state=state.best_state,
        val_predictions=state.best_predictions,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: str | torch.device = "cpu",
    *,
    amp: bool = False,
    channels_last: bool = False,
) -> pd.DataFrame:
    """Per-sample predictions: ``patient_id, y_true, y_score`` (malignant log-odds, float64)."""
    dev = resolve_device(device)
    df, _ = _predict(model, loader, dev, AmpPolicy(dev, amp), channels_last and dev.type == "cuda")
    return df


def patient_auc(df: pd.DataFrame) -> float:
    """ROC AUC over patients (scores averaged per patient); NaN when only one class is present."""
    from breastfusion.evaluate.metrics import patient_scores, roc_auc

    if df is None or len(df) == 0:
        return math.nan
    patients = patient_scores(df, source="validation predictions")
    return roc_auc(patients["y_true"].to_numpy(), patients["y_score"].to_numpy())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a CPU run repeats exactly."""
    seed = int(seed) % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → CUDA when available, else CPU; asking for CUDA without one is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here")
    return torch.device(device)


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Stepped once per epoch, so a resumed run and a fresh one follow the same curve."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return None


def forward_batch(
    model: nn.Module, batch: dict[str, Any], device: torch.device, channels_last: bool = False
) -> torch.Tensor:
    """Logits for a dataset batch: ``model(dm, us)`` for pairs, ``model(image)`` otherwise."""
    if "dm" in batch and "us" in batch:
        return model(
            _input(batch["dm"], device, channels_last), _input(batch["us"], device, channels_last)
        )
    return model(_input(batch["image"], device, channels_last))


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    device: torch.device,
    channels_last: bool = False,
) -> torch.Tensor:
    """One optimisation step (cross-entropy on the 2 logits); returns the detached loss."""
    y = batch["y"].to(device, non_blocking=True).long()
    with amp.autocast():
        logits = forward_batch(model, batch, device, channels_last)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    amp.backward_step(loss, optimizer)
    return loss.detach()


# -- internals -------------------------------------------------------------------------------


@dataclass
class _State:
    epoch: int = 0
    best_auc: float = math.nan
    best_epoch: int = 0
    since_best: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_predictions: pd.DataFrame | None = None
    best_on_disk: bool = False  # best.pt holds best_state (else last.pt's weights are it)


def _to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _input(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _train_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    amp: AmpPolicy,
    device: torch.device,
    channels_last: bool,
    heartbeat: Callable[[int, int, float], None] | None = None,
    warmup: tuple[int, float] = (1, 0.0),
) -> tuple[float, int, float]:
    """One pass over ``loader``; returns (mean loss per sample, samples seen, seconds).
    ``warmup = (epoch, warmup_epochs)``: step ``i``'s rate is scaled by ``(epoch - 1 +
    i / n_batches) / warmup_epochs`` up to 1 (a function of epoch and step: resume-exact)."""
    model.train()
    total, n, start = 0.0, 0, time.perf_counter()
    n_batches = len(loader) if hasattr(loader, "__len__") else 0
    (epoch, warmup_epochs), base = warmup, [g["lr"] for g in optimizer.param_groups]
    for i, batch in enumerate(loader, 1):
        if warmup_epochs > 0 and n_batches:
            factor = min(1.0, (epoch - 1 + i / n_batches) / warmup_epochs)
            for group, lr in zip(optimizer.param_groups, base, strict=True):
                group["lr"] = lr * factor
        loss = train_step(model, batch, optimizer, amp, device, channels_last)
        total += float(loss) * len(batch["y"])
        n += len(batch["y"])
        if heartbeat is not None:
            heartbeat(i, n_batches, time.perf_counter() - start)
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr
    seconds = time.perf_counter() - start
    return (total / n if n else math.nan), n, seconds


@torch.no_grad()
def _predict(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    amp: AmpPolicy,
    channels_last: bool,
) -> tuple[pd.DataFrame, float]:
    """Per-sample scores and the mean cross-entropy over ``loader`` (model in eval mode)."""
    model.eval()
    ids: list[str] = []
    labels: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    total = 0.0
    for batch in loader:
        y = batch["y"].to(device).long()
        with amp.autocast():
            logits = forward_batch(model, batch, device, channels_last)
        logits = logits.float()
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        scores.append(log_odds(logits).cpu().numpy())
        labels.append(y.cpu().numpy())
        ids.extend(str(p) for p in batch["patient_id"])
    n = len(ids)
    df = pd.DataFrame(
        {
            "patient_id": pd.Series(ids, dtype=str),
            "y_true": np.concatenate(labels).astype(int) if labels else np.empty(0, int),
            "y_score": np.concatenate(scores) if scores else np.empty(0),
        }
    )
    return df, (total / n if n else math.nan)


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Malignant log-odds ``logit[1] - logit[0]`` in float64: the platform's score. Unlike
    ``softmax(logits)[:, 1]`` it cannot saturate, so scores never tie by rounding."""
    logits = logits.double()
    return logits[:, 1] - logits[:, 0]


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    max_batches: int,
    device: torch.device,
    amp: AmpPolicy | None = None,
    channels_last: bool = False,
) -> int:
    """Recompute every BatchNorm layer's running mean/var as the plain average over up to
    ``max_batches`` training batches (train-mode forward passes, no gradient, no optimiser
    step), so eval-mode statistics match the current weights. Returns the batches used."""
    layers = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not layers or max_batches <= 0:
        return 0
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    model.train()
    used = 0
    amp = amp or AmpPolicy(device, False)
    try:
        for batch in loader:
            if used >= max_batches:
                break
            with amp.autocast():
                forward_batch(model, batch, device, channels_last)
            used += 1
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return used


def _improves(auc: float, best: float, no_selection: bool, best_epoch: int) -> bool:
    """Strictly better AUC wins; ties keep the earlier state. Without selection (no
    monitoring set, or ``patience == 0``) the latest state wins; a NaN AUC never beats a real
    one, but the first epoch is always kept so there is a state to return."""
    if no_selection or best_epoch == 0:
        return True
    return not math.isnan(auc) and (math.isnan(best) or auc > best)


def _reseed_loader(loader: Any, seed: int) -> None:
    """Restart a loader's random streams per epoch: its own ``torch.Generator`` (loader or
    sampler) and, when augmentation runs in the main process, the dataset's augmenters."""
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator):
            gen.manual_seed(seed)
    if getattr(loader, "num_workers", None) == 0:
        dataset = getattr(loader, "dataset", None)
        while (
            dataset is not None and not hasattr(dataset, "reseed") and hasattr(dataset, "dataset")
        ):
            dataset = dataset.dataset  # Subset (replication oversampling)
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank_zero() -> bool:
    """Under DDP only rank 0 writes checkpoints (all ranks hold the same weights)."""
    import torch.distributed as dist

    return not _distributed() or dist.get_rank() == 0


def _sync_buffers(model: nn.Module) -> None:
    """Give every DDP rank rank 0's BatchNorm statistics before validating.

    DDP keeps parameters equal but each rank updates its running statistics from its own
    last batch; without this, ranks could score validation slightly differently.
    """
    if not _distributed():
        return
    import torch.distributed as dist

    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def _set_epoch(loader: Any, epoch: int) -> None:
    """Per-epoch pair sampling (``data.pairs_per_patient``) and DistributedSampler (added by Ray
    Train) change their draw only when told the epoch."""
    from breastfusion.data.loaders import set_loader_epoch

    set_loader_epoch(loader, epoch)


def _save(
    out: Path,
    cfg: Config,
    config_dict: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    amp: AmpPolicy,
    state: _State,
    improved: bool,
) -> None:
    meta = {"epoch": state.epoch, "best_epoch": state.best_epoch, "val_auc": state.best_auc}
    # best.pt is written only once a later epoch stops improving: while the newest epoch is
    # the best (every epoch with patience 0) last.pt's weights are the best ones.
    if not improved and not state.best_on_disk:
        save_checkpoint(out / BEST_NAME, state.best_state, config_dict, meta=meta)
        state.best_on_disk = True
    elif improved:
        state.best_on_disk = False
    train_state = {
        "best_in_last": improved,
        "epoch": state.epoch,
        "best_auc": state.best_auc,
        "best_epoch": state.best_epoch,
        "since_best": state.since_best,
        "history": state.history,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
    }
    save_checkpoint(out / LAST_NAME, model, config_dict, meta=meta, train_state=train_state)


def _resume(
    path: Path,
    cfg: Config,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    amp: AmpPolicy,
) -> _State:
    """Restore weights, optimiser and counters from ``last.pt`` written for this same config."""
    ckpt = load_checkpoint(path)
    if ckpt.config_hash != cfg.config_hash():
        raise UserError(
            f"cannot resume from {path}: it was written for a different config "
            f"(hash {ckpt.config_hash[:12]}, this run {cfg.config_hash()[:12]})"
        )
    ts = ckpt.train_state or {}
    unwrap(model).load_state_dict(ckpt.state_dict)
    optimizer.load_state_dict(ts["optimizer"])
    if scheduler is not None and ts.get("scheduler") is not None:
        scheduler.load_state_dict(ts["scheduler"])
    if amp.scaler is not None and ts.get("scaler") is not None:
        amp.scaler.load_state_dict(ts["scaler"])
    state = _State(
        epoch=int(ts["epoch"]),
        best_auc=float(ts["best_auc"]),
        best_epoch=int(ts["best_epoch"]),
        since_best=int(ts["since_best"]),
        history=list(ts["history"]),
    )
    best_path = path.parent / BEST_NAME
    state.best_on_disk = not ts.get("best_in_last", False) and best_path.is_file()
    state.best_state = (
        load_checkpoint(best_path).state_dict if state.best_on_disk else cpu_state_dict(model)
    )
    log.info("resumed from %s at epoch %d", path, state.epoch)
    return state
