"""``breastfusion final``: the chosen configuration → one model, one holdout evaluation, an export.

Steps (``final_model``):

1. **Train.** ``refit`` (default): train the configuration afresh on *all* development patients
   (every fold's patients; no validation split, so no early stopping) for the mean best epoch
   over the search's folds (rounded; the configured ``optim.epochs`` when the folds recorded
   none, or an explicit ``epochs``). ``ensemble``: load the K fold models of the search and
   average their softmax scores (:class:`FoldEnsemble`); nothing is trained.
2. **Holdout, once.** Predict the untouched holdout patients; image pairs are averaged to one
   score per patient.
3. **Evaluate** with :func:`breastfusion.evaluate.cli.evaluate_predictions`: AUC with bootstrap
   and DeLong CIs, sensitivity / specificity / precision / accuracy with Wilson CIs. With a
   target sensitivity, the threshold is chosen on the development out-of-fold predictions of
   the search's folds and applied unchanged to the holdout; otherwise ``train.threshold``.
4. **Export** into ``out`` (see ``FILES``), including a TorchScript file that needs only torch
   and ``metadata.json`` (inputs, preprocessing and its hash, config and hash, metrics with CIs,
   training data summary, intended use, software versions), and a Grad-CAM gallery.

Everything is written into a temporary folder next to ``out`` and renamed into place at the
end (``breastfusion.io.atomic_dir``): a crash never leaves a half-finished ``out`` that looks
done.

Caveat recorded in the metadata: the operating point comes from the *fold* models' out-of-fold
scores; a refit model (more data, maybe more steps) can be calibrated differently, so the
holdout sensitivity at that threshold is the honest check of whether it transfers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform as _platform
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import click
import pandas as pd

from breastfusion.config import Config, load_yaml, save_yaml
from breastfusion.errors import ConfigError, SplitError, UserError
from breastfusion.io import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
    sha256_json,
)

if TYPE_CHECKING:  # torch stays out of import time (the CLI lists commands without it)
    import torch
    from torch import nn

log = logging.getLogger(__name__)

Mode = Literal["refit", "ensemble"]
MODES = ("refit", "ensemble")
FORMAT = "breastfusion-model/1"
INTENDED_USE = "research use only, not for diagnosis"
FILES = {
    "model.pt": "state dict (torch.save); rebuild with build_model(**metadata.architecture)",
    "model.torchscript.pt": "TorchScript (traced on CPU); needs only torch: torch.jit.load",
    "metadata.json": "inputs, preprocessing, config, metrics with CIs, training data, use",
    "metrics.json": "holdout evaluation (breastfusion evaluate format)",
    "metrics.md": "the same as tables",
    "reliability.png": "holdout reliability diagram",
    "predictions_holdout.csv": "model, patient_id, y_true, y_score (one row per patient)",
    "oof_development.csv": "development out-of-fold predictions the threshold was chosen on",
    "config.yaml": "the resolved config the exported model was trained with",
    "gradcam/": "Grad-CAM overlays per branch, index.csv, captions.json",
}
SETTINGS_KEYS = (
    "mode",
    "target_sensitivity",
    "epochs",
    "gradcam_per_category",
    "bootstrap",
    "seed",
    "device",
)
Progress = Callable[[str], None]


@dataclass
class FinalResult:
    """What ``final_model`` wrote to ``out`` (paths in ``files``) and the numbers in it."""

    out: Path
    mode: str
    config: Config  # the config the exported model was trained with
    model_name: str
    threshold: float
    metrics: dict[str, Any]  # metrics.json
    predictions: pd.DataFrame  # holdout, one row per patient
    metadata: dict[str, Any]  # metadata.json
    train_patients: tuple[str, ...]  # every patient whose images trained the exported model
    holdout_patients: tuple[str, ...]  # the holdout patients that were scored
    gradcam: pd.DataFrame | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        m = self.metrics["models"][self.model_name]

        def ci(d: dict[str, Any]) -> str:
            return f"{d['value']:.3f} ({d['ci_low']:.3f}–{d['ci_high']:.3f})"

        def pct(d: dict[str, Any]) -> str:
            return "n/a" if d["value"] is None else f"{d['value']:.3f}"

        return (
            f"holdout ({m['n_patients']} patients, {m['n_malignant']} malignant): "
            f"AUC {ci(m['auc'])}, sensitivity {pct(m['sensitivity'])}, "
            f"specificity {pct(m['specificity'])} at threshold {self.threshold:.3f}"
        )


# --------------------------------------------------------------------------------------------
# The orchestration
# --------------------------------------------------------------------------------------------


def final_model(
    config: Config | Mapping[str, Any],
    manifest: str | Path | None,
    splits: str | Path | None,
    out: str | Path,
    *,
    mode: Mode = "refit",
    fold_dirs: Sequence[str | Path] | None = None,
    target_sensitivity: float | None = None,
    epochs: int | None = None,
    gradcam_per_category: int = 3,
    n_boot: int = 2000,
    seed: int = 0,
    device: str | None = None,
    progress: Progress | None = None,
) -> FinalResult:
    """Train (refit) or assemble (ensemble) the final model, evaluate it once on the holdout,
    and export it to ``out`` (module docstring). ``manifest``/``splits`` override the config's.

    ``fold_dirs``: the search's fold folders of the chosen trial (``metrics.json`` for the
    refit epochs, ``predictions.csv`` for the operating point, ``model.pt`` for the ensemble).
    """
    say = progress or (lambda line: log.info("%s", line))
    if mode not in MODES:
        raise ConfigError(f"final mode must be one of {', '.join(MODES)}, got {mode!r}")
    cfg = resolve_config(config, manifest, splits)
    df, split_set = load_cohort(cfg)
    folds = [Path(d) for d in fold_dirs or []]
    oof = read_oof(folds) if target_sensitivity is not None else None
    if target_sensitivity is not None and oof is None:
        raise UserError(
            "a target sensitivity needs the development out-of-fold predictions "
            "(fold<k>/predictions.csv of the chosen trial) to choose the threshold on; "
            + (f"none found in {', '.join(map(str, folds))}" if folds else "no fold folders given")
        )

    if mode == "refit":
        trained = refit(cfg, df, split_set, folds, epochs=epochs, device=device, say=say)
    else:
        trained = load_ensemble(cfg, split_set, folds, say=say)
    check_no_leak(trained.train_patients, split_set.holdout)

    holdout = predict_patients(trained.model, trained.config, df, split_set.holdout, device)
    say(
        f"holdout: {len(holdout.patients)} patients scored"
        + (f", {len(holdout.excluded)} without a needed image" if holdout.excluded else "")
    )
    name = f"{cfg.data.modality}_{mode}"
    result, scores = evaluate_holdout(
        holdout.patients, name, trained.config, oof, target_sensitivity, n_boot, seed
    )
    threshold = float(result["models"][name]["threshold"])
    predictions = scores[["model", "patient_id", "y_true", "y_score"]]
    meta = build_metadata(
        trained, cfg, df, split_set, result, name, holdout.excluded, mode, target_sensitivity
    )
    out = Path(out)
    with atomic_dir(out, owned_marker="metadata.json") as tmp:
        files = write_outputs(tmp, trained, result, predictions, oof, meta)
        gallery = None
        if gradcam_per_category > 0:
            from breastfusion.explain.gradcam import write_gallery

            gallery = write_gallery(
                trained.model,
                holdout.dataset,
                scores,
                threshold,
                tmp / "gradcam",
                per_category=gradcam_per_category,
            )
            files["gradcam/index.csv"] = tmp / "gradcam" / "index.csv"
    files = {k: out / v.relative_to(tmp) for k, v in files.items()}
    final = FinalResult(
        out=out,
        mode=mode,
        config=trained.config,
        model_name=name,
        threshold=threshold,
        metrics=result,
        predictions=predictions.reset_index(drop=True),
        metadata=meta,
        train_patients=tuple(trained.train_patients),
        holdout_patients=tuple(holdout.patients["patient_id"]),
        gradcam=gallery,
        files=files,
    )
    say(f"final ({mode}): {final.headline}; exported to {out}")
    return final


def final_from_best(
    best: str | Path | Mapping[str, Any],
    *,
    out: str | Path,
    manifest: str | Path | None = None,
    splits: str | Path | None = None,
    search_dir: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    debug: bool = False,
    progress: Progress | None = None,
) -> FinalResult:
    """``final_model`` for a search's choice: ``best`` is ``best_config.json`` (aggregate),
    ``best.json`` (a search) or a search folder. ``settings`` (the study's ``final:`` block)
    takes the keys in ``SETTINGS_KEYS``; ``debug`` lowers the bootstrap and gallery sizes."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(
            f"final: unknown setting {unknown[0]!r}; known: {', '.join(SETTINGS_KEYS)}"
        )
    choice = locate_best(best, search_dir)
    return final_model(
        choice.config,
        manifest,
        splits,
        out,
        mode=settings.get("mode", "refit"),
        fold_dirs=choice.fold_dirs,
        target_sensitivity=settings.get("target_sensitivity"),
        epochs=settings.get("epochs"),
        gradcam_per_category=int(settings.get("gradcam_per_category", 1 if debug else 3)),
        n_boot=int(settings.get("bootstrap", 200 if debug else 2000)),
        seed=int(settings.get("seed", 0)),
        device=settings.get("device"),
        progress=progress,
    )


