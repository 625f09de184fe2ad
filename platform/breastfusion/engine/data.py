"""What a training run reads: the cohort (manifest + splits), a fold's patients, datasets, loaders.

``engine.fold`` (a search fold, ``breastfusion train``) and ``final`` (refit, ensemble, holdout
prediction) build their data here, so a dataset is made one way only: the same cache, the
same preprocessing specs, the same pairing. A search trial loads the ``Cohort`` once and
passes it to every fold (the manifest is not re-read per fold).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastfusion.config import Config
from breastfusion.errors import ConfigError, SplitError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cohort:
    """A validated manifest table and its leakage-checked splits."""

    table: pd.DataFrame
    splits: Any  # breastfusion.data.splits.Splits
    manifest: str
    splits_path: str

    def labels(self) -> pd.Series:
        """Patient id → 0/1."""
        df = self.table
        return df.assign(pid=df["patient_id"].astype(str)).groupby("pid")["y"].max()


def load_cohort(cfg: Config) -> Cohort:
    """Read ``data.manifest`` and ``data.splits`` (checked against each other)."""
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import load_splits

    if not cfg.data.manifest:
        raise ConfigError("no manifest given: set data.manifest")
    if not cfg.data.splits:
        raise ConfigError("no splits file given: set data.splits")
    df = load_manifest(cfg.data.manifest, allow_outside=cfg.data.allow_outside)
    return Cohort(df, load_splits(cfg.data.splits, df), cfg.data.manifest, cfg.data.splits)


def cohort_for(cfg: Config, cohort: Cohort | None) -> Cohort:
    """``cohort`` when it is the one ``cfg`` names, else a fresh read."""
    if cohort is not None and cohort.manifest == cfg.data.manifest:
        if cohort.splits_path == cfg.data.splits:
            return cohort
    return load_cohort(cfg)


def fold_patients(cfg: Config, cohort: Cohort) -> tuple[list[str], list[str]]:
    """The fold's (training, validation) patient ids; ``data.max_patients`` caps each."""
    from breastfusion.data.splits import subsample_patients

    fold, k = cfg.data.fold, cohort.splits.k
    if not 0 <= fold < k:
        raise SplitError(
            f"data.fold {fold} is out of range: {cohort.splits_path} has {k} folds (0..{k - 1})"
        )
    train_ids, val_ids = (list(ids) for ids in cohort.splits.train_val(fold))
    if cfg.data.max_patients is not None:
        labels = cohort.labels()
        n, seed = cfg.data.max_patients, cfg.optim.seed
        train_ids = subsample_patients(train_ids, labels, n, seed)
        val_ids = subsample_patients(val_ids, labels, n, seed + 1)
    return train_ids, val_ids


def inner_split(
    ids: Sequence[str], labels: pd.Series, fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """A stratified, seeded patient split of a training fold: (inner training, inner monitoring).

    Early stopping picks its epoch on the inner monitoring patients, never on the fold's own
    validation patients. Each class keeps at least one patient on both sides when it can.
    """
    rng = np.random.default_rng(seed + 7_777)
    ids = list(ids)
    y = labels.loc[ids].to_numpy()
    monitor: set[str] = set()
    for cls in (0, 1):
        members = [p for p, v in zip(ids, y, strict=True) if v == cls]
        if len(members) < 2:
            continue
        n = min(len(members) - 1, max(1, round(fraction * len(members))))
        monitor.update(rng.choice(members, n, replace=False).tolist())
    if not monitor:
        raise UserError(
            f"optim.patience > 0 needs an inner split of the training fold, but its {len(ids)} "
            "patients are too few; set optim.patience: 0 (train every epoch, keep the last)"
        )
    return [p for p in ids if p not in monitor], [p for p in ids if p in monitor]


def cache_dir(cfg: Config, fallback: str | Path | None = None) -> str:
    """``data.cache_dir``, else a ``.cache`` beside the manifest (or ``fallback`` when that
    folder cannot be written, e.g. a read-only data mount)."""
    from breastfusion.data.cache import default_cache_dir

    if cfg.data.cache_dir:
        return cfg.data.cache_dir
    return str(default_cache_dir(cfg.data.manifest, fallback))


def preprocess_specs(cfg: Config) -> dict[str, Any]:
    """The ``PreprocessSpec`` of each branch ``cfg`` uses (``data.resize``, ``data.size_*``)."""
    from breastfusion.data.cache import default_spec

    return {
        b: default_spec(b, getattr(cfg.data, f"size_{b}"), cfg.data.resize) for b in cfg.branches
    }


def build_dataset(
    cfg: Config,
    table: pd.DataFrame,
    ids: Sequence[str],
    *,
    train: bool,
    cache: str | Path | None = None,
) -> Any:
    """The dataset of ``ids``: paired for fusion, single-modal otherwise. ``train`` adds the
    configured augmentation and per-epoch pair sampling; evaluation datasets use every pair."""
    from breastfusion.data.augment import AugmentSpec
    from breastfusion.data.datasets import PairedDataset, SingleModalDataset

    a = cfg.augment
    aug = AugmentSpec(a.hflip, a.vflip, a.elastic, a.strength) if train else None
    specs = preprocess_specs(cfg)
    where = str(cache) if cache is not None else cache_dir(cfg)
    seed = cfg.optim.seed
    if cfg.data.modality == "fusion":
        return PairedDataset(
            table,
            ids,
            specs["dm"],
            specs["us"],
            where,
            augment=aug,
            seed=seed,
            pairs_per_patient=cfg.data.pairs_per_patient if train else None,
        )
    m = cfg.data.modality
    return SingleModalDataset(table, ids, m.upper(), specs[m], where, augment=aug, seed=seed)


def build_loader(cfg: Config, dataset: Any, *, train: bool) -> Any:
    from breastfusion.data.datasets import make_loader

    return make_loader(
        dataset,
        batch_size=cfg.optim.batch_size,
        train=train,
        oversample=cfg.augment.oversample if train else "none",
        seed=cfg.optim.seed,
        num_workers=cfg.data.num_workers,
    )


def require_samples(cfg: Config, dataset: Any, ids: Sequence[str], what: str) -> None:
    if len(dataset) == 0:
        raise UserError(
            f"fold {cfg.data.fold}: no {what} samples for modality {cfg.data.modality!r} "
            f"({len(ids)} patients, {dataset.n_excluded} without the needed image(s))"
        )
