"""Per-epoch pair sampling (data.pairs_per_patient): schedule, dataset, loaders, oversampling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from breastfusion.data.cache import ImageCache
from breastfusion.data.datasets import (
    PairedDataset,
    SingleModalDataset,
    make_loader,
    patient_dataset_summary,
    set_loader_epoch,
)
from breastfusion.data.pairing import PairSchedule

# patient -> (label, DM images, US images): p1 has 3 × 2 = 6 pairs, p2 1, p5 2; p3/p4 lack one.
COHORT = {"p1": (1, 3, 2), "p2": (0, 1, 1), "p3": (0, 2, 0), "p4": (1, 0, 1), "p5": (0, 1, 2)}
ALL = list(COHORT)


@pytest.fixture
def cohort(tmp_path: Path) -> pd.DataFrame:
    """A manifest-like table over tiny distinct PNGs (every image tells its pair apart)."""
    rows = []
    for pid, (y, n_dm, n_us) in COHORT.items():
        for mod, count, shape in (("DM", n_dm, (48, 32)), ("US", n_us, (40, 40))):
            for _ in range(count):
                n = len(rows) + 1
                arr = np.random.default_rng(n).integers(0, 256, size=shape, dtype=np.uint8)
                arr[0, 0], arr[-1, -1] = 0, 255
                path = tmp_path / f"{pid}_{mod}_{n}.png"
                Image.fromarray(arr).save(path)
                rows.append(dict(patient_id=pid, modality=mod, abs_path=str(path), y=y, row=n + 1))
    return pd.DataFrame(rows)


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "cache")


def _per_patient(schedule: PairSchedule, epoch: int) -> list[list[int]]:
    picked = schedule.pairs_for_epoch(epoch)
    return [picked[schedule.slot_patient == i].tolist() for i in range(len(schedule.counts))]


def test_schedule_caps_slots_and_keeps_each_epoch_within_the_patient():
    s = PairSchedule([12, 1, 3, 5], ["a", "b", "c", "d"], per_patient=2, seed=0)
    assert s.slots_per_patient.tolist() == [2, 1, 2, 2] and s.n_slots == 7 and s.n_pairs == 21
    np.testing.assert_array_equal(s.slot_patient, [0, 0, 1, 2, 2, 3, 3])
    for epoch in range(10):
        for i, picked in enumerate(_per_patient(s, epoch)):
            lo, hi = s.starts[i], s.starts[i] + s.counts[i]
            assert all(lo <= p < hi for p in picked)
            assert len(set(picked)) == len(picked)  # never the same pair twice in an epoch


def test_schedule_cycles_through_every_pair():
    s = PairSchedule([12, 5, 1], ["a", "b", "c"], per_patient=2, seed=3)
    assert s.cycle_epochs() == 6
    for cycle in range(3):
        epochs = range(6 * cycle, 6 * cycle + 6)
        seen = [p for e in epochs for p in _per_patient(s, e)[0]]
        assert sorted(seen) == list(range(12))  # 12 pairs, 2 per epoch: each exactly once
        seen_b = {p for e in range(3 * cycle, 3 * cycle + 3) for p in _per_patient(s, e)[1]}
        assert seen_b == set(range(12, 17))  # 5 pairs in 3 epochs (last deal topped up)
    assert all(_per_patient(s, e)[2] == [17] for e in range(5))
    # A new shuffle per cycle: the deals of cycle 1 are not those of cycle 0 again.
    deals = [sorted(_per_patient(s, e)[0]) for e in range(12)]
    assert deals[:6] != deals[6:]


def test_schedule_is_a_function_of_seed_epoch_and_patient_only():
    a = PairSchedule([6, 4], ["x", "y"], per_patient=1, seed=7)
    b = PairSchedule([6, 4], ["x", "y"], per_patient=1, seed=7)
    c = PairSchedule([6, 4], ["x", "y"], per_patient=1, seed=8)
    runs = [[x.pairs_for_epoch(e).tolist() for e in range(8)] for x in (a, b, c)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert len({tuple(r) for r in runs[0][:6]}) > 1  # the pairs change between epochs
    # Patient "y" draws the same pairs whoever else is in the fold.
    alone = PairSchedule([4], ["y"], per_patient=1, seed=7)
    assert [alone.pairs_for_epoch(e)[0] for e in range(8)] == [r[1] - 6 for r in runs[0]]


def test_schedule_without_cap_is_every_pair_in_order():
    s = PairSchedule([3, 2], ["a", "b"], per_patient=None)
    np.testing.assert_array_equal(s.pairs_for_epoch(5), [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="pairs_per_patient"):
        PairSchedule([3], ["a"], per_patient=0)


def _pair_keys(ds: PairedDataset) -> dict[tuple[bytes, bytes], int]:
    """Sample bytes → index into ds.all_pairs (the test images are all distinct)."""
    keys = {}
    for k, (d, u) in enumerate(ds.all_pairs):
        keys[(ds.dm_store[d].tobytes(), ds.us_store[u].tobytes())] = k
    return keys


def _loaded_pairs(loader: DataLoader, keys: dict) -> list[int]:
    out = []
    for b in loader:
        for dm, us in zip(b["dm"], b["us"], strict=True):
            d = (dm[0].numpy() * 255).round().astype(np.uint8).tobytes()
            u = (us[0].numpy() * 255).round().astype(np.uint8).tobytes()
            out.append(keys[(d, u)])
    return out


def test_paired_dataset_samples_per_epoch(cohort, cache):
    full = PairedDataset(cohort, ALL, 32, 24, cache)
    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=2, seed=1)
    np.testing.assert_array_equal(ds.all_pairs, full.pairs)
    assert len(ds) == 2 + 1 + 2 and ds.sample_patient_ids == ["p1", "p1", "p2", "p5", "p5"]
    np.testing.assert_array_equal(ds.labels, [1, 1, 0, 0, 0])
    p1_full = {tuple(p) for p in full.pairs[:6]}
    seen = set()
    for epoch in (3, 4, 5):  # the second cycle of 3 epochs (6 pairs, 2 per epoch)
        ds.set_epoch(epoch)
        p1 = {tuple(p) for p in ds.pairs[:2]}
        assert len(p1) == 2 and p1 <= p1_full and not p1 & seen
        seen |= p1
        s = ds[0]
        d, u = ds.pairs[0]
        assert torch.equal(s["dm"][0], torch.from_numpy(ds.dm_store[d] / np.float32(255)))
        assert torch.equal(s["us"][0], torch.from_numpy(ds.us_store[u] / np.float32(255)))
    assert seen == p1_full  # 6 pairs, 2 per epoch: all seen in 3 epochs
    again = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=2, seed=1)
    again.set_epoch(5)
    np.testing.assert_array_equal(again.pairs, ds.pairs)
    summary = patient_dataset_summary(ds)
    assert summary["samples"] == 5 and summary["samples_total"] == 9
    assert summary["pairs_per_patient"] == 2
    assert patient_dataset_summary(full)["samples_total"] == 9


def test_training_loader_sampler_advances_the_epoch(cohort, cache):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=1, seed=0)
    keys = _pair_keys(ds)
    loader = make_loader(ds, batch_size=2, train=True, seed=0, num_workers=0, drop_last=False)
    per_epoch = []
    for epoch in range(6, 12):  # one whole cycle of p1 (6 pairs, 1 per epoch)
        loader.sampler.set_epoch(epoch)  # what the engine's loop calls
        got = _loaded_pairs(loader, keys)
        assert sorted(got) == sorted(ds.schedule.pairs_for_epoch(epoch).tolist())
        per_epoch.append(got)
    p1 = {k for got in per_epoch for k in got if k < 6}
    assert p1 == set(range(6))  # p1's 6 pairs over 6 epochs, one per epoch


def test_set_loader_epoch_reaches_the_dataset_through_wrappers(cohort, cache):
    class Opaque(Sampler[int]):  # like DDP's shard sampler: no set_epoch of its own
        def __init__(self, n):
            self.n = n

        def __iter__(self):
            return iter(range(self.n))

        def __len__(self):
            return self.n

    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=1, seed=0)
    train = make_loader(ds, batch_size=2, train=True, oversample="replicate", num_workers=0)
    wrapped = DataLoader(train.dataset, batch_size=2, sampler=Opaque(len(train.dataset)))
    set_loader_epoch(wrapped, 4)
    assert ds.epoch == 4
    np.testing.assert_array_equal(ds.pairs, ds.all_pairs[ds.schedule.pairs_for_epoch(4)])
    set_loader_epoch(DataLoader(SingleModalDataset(cohort, ["p1"], "DM", 32, cache)), 2)  # no-op


@pytest.mark.parametrize("mode", ["sampler", "replicate"])
def test_oversampling_stays_consistent_across_epochs(cohort, cache, mode):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=1, seed=0)
    np.testing.assert_array_equal(ds.labels, [1, 0, 0])  # slot labels: fixed for every epoch
    keys = _pair_keys(ds)
    loader = make_loader(
        ds, batch_size=2, train=True, oversample=mode, seed=0, num_workers=0, drop_last=False
    )
    if mode == "sampler":
        # Balanced weights from the slot labels stay right after any resampling.
        weights = loader.sampler.inner.weights.numpy()
        np.testing.assert_allclose(weights, [1.0, 0.5, 0.5])
    p1_seen = set()
    for epoch in range(1, 7):
        loader.sampler.set_epoch(epoch)
        got = _loaded_pairs(loader, keys)
        assert len(got) == (4 if mode == "replicate" else 3)  # same length every epoch
        assert set(got) <= set(ds.schedule.pairs_for_epoch(epoch).tolist())
        p1_seen |= {k for k in got if k < 6}
        if mode == "replicate":  # the malignant slot replicated: 2 malignant, 2 benign
            assert Counter(1 if k < 6 else 0 for k in got) == {1: 2, 0: 2}
    if mode == "replicate":
        assert len(p1_seen) == 5  # epochs 1..5 of cycle 0, then epoch 6 starts cycle 1


def test_evaluation_refuses_sampling_and_persistent_workers(cohort, cache):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=2)
    with pytest.raises(ValueError, match="every pair"):
        make_loader(ds, batch_size=2, train=False, num_workers=0)
    with pytest.raises(ValueError, match="persistent"):
        make_loader(ds, batch_size=2, train=True, num_workers=1, persistent_workers=True)
    full = PairedDataset(cohort, ALL, 32, 24, cache)
    loader = make_loader(full, batch_size=4, train=False, num_workers=0)
    assert sum(len(b["y"]) for b in loader) == 9  # evaluation: every pair


def test_worker_processes_see_the_new_epoch(cohort, cache):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, pairs_per_patient=1, seed=0)
    keys = _pair_keys(ds)
    loader = make_loader(ds, batch_size=1, train=True, seed=0, num_workers=1)
    for epoch in (1, 2):
        set_loader_epoch(loader, epoch)
        got = _loaded_pairs(loader, keys)
        assert sorted(got) == sorted(ds.schedule.pairs_for_epoch(epoch).tolist())