# --------------------------------------------------------------------------------------------
# Config, cohort and the search's choice
# --------------------------------------------------------------------------------------------


def resolve_config(
    config: Config | Mapping[str, Any], manifest: str | Path | None, splits: str | Path | None
) -> Config:
    """A validated config whose data paths are absolute (explicit arguments win)."""
    cfg = config if isinstance(config, Config) else Config.from_dict(_strip_info(dict(config)))
    overrides: dict[str, Any] = {}
    if manifest is not None:
        overrides["data.manifest"] = str(Path(manifest).expanduser().resolve())
    if splits is not None:
        overrides["data.splits"] = str(Path(splits).expanduser().resolve())
    cfg = cfg.with_overrides(overrides) if overrides else cfg
    if not cfg.data.manifest or not cfg.data.splits:
        raise ConfigError("final: no manifest or splits (give them, or set data.manifest/splits)")
    return cfg


def _strip_info(raw: dict[str, Any]) -> dict[str, Any]:
    raw.pop("config_hash", None)
    return raw


def load_cohort(cfg: Config) -> tuple[pd.DataFrame, Any]:
    """The manifest table and its leakage-checked splits; a holdout is required."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    df = load_manifest(cfg.data.manifest)
    split_set = load_splits(cfg.data.splits, df)
    if not split_set.holdout:
        raise SplitError(
            f"{cfg.data.splits} has no holdout patients: the final model is judged on an "
            "untouched holdout (make splits with --holdout > 0)"
        )
    return df, split_set


@dataclass(frozen=True)
class BestChoice:
    config: dict[str, Any]  # full resolved config dict
    fold_dirs: list[Path]
    source: str


def locate_best(
    best: str | Path | Mapping[str, Any], search_dir: str | Path | None = None
) -> BestChoice:
    """The chosen configuration and its fold folders from ``best_config.json`` (aggregate),
    a search's ``best.json`` or a search folder (its ``best.json``)."""
    source = "best record"
    if not isinstance(best, Mapping):
        path = Path(best)
        if path.is_dir():
            path = path / "best.json"
        source = str(path)
        try:
            best = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: not found (run the search / aggregate first)") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read as JSON ({exc})") from None
        if search_dir is None and path.name == "best.json":
            search_dir = path.parent
    best = dict(best)
    if not best.get("trial"):
        raise UserError(f"{source}: no chosen trial ({best.get('note', 'no trial finished')})")
    root = Path(search_dir or best.get("search_dir") or "")
    trial_dir = root / "trials" / str(best["trial"])
    fold_dirs = sorted(
        (p for p in trial_dir.glob("fold*") if p.is_dir() and p.name[4:].isdigit()),
        key=lambda p: int(p.name[4:]),
    )
    config = best.get("config") or {}
    if not _is_full_config(config):  # search best.json: only the searched values
        config = _fold_config(fold_dirs, source)
    return BestChoice(config=_strip_info(dict(config)), fold_dirs=fold_dirs, source=source)


