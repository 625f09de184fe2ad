"""Datasets, augmentation, oversampling and loaders over the preprocessing cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from breastfusion.data import imaging
from breastfusion.data.augment import (
    Augmenter,
    AugmentSpec,
    balanced_sampler,
    build_augmenter,
    oversampling,
    replicate_indices,
)
from breastfusion.data.cache import ImageCache, PreprocessSpec
from breastfusion.data.datasets import (
    PairedDataset,
    SingleModalDataset,
    make_loader,
    patient_dataset_summary,
)
from breastfusion.errors import ConfigError, UserError

# patient -> (label, number of DM images, number of US images)
COHORT = {
    "p1": (1, 3, 2),  # 3 DM × 2 US → 6 pairs
    "p2": (0, 1, 1),
    "p3": (0, 2, 0),  # DM only
    "p4": (1, 0, 1),  # US only
    "p5": (0, 1, 2),
}


def _write(path: Path, h: int, w: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    arr[0, 0], arr[-1, -1] = 0, 255
    Image.fromarray(arr).save(path)
    return str(path)


@pytest.fixture
def cohort(tmp_path: Path) -> pd.DataFrame:
    """A manifest-like table (load_manifest's output columns) over tiny PNGs."""
    rows = []
    n = 0
    for pid, (y, n_dm, n_us) in COHORT.items():
        for mod, count, shape in (("DM", n_dm, (48, 32)), ("US", n_us, (40, 40))):
            for _ in range(count):
                n += 1
                path = _write(tmp_path / f"{pid}_{mod}_{n}.png", *shape, seed=n)
                rows.append(
                    dict(
                        patient_id=pid,
                        modality=mod,
                        path=Path(path).name,
                        abs_path=path,
                        label="malignant" if y else "benign",
                        y=y,
                        row=n + 1,
                    )
                )
    return pd.DataFrame(rows)


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(tmp_path / "cache")


ALL = list(COHORT)
FLIPS = AugmentSpec(hflip=0.5, vflip=0.5)
HEAVY = AugmentSpec(hflip=0.5, vflip=0.5, elastic=1.0, strength=1.0)


def test_paired_dataset_forms_every_us_dm_combination(cohort, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.datasets"):
        ds = PairedDataset(cohort, ALL, 32, 24, cache)
    assert len(ds) == 6 + 1 + 2
    assert ds.sample_patient_ids.count("p1") == 6
    assert ds.patients == ["p1", "p2", "p5"]
    assert ds.excluded == {"p3": "no US image", "p4": "no DM image"}
    assert ds.n_excluded == 2
    assert "2 of 5 patient(s) left out" in caplog.text and "1 DM only, 1 US only" in caplog.text
    # Pairs of p1 are distinct combinations of its 3 DM and 2 US images.
    p1 = ds.pairs[np.array(ds.sample_patient_ids) == "p1"]
    assert len({tuple(p) for p in p1}) == 6
    assert len(set(p1[:, 0])) == 3 and len(set(p1[:, 1])) == 2
    np.testing.assert_array_equal(ds.labels, [1] * 6 + [0] * 3)


def test_paired_sample_follows_contract(cohort, cache):
    ds = PairedDataset(
        cohort, ["p2"], PreprocessSpec(32, "pad"), PreprocessSpec(24, "squash"), cache
    )
    s = ds[0]
    assert set(s) == {"dm", "us", "y", "patient_id"}
    assert s["dm"].shape == (1, 32, 32) and s["us"].shape == (1, 24, 24)
    assert s["dm"].dtype == torch.float32
    assert 0.0 <= float(s["dm"].min()) and float(s["dm"].max()) <= 1.0
    assert s["y"] == 0 and isinstance(s["y"], int) and s["patient_id"] == "p2"
    # A 48×32 DM is padded (black side columns); values match the cache exactly.
    cached = cache.get(
        cohort[(cohort.patient_id == "p2") & (cohort.modality == "DM")].abs_path.iloc[0], ds.dm_spec
    )
    np.testing.assert_allclose(s["dm"][0].numpy(), cached / 255.0, atol=1e-7)
    assert float(s["dm"][0, :, 0].max()) == 0.0


def test_single_modal_dataset(cohort, cache, caplog):
    with caplog.at_level(logging.WARNING, logger="breastfusion.data.datasets"):
        dm = SingleModalDataset(cohort, ALL, "dm", 32, cache)
    assert len(dm) == 3 + 1 + 2 + 0 + 1
    assert dm.excluded == {"p4": "no DM image"} and "have no DM image" in caplog.text
    s = dm[0]
    assert set(s) == {"image", "y", "patient_id"} and s["image"].shape == (1, 32, 32)
    assert dm.sample_patient_ids[:3] == ["p1"] * 3 and s["y"] == 1
    us = SingleModalDataset(cohort, ["p4", "p1"], "US", 24, cache)
    assert us.sample_patient_ids == ["p4", "p1", "p1"]  # requested patient order
    np.testing.assert_array_equal(us.labels, [1, 1, 1])
    summary = patient_dataset_summary(us)
    assert summary["samples"] == 3 and summary["patients"] == 2


def test_empty_paired_dataset_is_a_clear_error(cohort, cache):
    ds = PairedDataset(cohort, ["p3", "p4"], 32, 24, cache)
    assert len(ds) == 0 and ds.n_excluded == 2
    with pytest.raises(UserError, match="2 patient"):
        make_loader(ds, batch_size=2, train=True, num_workers=0)


def test_unknown_patient_is_named(cohort, cache):
    with pytest.raises(UserError, match="p99"):
        PairedDataset(cohort, ["p1", "p99"], 32, 24, cache)
    with pytest.raises(UserError, match="MRI"):
        SingleModalDataset(cohort, ["p1"], "MRI", 32, cache)


def test_second_dataset_build_decodes_nothing(cohort, cache, monkeypatch):
    PairedDataset(cohort, ALL, 32, 24, cache)

    def boom(path):
        raise AssertionError(f"decoded {path} although it is cached")

    monkeypatch.setattr(imaging, "load_normalised", boom)
    ds = PairedDataset(cohort, ALL, 32, 24, cache)
    assert ds.cache_reports["DM"].decoded == 0 and ds.cache_reports["US"].reused == 5


def test_preload_and_lazy_give_same_samples(cohort, cache):
    a = PairedDataset(cohort, ALL, 32, 24, cache)
    b = PairedDataset(cohort, ALL, 32, 24, cache, preload=False)
    for i in (0, 5, 8):
        assert torch.equal(a[i]["dm"], b[i]["dm"]) and torch.equal(a[i]["us"], b[i]["us"])


# --- augmentation ---------------------------------------------------------------------------


def test_augmenter_is_deterministic_per_seed():
    img = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    runs = []
    for seed in (1, 1, 2):
        aug = Augmenter(HEAVY, 32, seed)
        runs.append(np.stack([aug(img) for _ in range(6)]))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    assert runs[0].dtype == np.uint8 and runs[0].shape == (6, 32, 32)
    aug = Augmenter(HEAVY, 32, 5)
    first = aug(img)
    aug.reseed(5)
    np.testing.assert_array_equal(aug(img), first)


def test_augmenter_survives_pickling():
    # Spawn-started loader workers (macOS) receive the dataset, augmenters included, by pickle.
    import pickle

    img = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    aug = Augmenter(HEAVY, 32, 3)
    clone = pickle.loads(pickle.dumps(aug))
    np.testing.assert_array_equal(clone(img), aug(img))


def test_flips_cover_none_horizontal_vertical_both():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    variants = {
        "none": img,
        "h": img[:, ::-1],
        "v": img[::-1],
        "both": img[::-1, ::-1],
    }
    aug = Augmenter(FLIPS, 4, 0)
    seen = {k: 0 for k in variants}
    for _ in range(400):
        out = aug(img)
        (k,) = [k for k, v in variants.items() if np.array_equal(out, v)]
        seen[k] += 1
    assert all(60 < n < 140 for n in seen.values()), seen


def test_elastic_strength_scales_deformation():
    img = np.zeros((64, 64), dtype=np.uint8)
    img[::8] = 255  # grid lines show displacement
    mild = Augmenter(AugmentSpec(0, 0, elastic=1.0, strength=0.5), 64, 3)(img)
    strong = Augmenter(AugmentSpec(0, 0, elastic=1.0, strength=3.0), 64, 3)(img)
    d_mild = np.abs(mild.astype(int) - img).mean()
    d_strong = np.abs(strong.astype(int) - img).mean()
    assert 0 < d_mild < d_strong


def test_elastic_field_is_calibrated_and_aligned():
    import albumentations as A

    from breastfusion.data.augment import _smooth_elastic_class

    cls = _smooth_elastic_class()
    img = np.random.default_rng(0).integers(0, 256, (50, 50), dtype=np.uint8)
    # Zero displacement must reproduce the image exactly (the coarse grid is aligned).
    still = A.Compose([cls(rms=0.0, sigma=2.5, p=1)], seed=0)(image=img)["image"]
    np.testing.assert_array_equal(still, img)
    t = cls(rms=3.0, sigma=5.0, p=1)
    t.set_random_seed(0)
    maps = t.get_params_dependent_on_data({"shape": (64, 64)}, {})
    ys, xs = np.indices((64, 64))
    disp = np.sqrt(((maps["map_x"] - xs) ** 2 + (maps["map_y"] - ys) ** 2).mean() / 2)
    assert 2.0 < disp < 4.0  # ≈ the requested RMS per axis


def test_augment_spec_validation():
    with pytest.raises(ConfigError, match="hflip"):
        AugmentSpec(hflip=1.5)
    with pytest.raises(ConfigError, match="strength"):
        AugmentSpec(strength=-1)
    assert build_augmenter(AugmentSpec(0, 0, 0), 32) is None
    assert build_augmenter(None, 32) is None


# --- oversampling ---------------------------------------------------------------------------


def test_sampler_balances_classes_and_is_seeded():
    labels = [0] * 900 + [1] * 100
    s = balanced_sampler(labels, seed=0)
    drawn = np.array(list(s))
    assert len(drawn) == 1000
    frac = np.asarray(labels)[drawn].mean()
    assert 0.43 < frac < 0.57
    np.testing.assert_array_equal(drawn, list(balanced_sampler(labels, seed=0)))
    assert not np.array_equal(drawn, list(balanced_sampler(labels, seed=1)))


def test_replication_balances_exactly_and_evenly():
    labels = np.array([0] * 10 + [1] * 3)
    idx = replicate_indices(labels, seed=0)
    counts = np.bincount(labels[idx])
    assert counts[0] == counts[1] == 10
    reps = np.bincount(idx)[10:]
    assert sorted(reps) == [3, 3, 4]  # 3 copies each + one remainder
    assert replicate_indices([0, 1], seed=0) == [0, 1]
    with pytest.raises(ConfigError, match="oversampling"):
        oversampling(labels, "smote", 0)  # type: ignore[arg-type]


# --- loaders: training only gets augmentation/oversampling; runs repeat ---------------------


def _batches(loader):
    return [
        (b["dm"].clone(), b["us"].clone(), list(b["patient_id"]), b["y"].clone()) for b in loader
    ]


def test_eval_loader_refuses_augmentation_and_oversampling(cohort, cache):
    train_ds = PairedDataset(cohort, ALL, 32, 24, cache, augment=FLIPS)
    assert train_ds.augmented
    with pytest.raises(ValueError, match="must not be augmented"):
        make_loader(train_ds, batch_size=2, train=False, num_workers=0)
    eval_ds = PairedDataset(cohort, ALL, 32, 24, cache)
    assert not eval_ds.augmented
    with pytest.raises(ValueError, match="training data only"):
        make_loader(eval_ds, batch_size=2, train=False, oversample="sampler", num_workers=0)
    loader = make_loader(eval_ds, batch_size=4, train=False, num_workers=0)
    assert loader.sampler.__class__.__name__ == "SequentialSampler" and not loader.drop_last
    got = [pid for b in loader for pid in b["patient_id"]]
    assert got == eval_ds.sample_patient_ids  # every sample once, in order
    first = next(iter(loader))
    assert torch.equal(first["dm"][0], eval_ds[0]["dm"])  # unmodified


@pytest.mark.parametrize("mode", ["sampler", "replicate"])
def test_train_loader_oversamples(cohort, cache, mode):
    ds = SingleModalDataset(cohort, ["p1", "p2", "p3", "p5"], "DM", 32, cache)
    np.testing.assert_array_equal(ds.labels, [1, 1, 1, 0, 0, 0, 0])
    loader = make_loader(
        ds, batch_size=2, train=True, oversample=mode, num_workers=0, drop_last=False
    )
    if mode == "replicate":
        assert len(loader.dataset) == 8  # 4 benign + 3 malignant + 1 replica
        ys = [int(y) for b in loader for y in b["y"]]
        assert sorted(ys) == [0] * 4 + [1] * 4
    else:
        assert loader.sampler.num_samples == len(ds)


def test_train_loader_is_repeatable_in_process(cohort, cache):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, augment=HEAVY)
    a = _batches(make_loader(ds, batch_size=3, train=True, seed=4, num_workers=0))
    b = _batches(make_loader(ds, batch_size=3, train=True, seed=4, num_workers=0))
    c = _batches(make_loader(ds, batch_size=3, train=True, seed=5, num_workers=0))
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
    assert any(not torch.equal(x[0], z[0]) for x, z in zip(a, c, strict=True))
    # Successive epochs of one loader draw new augmentations.
    loader = make_loader(ds, batch_size=9, train=True, seed=4, num_workers=0, drop_last=False)
    e1, e2 = (next(iter(loader)) for _ in range(2))
    assert not torch.equal(e1["dm"], e2["dm"])


def test_train_loader_with_workers_is_repeatable(cohort, cache):
    ds = PairedDataset(cohort, ALL, 32, 24, cache, augment=HEAVY)

    def run():
        loader = make_loader(ds, batch_size=2, train=True, seed=7, num_workers=2)
        return _batches(loader)

    a, b = run(), run()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]


