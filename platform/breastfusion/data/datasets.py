"""Torch datasets over the preprocessing cache: single-modal and paired (US × DM per patient).

Samples follow CONTRIBUTING.md: single-modal ``{"image", "y", "patient_id"}``, paired
``{"dm", "us", "y", "patient_id"}``; images are FloatTensor(1, H, W) in [0, 1] (one grey
channel; the model's stem does the 3-channel/ImageNet part).

Why the whole split is held in memory: after preprocessing the images are small uint8 squares
(the full study cohort at 512 px is ~0.9 GB for DM+US; at 224 px ~0.2 GB), and one stacked
array makes ``__getitem__`` a slice plus a float conversion — no file I/O, no decode — so the
data pipeline does not hold back the model step. ``preload=False`` reads entries from the cache
per item instead (for cohorts that do not fit in RAM), at the cost of one file read per image.

The paired dataset forms every US × DM combination of a patient (the study's cross-combination),
so a patient with 2 US and 3 DM images gives 6 samples, all carrying the patient's id so that
predictions are averaged back to one score per patient. Patients lacking one modality cannot
form a pair; they are left out, counted (``excluded``) and logged, never silently dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from breastfusion.data.augment import (
    Augmenter,
    AugmentSpec,
    OversampleMode,
    build_augmenter,
    oversampling,
    seed_worker,
)
from breastfusion.data.cache import ImageCache, PreprocessSpec, WarmReport, default_spec
from breastfusion.errors import UserError

log = logging.getLogger(__name__)

MODALITIES = ("DM", "US")
Transform = Callable[[np.ndarray], np.ndarray]
_REQUIRED = ("patient_id", "modality", "abs_path", "y")
_MAX_LISTED = 10


def _to_tensor(arr: np.ndarray) -> torch.Tensor:
    # uint8 H×W → float32 1×H×W in [0, 1]. astype copies (cache arrays may be read-only and
    # must never be aliased by a tensor a model could write to).
    return torch.from_numpy(arr.astype(np.float32)).div_(255.0).unsqueeze_(0)


def _as_cache(cache: ImageCache | str | os.PathLike) -> ImageCache:
    return cache if isinstance(cache, ImageCache) else ImageCache(cache)


def _as_spec(spec: PreprocessSpec | int, modality: str) -> PreprocessSpec:
    return spec if isinstance(spec, PreprocessSpec) else default_spec(modality, int(spec))


def _make_transform(augment: AugmentSpec | Transform | None, size: int, seed: int):
    if augment is None or isinstance(augment, AugmentSpec):
        return build_augmenter(augment, size, seed)
    if not callable(augment):
        raise TypeError(f"augment must be an AugmentSpec, a callable or None, got {augment!r}")
    return augment


def _select_rows(df: pd.DataFrame, patient_ids: Iterable[str]) -> tuple[list[str], pd.DataFrame]:
    """Rows of the requested patients (ids as str, order kept), with every id checked."""
    missing_cols = [c for c in _REQUIRED if c not in df.columns]
    if missing_cols:
        raise UserError(f"the manifest table lacks column(s) {missing_cols}")
    ids = list(dict.fromkeys(str(p) for p in patient_ids))
    pid = df["patient_id"].astype(str)
    known = set(pid)
    unknown = [p for p in ids if p not in known]
    if unknown:
        listed = ", ".join(unknown[:_MAX_LISTED])
        more = f" ... and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        raise UserError(
            f"{len(unknown)} patient(s) requested for a dataset are not in the manifest: "
            f"{listed}{more}"
        )
    sub = df.loc[pid.isin(set(ids))].copy()
    sub["patient_id"] = sub["patient_id"].astype(str)
    sub["modality"] = sub["modality"].astype(str).str.upper()
    # Manifest line order makes sample order independent of how the table was filtered/sorted.
    if "row" in sub.columns:
        sub = sub.sort_values("row", kind="stable")
    return ids, sub


class _ImageStore:
    """The preprocessed images of one modality, in memory (stacked) or read per item."""

    def __init__(
        self,
        paths: Sequence[str],
        spec: PreprocessSpec,
        cache: ImageCache,
        *,
        preload: bool,
        workers: int,
    ):
        self.spec = spec
        self.paths = list(paths)
        self._cache = cache
        self.images: np.ndarray | None = None
        if preload:
            self.images, self.report = cache.load_many(self.paths, spec, workers=workers)
        else:
            self.report = cache.warm(self.paths, spec, workers=workers)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.images is not None:
            return self.images[i]
        return self._cache.get(self.paths[i], self.spec)

    def __len__(self) -> int:
        return len(self.paths)


class _CachedDataset(Dataset):
    """Shared bits: labels/patient ids per sample, augmenter reseeding, exclusion report."""

    labels: np.ndarray
    sample_patient_ids: list[str]
    patients: list[str]
    excluded: dict[str, str]
    cache_reports: dict[str, WarmReport]

    def _augmenters(self) -> list[Transform]:
        raise NotImplementedError

    @property
    def augmented(self) -> bool:
        """True when samples are randomly transformed (training only)."""
        return bool(self._augmenters())

    @property
    def n_excluded(self) -> int:
        return len(self.excluded)

    def reseed(self, seed: int) -> None:
        """Reseed every augmenter (called in each DataLoader worker; see augment.py)."""
        for k, aug in enumerate(self._augmenters()):
            if isinstance(aug, Augmenter):
                aug.reseed(int(seed) + 7919 * k)  # distinct streams per modality

    def __len__(self) -> int:
        return len(self.labels)


class SingleModalDataset(_CachedDataset):
    """All images of one modality (DM or US) of the given patients; one sample per image.

    Patients without an image of that modality are listed in ``excluded`` and logged.
    ``augment``: an ``AugmentSpec`` (built for this modality's size), any uint8→uint8 callable,
    or None (evaluation).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        patient_ids: Iterable[str],
        modality: str,
        spec: PreprocessSpec | int,
        cache: ImageCache | str | os.PathLike,
        *,
        augment: AugmentSpec | Transform | None = None,
        seed: int = 0,
        preload: bool = True,
        workers: int = 0,
    ):
        modality = modality.upper()
        if modality not in MODALITIES:
            raise UserError(f"unknown modality {modality!r} (expected DM or US)")
        self.modality = modality
        self.spec = _as_spec(spec, modality)
        ids, sub = _select_rows(df, patient_ids)
        rows = sub[sub["modality"] == modality]
        present = set(rows["patient_id"])
        self.patients = [p for p in ids if p in present]
        self.excluded = {p: f"no {modality} image" for p in ids if p not in present}
        if self.excluded:
            log.warning(
                "%s dataset: %d of %d patient(s) have no %s image and are left out",
                modality,
                len(self.excluded),
                len(ids),
                modality,
            )
        # Group by patient in the requested order (then manifest order within a patient).
        order = {p: i for i, p in enumerate(self.patients)}
        rows = rows.iloc[np.argsort(rows["patient_id"].map(order).to_numpy(), kind="stable")]
        self.store = _ImageStore(
            rows["abs_path"].astype(str).tolist(),
            self.spec,
            _as_cache(cache),
            preload=preload,
            workers=workers,
        )
        self.cache_reports = {modality: self.store.report}
        self.labels = rows["y"].astype(np.int64).to_numpy()
        self.sample_patient_ids = rows["patient_id"].tolist()
        self.transform = _make_transform(augment, self.spec.size, seed)

    def _augmenters(self) -> list[Transform]:
        return [self.transform] if self.transform is not None else []

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = self.store[i]
        if self.transform is not None:
            arr = self.transform(arr)
        return {
            "image": _to_tensor(arr),
            "y": int(self.labels[i]),
            "patient_id": self.sample_patient_ids[i],
        }