def _is_full_config(config: Mapping[str, Any]) -> bool:
    return bool(config) and all(isinstance(v, Mapping) for v in config.values())


def _fold_config(fold_dirs: Sequence[Path], source: str) -> dict[str, Any]:
    import yaml

    for d in fold_dirs:
        path = d / "config.yaml"
        if path.is_file():
            return yaml.safe_load(path.read_text(encoding="utf-8"))
    where = fold_dirs[0].parent if fold_dirs else "the trial's folder"
    raise UserError(f"{source}: no fold config.yaml under {where} to rebuild the configuration")


def read_oof(fold_dirs: Sequence[Path]) -> pd.DataFrame | None:
    """The folds' out-of-fold validation predictions (patient level), or None if none exist."""
    parts = []
    for d in fold_dirs:
        path = d / "predictions.csv"
        if path.is_file():
            part = pd.read_csv(path, dtype={"patient_id": str})
            parts.append(part.assign(fold=int(d.name[4:]) if d.name[4:].isdigit() else -1))
    return pd.concat(parts, ignore_index=True) if parts else None


def check_no_leak(train_patients: Sequence[str], holdout: Sequence[str]) -> None:
    """Refuse a model whose training patients include a holdout patient (never expected:
    the splits are checked on read; this guards the code path that built the training set)."""
    leaked = sorted(set(train_patients) & set(holdout))
    if leaked:
        raise SplitError(
            f"{len(leaked)} holdout patient(s) would be in the final model's training data: "
            + ", ".join(leaked[:10])
        )


