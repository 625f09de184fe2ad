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
For training, ``pairs_per_patient`` caps each patient's samples per epoch and draws different
pairs each epoch (``pairing.py``); the loader's ``set_epoch`` advances it (``loaders.py``).
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
from torch.utils.data import Dataset

from breastfusion.data.augment import Augmenter, AugmentSpec, build_augmenter
from breastfusion.data.cache import ImageCache, PreprocessSpec, WarmReport, default_spec
from breastfusion.data.loaders import (  # re-exported: engine and final import them from here
    default_num_workers,
    make_loader,
    set_loader_epoch,
)
from breastfusion.data.pairing import PairSchedule
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

    pairs_per_patient: int | None = None  # only PairedDataset samples per epoch

    def set_epoch(self, epoch: int) -> None:
        """Per-epoch resampling hook (``PairedDataset`` with ``pairs_per_patient``); no-op."""

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


class _CrossPairs:
    """Every US × DM combination of each patient with both modalities, grouped by patient
    (a patient's pairs are contiguous, in manifest order)."""

    def __init__(self, ids: list[str], sub: pd.DataFrame):
        # One pass over plain columns (not a DataFrame filter per patient): linear in rows
        # with a small constant, which keeps building large cohorts cheap.
        images: dict[str, dict[str, list[str]]] = {p: {"DM": [], "US": []} for p in ids}
        label: dict[str, int] = {}
        columns = (sub["patient_id"], sub["modality"], sub["abs_path"].astype(str), sub["y"])
        for p, mod, path, y in zip(*columns, strict=True):
            if mod in ("DM", "US"):
                images[p][mod].append(path)
            # The manifest guarantees one label per patient; max() is robust to any table.
            label[p] = max(label.get(p, 0), int(y))
        self.dm_paths: dict[str, int] = {}
        self.us_paths: dict[str, int] = {}
        pairs: list[tuple[int, int]] = []
        self.labels: list[int] = []  # one per patient
        self.counts: list[int] = []
        self.patients: list[str] = []
        self.excluded: dict[str, str] = {}
        for p in ids:
            dm, us = images[p]["DM"], images[p]["US"]
            if not dm or not us:
                self.excluded[p] = "no DM image" if not dm else "no US image"
                continue
            self.patients.append(p)
            self.labels.append(label[p])
            self.counts.append(len(dm) * len(us))
            for d, u in product(dm, us):
                dm_i = self.dm_paths.setdefault(d, len(self.dm_paths))
                pairs.append((dm_i, self.us_paths.setdefault(u, len(self.us_paths))))
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    def log_exclusions(self, n_requested: int) -> None:
        if not self.excluded:
            return
        n_dm_only = sum(v == "no US image" for v in self.excluded.values())
        log.warning(
            "paired dataset: %d of %d patient(s) left out for lacking one modality "
            "(%d DM only, %d US only)",
            len(self.excluded),
            n_requested,
            n_dm_only,
            len(self.excluded) - n_dm_only,
        )


class PairedDataset(_CachedDataset):
    """US × DM image pairs of each patient that has both modalities.

    ``pairs_per_patient=None`` (the study): every combination, every epoch. An integer N:
    each patient fills ``min(N, its pairs)`` samples per epoch, with different pairs each
    epoch (``set_epoch``; see ``pairing.py``), so epoch cost grows with patients, not pairs.
    Training only: evaluation loaders refuse it. ``all_pairs`` holds every combination;
    ``pairs`` the current epoch's (both index into ``dm_store``/``us_store``).
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
        pairs_per_patient: int | None = None,
    ):
        self.dm_spec = _as_spec(dm_spec, "DM")
        self.us_spec = _as_spec(us_spec, "US")
        ids, sub = _select_rows(df, patient_ids)
        cross = _CrossPairs(ids, sub)
        cross.log_exclusions(len(ids))
        self.patients, self.excluded = cross.patients, cross.excluded
        self.all_pairs = cross.pairs
        self.pairs_per_patient = pairs_per_patient
        self.schedule = PairSchedule(cross.counts, cross.patients, pairs_per_patient, seed)
        self.labels = np.asarray(cross.labels, dtype=np.int64)[self.schedule.slot_patient]
        self.sample_patient_ids = [self.patients[i] for i in self.schedule.slot_patient]
        per_epoch = "" if pairs_per_patient is None else f", {len(self.labels)} per epoch"
        log.info(
            "paired dataset: %d patient(s) → %d US×DM pairs%s",
            len(self.patients),
            len(self.all_pairs),
            per_epoch,
        )
        cache = _as_cache(cache)
        self.dm_store = _ImageStore(
            list(cross.dm_paths), self.dm_spec, cache, preload=preload, workers=workers
        )
        self.us_store = _ImageStore(
            list(cross.us_paths), self.us_spec, cache, preload=preload, workers=workers
        )
        self.cache_reports = {"DM": self.dm_store.report, "US": self.us_store.report}
        self.epoch = -1
        self.set_epoch(0)
        self.dm_transform = _make_transform(augment, self.dm_spec.size, seed)
        self.us_transform = _make_transform(augment, self.us_spec.size, seed + 1)

    def set_epoch(self, epoch: int) -> None:
        """Draw ``epoch``'s pairs (a function of the seed and the epoch only); no-op without
        ``pairs_per_patient`` or when the epoch is already set."""
        epoch = int(epoch)
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if self.pairs_per_patient is None:
            self.pairs = self.all_pairs
        else:
            self.pairs = self.all_pairs[self.schedule.pairs_for_epoch(epoch)]

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


def patient_dataset_summary(ds: _CachedDataset) -> dict[str, Any]:
    """Counts for logs/metadata: samples, patients, class balance, exclusions, cache use."""
    all_pairs = getattr(ds, "all_pairs", None)
    return {
        "samples": len(ds),
        "samples_total": len(all_pairs) if all_pairs is not None else len(ds),
        "pairs_per_patient": ds.pairs_per_patient,
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
    "set_loader_epoch",
]