# --- the real manifest loader and synthetic cohort ------------------------------------------


@pytest.fixture
def real_manifest(request, tmp_path) -> Path:
    """The shared ``synthetic_cohort`` fixture where conftest provides it, else a tiny one."""
    try:
        return Path(request.getfixturevalue("synthetic_cohort"))
    except pytest.FixtureLookupError:
        from breastfusion.data.synthetic import generate_cohort

        return generate_cohort(tmp_path / "cohort", n_patients=12, seed=0, size=64)


def test_synthetic_cohort_end_to_end(real_manifest, tmp_path):
    from breastfusion.data.manifest import load_manifest

    df = load_manifest(real_manifest)
    ids = sorted(df["patient_id"].unique())
    counts = df.groupby(["patient_id", "modality"]).size().unstack(fill_value=0)
    expected_pairs = int((counts.get("DM", 0) * counts.get("US", 0)).sum())
    single = int(((counts.get("DM", 0) == 0) | (counts.get("US", 0) == 0)).sum())
    ds = PairedDataset(df, ids, 64, 48, tmp_path / "cache", augment=HEAVY)
    assert len(ds) == expected_pairs and ds.n_excluded == single
    loader = make_loader(ds, batch_size=4, train=True, oversample="sampler", num_workers=0)
    batch = next(iter(loader))
    assert batch["dm"].shape == (4, 1, 64, 64) and batch["us"].shape == (4, 1, 48, 48)
    assert all(isinstance(p, str) and p in ids for p in batch["patient_id"])
    dm = SingleModalDataset(df, ids, "DM", 64, tmp_path / "cache")
    assert len(dm) == int((df["modality"] == "DM").sum())
    # Built by the paired dataset above, except DM images of patients it left out (no US).
    dm_only = counts.index[(counts.get("US", 0) == 0)]
    expected_new = int(((df["modality"] == "DM") & df["patient_id"].isin(dm_only)).sum())
    assert dm.cache_reports["DM"].decoded == expected_new