# --------------------------------------------------------------------------------------------
# Datasets and prediction (reusing the engine's pieces)
# --------------------------------------------------------------------------------------------


def build_dataset(cfg: Config, df: pd.DataFrame, ids: Sequence[str], *, train: bool) -> Any:
    """The engine's dataset for ``ids``: same cache, preprocessing specs and pairing as the
    folds (``train`` adds the configured augmentation)."""
    from breastfusion.data.augment import AugmentSpec
    from breastfusion.data.datasets import PairedDataset, SingleModalDataset

    a = cfg.augment
    aug = AugmentSpec(a.hflip, a.vflip, a.elastic, a.strength) if train else None
    specs = preprocess_specs(cfg)
    cache = cfg.data.cache_dir or str(Path(cfg.data.manifest).resolve().parent / ".cache")
    seed = cfg.optim.seed
    if cfg.data.modality == "fusion":
        return PairedDataset(df, ids, specs["dm"], specs["us"], cache, augment=aug, seed=seed)
    m = cfg.data.modality
    return SingleModalDataset(df, ids, m.upper(), specs[m], cache, augment=aug, seed=seed)


def preprocess_specs(cfg: Config) -> dict[str, Any]:
    """``PreprocessSpec`` per branch, as the engine builds them (``resize: auto`` pads DM and
    squashes US)."""
    from breastfusion.data.cache import default_spec

    return {
        b: default_spec(b, getattr(cfg.data, f"size_{b}"), cfg.data.resize) for b in cfg.branches
    }


@dataclass
class HoldoutPredictions:
    patients: pd.DataFrame  # patient_id, y_true, y_score (one row per scored patient)
    per_sample: pd.DataFrame
    dataset: Any
    excluded: dict[str, str]  # holdout patients without the needed image(s)


def predict_patients(
    model: nn.Module, cfg: Config, df: pd.DataFrame, ids: Sequence[str], device: str | None
) -> HoldoutPredictions:
    """Scores per sample and per patient (pairs averaged) for ``ids``, unaugmented."""
    from breastfusion.data.datasets import make_loader
    from breastfusion.engine.loop import evaluate, resolve_device
    from breastfusion.evaluate.metrics import patient_scores

    dev = resolve_device(device or cfg.train.device)
    model.to(dev)  # evaluate() moves batches, not the model
    ds = build_dataset(cfg, df, ids, train=False)
    loader = make_loader(
        ds, batch_size=cfg.optim.batch_size, train=False, num_workers=cfg.data.num_workers
    )
    per_sample = evaluate(model, loader, dev)
    patients = patient_scores(per_sample, source="holdout predictions")
    return HoldoutPredictions(
        patients=patients[["patient_id", "y_true", "y_score"]].reset_index(drop=True),
        per_sample=per_sample,
        dataset=ds,
        excluded=dict(ds.excluded),
    )


# --------------------------------------------------------------------------------------------
# Training: refit on all development patients, or the fold ensemble
# --------------------------------------------------------------------------------------------


@dataclass
class Trained:
    model: nn.Module
    config: Config  # what the exported model was trained with
    mode: str
    train_patients: list[str]  # patients whose images trained it (any member, for ensembles)
    training: dict[str, Any]  # facts for metadata.json


def refit_epochs(fold_dirs: Sequence[Path], configured: int) -> tuple[int, str]:
    """The mean best epoch over the folds (rounded, at least 1), else ``configured``."""
    best = []
    for d in fold_dirs:
        path = d / "metrics.json"
        if path.is_file():
            epoch = json.loads(path.read_text(encoding="utf-8")).get("best_epoch")
            if isinstance(epoch, int | float) and epoch > 0:
                best.append(float(epoch))
    if not best:
        return configured, "optim.epochs (the folds recorded no best epoch)"
    epochs = max(1, int(math.floor(sum(best) / len(best) + 0.5)))
    shown = ", ".join(f"{b:g}" for b in best)
    return epochs, f"mean best epoch over {len(best)} folds ({shown}), rounded"