class PairedDataset(_CachedDataset):
    """Every US × DM image combination of each patient that has both modalities.

    ``excluded`` maps each left-out patient to the missing modality; the count is logged.
    ``augment`` is applied to each image independently (its own draws per modality).
    """

    def __init__(
        self,
        df: pd.DataFrame,
        patient_ids: Iterable[str],
        dm_spec: PreprocessSpec | int,
        us_spec: PreprocessSpec | int,
        cache: ImageCache | str | os.PathLike,
        *,
        augment: AugmentSpec | Transform | None = None,
        seed: int = 0,
        preload: bool = True,
        workers: int = 0,
    ):
        self.dm_spec = _as_spec(dm_spec, "DM")
        self.us_spec = _as_spec(us_spec, "US")
        ids, sub = _select_rows(df, patient_ids)
        by_patient = {p: g for p, g in sub.groupby("patient_id", sort=False)}
        dm_paths: dict[str, int] = {}
        us_paths: dict[str, int] = {}
        pairs: list[tuple[int, int]] = []
        labels: list[int] = []
        pids: list[str] = []
        self.patients = []
        self.excluded = {}
        for p in ids:
            g = by_patient[p]
            dm = g.loc[g["modality"] == "DM", "abs_path"].astype(str).tolist()
            us = g.loc[g["modality"] == "US", "abs_path"].astype(str).tolist()
            if not dm or not us:
                self.excluded[p] = "no DM image" if not dm else "no US image"
                continue
            # The manifest guarantees one label per patient; max() is robust to any table.
            y = int(g["y"].max())
            self.patients.append(p)
            for d, u in product(dm, us):
                pairs.append(
                    (dm_paths.setdefault(d, len(dm_paths)), us_paths.setdefault(u, len(us_paths)))
                )
                labels.append(y)
                pids.append(p)
        n_dm_only = sum(v == "no US image" for v in self.excluded.values())
        n_us_only = len(self.excluded) - n_dm_only
        if self.excluded:
            log.warning(
                "paired dataset: %d of %d patient(s) left out for lacking one modality "
                "(%d DM only, %d US only)",
                len(self.excluded),
                len(ids),
                n_dm_only,
                n_us_only,
            )
        log.info("paired dataset: %d patient(s) → %d US×DM pairs", len(self.patients), len(pairs))
        cache = _as_cache(cache)
        self.dm_store = _ImageStore(
            list(dm_paths), self.dm_spec, cache, preload=preload, workers=workers
        )
        self.us_store = _ImageStore(
            list(us_paths), self.us_spec, cache, preload=preload, workers=workers
        )
        self.cache_reports = {"DM": self.dm_store.report, "US": self.us_store.report}
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sample_patient_ids = pids
        self.dm_transform = _make_transform(augment, self.dm_spec.size, seed)
        self.us_transform = _make_transform(augment, self.us_spec.size, seed + 1)

    def _augmenters(self) -> list[Transform]:
        return [t for t in (self.dm_transform, self.us_transform) if t is not None]

    def __getitem__(self, i: int) -> dict[str, Any]:
        d, u = self.pairs[i]
        dm, us = self.dm_store[d], self.us_store[u]
        if self.dm_transform is not None:
            dm = self.dm_transform(dm)
        if self.us_transform is not None:
            us = self.us_transform(us)
        return {
            "dm": _to_tensor(dm),
            "us": _to_tensor(us),
            "y": int(self.labels[i]),
            "patient_id": self.sample_patient_ids[i],
        }