def training_patients(cfg: Config, df: pd.DataFrame, development: Sequence[str]) -> list[str]:
    """All development patients (``data.max_patients`` keeps a class-balanced subset: debug)."""
    ids = list(development)
    if cfg.data.max_patients is not None:
        from breastfusion.engine.fold import _subset

        labels = df.assign(pid=df["patient_id"].astype(str)).groupby("pid")["y"].max()
        ids = _subset(ids, labels, cfg.data.max_patients, cfg.optim.seed)
    return ids


def refit(
    cfg: Config,
    df: pd.DataFrame,
    split_set: Any,
    fold_dirs: Sequence[Path],
    *,
    epochs: int | None,
    device: str | None,
    say: Progress,
) -> Trained:
    """Train ``cfg`` on every development patient with no validation fold."""
    from breastfusion.data.datasets import make_loader
    from breastfusion.engine.loop import fit
    from breastfusion.engine.fold import build_model_from_config

    if epochs is None:
        n_epochs, rule = refit_epochs(fold_dirs, cfg.optim.epochs)
    else:
        n_epochs, rule = int(epochs), "given explicitly"
    fit_cfg = cfg.with_overrides({"optim.epochs": n_epochs})
    ids = training_patients(cfg, df, split_set.development)
    ds = build_dataset(fit_cfg, df, ids, train=True)
    if len(ds) == 0:
        raise UserError(f"no training samples for modality {cfg.data.modality!r}")
    loader = make_loader(
        ds,
        batch_size=fit_cfg.optim.batch_size,
        train=True,
        oversample=fit_cfg.augment.oversample,
        seed=fit_cfg.optim.seed,
        num_workers=fit_cfg.data.num_workers,
    )
    say(
        f"refit on {len(ds.patients)} development patients, {len(ds)} samples, {n_epochs} epochs ({rule})"
    )
    model = build_model_from_config(fit_cfg)

    def on_epoch(m: dict[str, float]) -> None:
        say(f"refit epoch {int(m['epoch'])}/{n_epochs}  train_loss {m['train_loss']:.4f}")

    result = fit(fit_cfg, loader, None, model, callback=on_epoch, device=device)
    model = model.cpu().eval()
    return Trained(
        model=model,
        config=fit_cfg,
        mode="refit",
        train_patients=list(ds.patients),
        training={
            "epochs": n_epochs,
            "epochs_rule": rule,
            "epochs_run": result.epochs_run,
            "stop_reason": result.stop_reason,
            "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
            "samples": len(ds),
            "excluded_patients": sorted(ds.excluded),
        },
    )


_ENSEMBLE: type | None = None


def fold_ensemble_class() -> type:
    """``FoldEnsemble``: K fold models → ``log(mean softmax)`` as its logits.

    Returning the log of the averaged probabilities keeps the model contract (logits (B, 2);
    ``softmax(logits)[:, 1]`` is the malignant score): softmax of ``log p`` is ``p`` exactly,
    so the score *is* the average of the members' softmax scores.
    """
    global _ENSEMBLE
    if _ENSEMBLE is not None:
        return _ENSEMBLE
    import torch
    from torch import nn

    class FoldEnsemble(nn.Module):
        def __init__(self, members: Sequence[nn.Module], input_names: Sequence[str]) -> None:
            super().__init__()
            self.members = nn.ModuleList(members)
            self.input_names = tuple(input_names)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            logp = torch.stack([torch.log_softmax(m(*inputs), dim=1) for m in self.members])
            return torch.logsumexp(logp, dim=0) - math.log(len(self.members))

        def gradcam_target_layers(self, branch: str) -> list[nn.Module]:
            return [m.gradcam_target_layer(branch) for m in self.members]

    FoldEnsemble.__module__ = __name__
    _ENSEMBLE = FoldEnsemble
    return FoldEnsemble


def load_ensemble(
    cfg: Config, split_set: Any, fold_dirs: Sequence[Path], *, say: Progress
) -> Trained:
    """The search's fold models (``fold<k>/model.pt``) as one averaging model."""
    from breastfusion.engine.checkpoint import load_checkpoint, load_weights
    from breastfusion.engine.fold import build_model_from_config

    paths = [d / "model.pt" for d in fold_dirs]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        raise UserError(
            "ensemble mode needs the fold checkpoints of the chosen trial; "
            + (f"missing: {', '.join(missing)}" if missing else "no fold folders given")
            + " (use mode refit)"
        )
    members, train_ids, folds = [], set(), []
    for path in paths:
        ckpt = load_checkpoint(path)
        member_cfg = Config.from_dict(ckpt.config)
        _check_same_model(cfg, member_cfg, path)
        model = build_model_from_config(member_cfg)
        load_weights(model, ckpt)
        members.append(model.eval())
        fold = member_cfg.data.fold
        folds.append(fold)
        # A fold model trained on the development patients outside its validation fold.
        train_ids.update(split_set.train_val(fold)[0])
    say(f"ensemble of {len(members)} fold models (folds {', '.join(map(str, folds))})")
    ensemble = fold_ensemble_class()(members, cfg.branches).eval()
    return Trained(
        model=ensemble,
        config=cfg,
        mode="ensemble",
        train_patients=sorted(train_ids),
        training={
            "members": [str(p) for p in paths],
            "folds": folds,
            "rule": "mean of the fold models' softmax malignant scores",
        },
    )