def _labels(ds: Dataset) -> np.ndarray:
    """Per-sample labels of a breastfusion dataset, seen through any Subset wrappers."""
    if isinstance(ds, Subset):
        return _labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if not hasattr(ds, "labels"):
        raise TypeError(
            f"{type(ds).__name__} has no per-sample 'labels'; use a breastfusion dataset"
        )
    return np.asarray(ds.labels)


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return ds


def default_num_workers() -> int:
    """Loader workers: none on ≤ 2 cores (they would steal the model's cores), else half the
    cores, at most 8.

    Measured on 2 shared cores at 224 px: without augmentation a preloaded pair costs ~0.04 ms
    in-process and workers only add IPC (≈10k pairs/s with 0 workers vs ≈1k with 2); with flips
    + elastic (p=0.25) a pair costs ~0.3 ms. Workers pay off when the model step is fast (GPU)
    and images are large (elastic ≈15 ms per 1024 px image).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        n = os.cpu_count() or 1
    return 0 if n <= 2 else min(8, n // 2)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    oversample: OversampleMode = "none",
    seed: int = 0,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """A repeatable DataLoader for a breastfusion dataset.

    ``train=True``: shuffled (or the balanced sampler), optional oversampling, and by default
    the last incomplete batch is dropped (a batch of one breaks BatchNorm in training).
    ``train=False``: fixed order, every sample once; oversampling or an augmented dataset is
    refused, because evaluation must see each real image exactly once, unmodified.

    Shuffling, the sampler, worker seeds and hence augmentations all derive from ``seed``
    (re-seed ``loader.generator`` per epoch, as the engine does, to make each epoch a function
    of its own seed). ``pin_memory`` defaults to whether CUDA is available.
    ``persistent_workers`` defaults to False: torch draws the workers' base seed only when
    workers start, so persistent workers would continue their augmentation streams across
    epochs and a run resumed at epoch k would not replay epoch k exactly; re-forking workers
    costs well under a second per epoch (the arrays are shared copy-on-write).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    base = _base(dataset)
    if len(dataset) == 0:
        excluded = getattr(base, "n_excluded", 0)
        raise UserError(
            f"no samples to load ({'training' if train else 'evaluation'} data): "
            f"{excluded} patient(s) were left out for lacking a modality"
        )
    if not train:
        if oversample != "none":
            raise ValueError("oversampling is for training data only (got train=False)")
        if getattr(base, "augmented", False):
            raise ValueError(
                "evaluation data must not be augmented: build the dataset without augment="
            )
    labels = _labels(dataset)
    sampler, indices = oversampling(labels, oversample, seed) if train else (None, None)
    if indices is not None:
        dataset = Subset(dataset, indices)
    if num_workers is None:
        num_workers = default_num_workers()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = False
    if drop_last is None:
        drop_last = train and len(dataset) > batch_size
    if num_workers == 0 and hasattr(base, "reseed"):
        # Main-process augmentation: restart its stream so the same seed gives the same run.
        base.reseed(seed)
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=gen,
    )


def patient_dataset_summary(ds: _CachedDataset) -> dict[str, Any]:
    """Counts for logs/metadata: samples, patients, class balance, exclusions, cache use."""
    return {
        "samples": len(ds),
        "patients": len(ds.patients),
        "malignant_samples": int(np.sum(ds.labels)),
        "excluded_patients": ds.n_excluded,
        "cache": {k: v.as_dict() for k, v in ds.cache_reports.items()},
    }


__all__ = [
    "PairedDataset",
    "SingleModalDataset",
    "default_num_workers",
    "make_loader",
    "patient_dataset_summary",
]