def _check_same_model(cfg: Config, member: Config, path: Path) -> None:
    """Every member must be the chosen architecture with the chosen inputs."""
    keys = ("modality", "size_dm", "size_us", "resize")
    a = (cfg.model, *(getattr(cfg.data, k) for k in keys))
    b = (member.model, *(getattr(member.data, k) for k in keys))
    if a != b:
        raise UserError(
            f"{path}: this fold model is not the chosen configuration (model/data differ)"
        )


def load_final_model(directory: str | Path) -> nn.Module:
    """Rebuild an exported final model from ``model.pt`` + ``metadata.json`` (CPU, eval mode)."""
    import torch

    from breastfusion.engine.fold import build_model_from_config

    directory = Path(directory)
    meta = json.loads((directory / "metadata.json").read_text(encoding="utf-8"))
    cfg = Config.from_dict(meta["config"])
    if meta["mode"] == "ensemble":
        n = len(meta["training"]["members"])
        model = fold_ensemble_class()(
            [build_model_from_config(cfg) for _ in range(n)], cfg.branches
        )
    else:
        model = build_model_from_config(cfg)
    state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Evaluation and export
# --------------------------------------------------------------------------------------------


def evaluate_holdout(
    patients: pd.DataFrame,
    name: str,
    cfg: Config,
    oof: pd.DataFrame | None,
    target_sensitivity: float | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """``metrics.json`` for the holdout (the evaluate module), threshold from the OOF scores."""
    from breastfusion.evaluate.cli import evaluate_predictions

    return evaluate_predictions(
        patients.assign(model=name),
        threshold=cfg.train.threshold,
        target_sensitivity=target_sensitivity,
        validation=oof.drop(columns=["fold"]) if oof is not None and target_sensitivity else None,
        n_boot=n_boot,
        seed=seed,
        source="holdout predictions",
        validation_source="development out-of-fold predictions",
    )


def example_inputs(cfg: Config, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Random [0, 1] grey inputs of the model's input sizes, in call order."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return tuple(
        torch.rand(batch, 1, s, s, generator=gen)
        for s in (getattr(cfg.data, f"size_{b}") for b in cfg.branches)
    )


def export_torchscript(model: nn.Module, cfg: Config) -> bytes:
    """A traced CPU TorchScript of ``model``, checked against the eager model."""
    import io

    import torch

    model = model.cpu().eval()
    examples = example_inputs(cfg)
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.x marks torch.jit deprecated; it is still the format that loads without
        # Python classes (``torch.jit.load``), which is what a model without breastfusion needs.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, examples)
        diff = float((traced(*examples) - model(*examples)).abs().max())
        if not diff <= 1e-4:
            raise RuntimeError(f"TorchScript export differs from the model by {diff:g}")
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def write_outputs(
    tmp: Path,
    trained: Trained,
    result: dict[str, Any],
    predictions: pd.DataFrame,
    oof: pd.DataFrame | None,
    meta: dict[str, Any],
) -> dict[str, Path]:
    """Every file of the export except the Grad-CAM gallery."""
    import io

    import torch

    from breastfusion.engine.checkpoint import cpu_state_dict
    from breastfusion.evaluate.cli import plot_reliability, render_markdown

    buf = io.BytesIO()
    torch.save(cpu_state_dict(trained.model), buf)
    files = {
        "model.pt": atomic_write_bytes(tmp / "model.pt", buf.getvalue()),
        "model.torchscript.pt": atomic_write_bytes(
            tmp / "model.torchscript.pt", export_torchscript(trained.model, trained.config)
        ),
        "config.yaml": save_yaml(trained.config, tmp / "config.yaml"),
        "predictions_holdout.csv": atomic_write_text(
            tmp / "predictions_holdout.csv", predictions.to_csv(index=False, float_format="%.8g")
        ),
        "metrics.json": atomic_write_json(tmp / "metrics.json", result),
        "metrics.md": atomic_write_text(tmp / "metrics.md", render_markdown(result)),
        "reliability.png": plot_reliability(result, tmp / "reliability.png"),
    }
    if oof is not None:
        files["oof_development.csv"] = atomic_write_text(
            tmp / "oof_development.csv", oof.to_csv(index=False, float_format="%.8g")
        )
    files["metadata.json"] = atomic_write_json(tmp / "metadata.json", meta)
    return files


# --------------------------------------------------------------------------------------------
# metadata.json
# --------------------------------------------------------------------------------------------

_BRANCH_TEXT = {
    "dm": "whole digital mammogram (DM), padded to a square",
    "us": "ultrasound (US) lesion crop, squashed to a square",
}


def build_metadata(
    trained: Trained,
    selected: Config,
    df: pd.DataFrame,
    split_set: Any,
    result: dict[str, Any],
    name: str,
    holdout_excluded: Mapping[str, str],
    mode: str,
    target_sensitivity: float | None,
) -> dict[str, Any]:
    """Everything a user of the exported model needs to feed it and to judge it."""
    cfg = trained.config
    specs = preprocess_specs(cfg)
    metrics = {k: v for k, v in result["models"][name].items() if k != "reliability"}
    return {
        "format": FORMAT,
        "intended_use": INTENDED_USE,
        "mode": mode,
        "model_name": name,
        "architecture": _architecture(cfg),
        "n_parameters": int(sum(p.numel() for p in trained.model.parameters())),
        "inputs": [_input_spec(b, i, specs[b]) for i, b in enumerate(cfg.branches)],
        "output": {
            "shape": ["batch", 2],
            "kind": "logits" if mode == "refit" else "log of the mean member probabilities",
            "classes": ["benign", "malignant"],
            "malignant_score": "softmax(output, dim=1)[:, 1]",
            "patient_score": "mean malignant score over the patient's images / US×DM pairs",
        },
        "usage": {
            "torchscript": f"torch.jit.load('model.torchscript.pt')({', '.join(cfg.branches)})",
            "state_dict": "breastfusion.final.load_final_model(DIR) or build_model(...)"
            ".load_state_dict(torch.load('model.pt', weights_only=True))",
        },
        "preprocessing": {
            "steps": [
                "read the image and convert it to one grey channel",
                "per-image min-max normalisation to [0, 1]: (x - min) / (max - min)",
                "pad (DM) or squash (US) to a square, resize to size × size (area when "
                "shrinking, bilinear when enlarging)",
                "quantise to uint8, then divide by 255 → float32 in [0, 1]",
            ],
            "branches": {b: {**s.to_dict(), "hash": s.hash} for b, s in specs.items()},
            "hash": sha256_json({b: s.hash for b, s in specs.items()}),
        },
        "config": cfg.to_dict(),
        "config_hash": cfg.config_hash(),
        "selected_config_hash": selected.config_hash(),
        "metrics": {
            "holdout": metrics,
            "operating_point_rule": (
                f"threshold reaching sensitivity >= {target_sensitivity} on the development "
                "out-of-fold predictions, applied unchanged to the holdout"
                if target_sensitivity is not None
                else f"fixed threshold train.threshold = {cfg.train.threshold}"
            ),
            "operating_point_caveat": (
                "the threshold comes from the fold models' out-of-fold scores; the exported "
                "model may be calibrated differently, the holdout sensitivity shows whether "
                "it transfers"
                if target_sensitivity is not None
                else None
            ),
            "method": result["method"],
        },
        "training_data": _training_summary(trained, df, split_set, holdout_excluded),
        "training": trained.training,
        "software": software_versions(),
    }


def _architecture(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    return {
        "modality": cfg.data.modality,
        "backbone_dm": m.backbone_dm,
        "backbone_us": m.backbone_us,
        "fusion": m.fusion if cfg.data.modality == "fusion" else "none",
        "pretrained": m.pretrained,
        "input_mode": m.input_mode,
        "dropout": m.dropout,
    }


def _input_spec(branch: str, position: int, spec: Any) -> dict[str, Any]:
    return {
        "name": branch,
        "position": position,
        "modality": branch.upper(),
        "description": _BRANCH_TEXT[branch],
        "shape": ["batch", 1, spec.size, spec.size],
        "dtype": "float32",
        "value_range": [0.0, 1.0],
        "channels": 1,
        "channel": "1 grey channel in [0, 1]; the model replicates it to RGB (or uses a "
        "1-channel stem) and applies its normalisation itself",
    }


def _per_class(df: pd.DataFrame, ids: Sequence[str]) -> dict[str, Any]:
    sub = df[df["patient_id"].astype(str).isin(set(ids))]
    per_patient = sub.groupby(sub["patient_id"].astype(str))["y"].max()
    images = sub.groupby([sub["modality"].astype(str).str.upper(), "y"]).size()
    return {
        "patients": {"benign": int((per_patient == 0).sum()), "malignant": int(per_patient.sum())},
        "images": {
            mod: {"benign": int(images.get((mod, 0), 0)), "malignant": int(images.get((mod, 1), 0))}
            for mod in ("DM", "US")
        },
    }


def _training_summary(
    trained: Trained, df: pd.DataFrame, split_set: Any, holdout_excluded: Mapping[str, str]
) -> dict[str, Any]:
    cfg = trained.config
    return {
        "unit": "patient",
        "train": _per_class(df, trained.train_patients),
        "holdout": _per_class(df, split_set.holdout),
        "holdout_patients_not_scored": dict(sorted(holdout_excluded.items())),
        "n_development_patients": len(split_set.development),
        "n_holdout_patients": len(split_set.holdout),
        "holdout_in_training": 0,  # asserted by check_no_leak before anything is written
        "manifest": str(cfg.data.manifest),
        "manifest_sha256": sha256_file(cfg.data.manifest),
        "splits": str(cfg.data.splits),
        "splits_sha256": sha256_file(cfg.data.splits),
        "splits_seed": split_set.seed,
        "folds": split_set.k,
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
    for dist in (
        "torch",
        "torchvision",
        "numpy",
        "pandas",
        "scikit-learn",
        "opencv-python-headless",
        "grad-cam",
    ):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
        versions.setdefault(dist, None)
    return versions


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@click.command("final")
@click.option(
    "--search",
    "search_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Search folder (its best.json and trials/).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="best_config.json (breastfusion aggregate) or a config YAML. [SEARCH/best.json]",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Export folder (replaced atomically).",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="refit",
    show_default=True,
    help="Refit on all development patients, or average the fold models.",
)
@click.option(
    "--target-sensitivity",
    type=float,
    default=None,
    help="Operating point: threshold reaching this sensitivity on the development OOF predictions.",
)
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Manifest CSV [the config's].",
)
@click.option(
    "--splits", type=click.Path(dir_okay=False, path_type=Path), help="Splits JSON [the config's]."
)
@click.option(
    "--epochs", type=int, default=None, help="Refit epochs [mean best epoch of the folds]."
)
@click.option(
    "--gradcam",
    "gradcam_per_category",
    type=int,
    default=3,
    show_default=True,
    help="Grad-CAM patients per category (TP, FN, FP); 0 = none.",
)
@click.option(
    "--bootstrap",
    type=int,
    default=2000,
    show_default=True,
    help="Bootstrap resamples for the AUC CI.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Bootstrap seed.")
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="[the config's]"
)
def final_command(
    search_dir: Path | None,
    config_file: Path | None,
    out: Path,
    mode: str,
    target_sensitivity: float | None,
    manifest: Path | None,
    splits: Path | None,
    epochs: int | None,
    gradcam_per_category: int,
    bootstrap: int,
    seed: int,
    device: str | None,
) -> None:
    """Refit (or ensemble) the chosen configuration, evaluate it once on the holdout, export it."""
    choice = _command_choice(search_dir, config_file)
    result = final_model(
        choice.config,
        manifest,
        splits,
        out,
        mode=mode,  # type: ignore[arg-type]
        fold_dirs=choice.fold_dirs,
        target_sensitivity=target_sensitivity,
        epochs=epochs,
        gradcam_per_category=gradcam_per_category,
        n_boot=bootstrap,
        seed=seed,
        device=device,
        progress=click.echo,
    )
    click.echo(result.headline)
    click.echo(f"wrote {out}/: {', '.join(sorted(result.files))}")


def _command_choice(search_dir: Path | None, config_file: Path | None) -> BestChoice:
    """--config best_config.json / config YAML and/or --search → config + fold folders."""
    if config_file is None:
        if search_dir is None:
            raise UserError("give --search SEARCH_DIR and/or --config best_config.json")
        return locate_best(search_dir)
    if config_file.suffix.lower() in (".yaml", ".yml"):
        cfg = load_yaml(config_file).to_dict()
        folds = locate_best(search_dir).fold_dirs if search_dir is not None else []
        return BestChoice(config=cfg, fold_dirs=folds, source=str(config_file))
    return locate_best(config_file, search_dir)
