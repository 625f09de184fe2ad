"""A small study-like set-up shared by test_final.py and test_predict.py (built once per
session): the synthetic cohort's US images cropped by a deterministic fake detector (as the
study's 03_roi does with YOLO), a detector bundle for ``final`` to ship, splits, and a
two-fold search of one fusion trial (1 epoch, 32 px) on the cropped manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from breastfusion.io import atomic_write_json
from breastfusion.roi.geometry import Detection

TRIAL = "t0000_lr=1e-04"
_BUILT: dict[str, StudySetup] = {}


class FakeDetector:
    """A deterministic stand-in for YOLO: a box over the brightest part of the image, and
    nothing on some images (so the fallback rule is exercised too)."""

    def __call__(self, images):
        out = []
        for im in images:
            im = np.asarray(im)
            if int(im.sum()) % 4 == 0:
                out.append(None)
                continue
            h, w = im.shape
            ys, xs = np.nonzero(im >= np.percentile(im, 90))
            x0, x1 = max(0, xs.min() - 2), min(w, xs.max() + 3)
            y0, y1 = max(0, ys.min() - 2), min(h, ys.max() + 3)
            out.append(Detection(float(x0), float(y0), float(x1), float(y1), 0.9))
        return out


@dataclass
class StudySetup:
    root: Path
    raw_manifest: Path  # the cohort's own manifest (raw US images)
    manifest: Path  # the cropped manifest the models trained on
    splits: Path
    detector: Path  # a detector bundle (fake weights; tests patch the loader)
    search: Path

    @property
    def fold_dirs(self) -> list[Path]:
        return [self.search / "trials" / TRIAL / f"fold{k}" for k in range(2)]


def base_config(setup_root: Path, manifest: Path, splits: Path) -> dict:
    return {
        "data": {
            "manifest": str(manifest),
            "splits": str(splits),
            "cache_dir": str(setup_root / "cache"),  # the shared cohort stays read-only
            "size_dm": 32,
            "size_us": 32,
            "num_workers": 0,
        },
        "optim": {"epochs": 1, "batch_size": 8, "patience": 0},
        "train": {"device": "cpu", "bn_recalibration_batches": 2},
    }


def study_setup(cohort: Path, root: Path) -> StudySetup:
    """Built once per session. ``BREASTFUSION_TEST_STUDY=DIR`` (development only) keeps the
    folds in DIR between sessions: training them is the slow part."""
    keep = os.environ.get("BREASTFUSION_TEST_STUDY")
    root = Path(keep) if keep else root
    key = str(root)
    if key not in _BUILT:
        if keep:  # the folds refer to the cohort's files: keep a copy of it too
            import shutil

            if not (root / "cohort").is_dir():
                shutil.copytree(cohort.parent, root / "cohort")
            cohort = root / "cohort" / cohort.name
        if keep and (root / "built.json").is_file():
            _BUILT[key] = _setup(cohort, root)
        else:
            _BUILT[key] = _build(cohort, root)
            atomic_write_json(root / "built.json", {"cohort": str(cohort)})
    return _BUILT[key]


def _setup(cohort: Path, root: Path) -> StudySetup:
    cropped = root / "crops" / "manifest.csv"
    return StudySetup(
        root, cohort, cropped, root / "splits.json", root / "detector", root / "search"
    )


def _build(cohort: Path, root: Path) -> StudySetup:
    from breastfusion.config import Config
    from breastfusion.data.manifest import load_manifest
    from breastfusion.data.splits import make_splits, write_splits
    from breastfusion.engine.fold import run_fold
    from breastfusion.roi.bundle import export_detector
    from breastfusion.roi.crop import crop_manifest
    from breastfusion.roi.settings import CropSettings, DetectorTrainSettings

    root.mkdir(parents=True, exist_ok=True)
    df = load_manifest(cohort)
    splits = root / "splits.json"
    write_splits(make_splits(df, folds=2, holdout=0.25, seed=0), splits)
    crop = CropSettings(margin=0.1, fallback="centre")
    cropped = crop_manifest(df, root / "crops", FakeDetector(), crop).manifest
    weights = root / "fake_detector.pt"
    weights.write_bytes(b"not real YOLO weights: tests patch predict.images.load_detector")
    export_detector(root / "detector", weights, DetectorTrainSettings(imgsz=64), crop)
    cfg = Config.from_dict(base_config(root, cropped, splits))
    search = root / "search"
    for k in range(2):
        run_fold(cfg.with_overrides({"data.fold": k}), search / "trials" / TRIAL / f"fold{k}")
    atomic_write_json(search / "experiment.json", {"space_name": "test"})
    atomic_write_json(search / "best.json", {"trial": TRIAL, "config": {"optim.lr": 1e-4}})
    return _setup(cohort, root)


_FINALS: dict[tuple[str, str], Path] = {}
GRADCAM = {"gradcam_per_category": 1, "bootstrap": 200}


def _kept(out: Path) -> bool:
    """Development only (``BREASTFUSION_TEST_STUDY``): reuse a finished final folder."""
    return bool(os.environ.get("BREASTFUSION_TEST_STUDY")) and (out / "final.json").is_file()


def dm_bundle(setup: StudySetup) -> Path:
    """A DM-only refit without folds (1 epoch, no ONNX): the fusion ensemble's fallback."""
    key = (str(setup.root), "dm")
    if key not in _FINALS:
        from breastfusion.config import Config
        from breastfusion.final.choice import Choice
        from breastfusion.final.run import final_model

        raw = base_config(setup.root, setup.manifest, setup.splits)
        cfg = Config.from_dict(raw).with_overrides({"data.modality": "dm"})
        out = setup.root / "final_dm"
        settings = {"onnx": False, "gradcam_per_category": 0, "bootstrap": 200}
        if not _kept(out):
            final_model(Choice(config=cfg.to_dict(), source="test"), out, settings=settings)
        _FINALS[key] = out
    return _FINALS[key]


def ensemble_final(setup: StudySetup) -> Path:
    """The fold ensemble (ONNX, detector, DM-only fallback) exported by ``final_from_best``."""
    key = (str(setup.root), "ensemble")
    if key not in _FINALS:
        from breastfusion.final.run import final_from_best

        out = setup.root / "final_ensemble"
        settings = {"mode": "ensemble", "target_sensitivity": 0.9, **GRADCAM}
        dm = dm_bundle(setup)
        if not _kept(out):
            final_from_best(
                setup.search,
                out=out,
                settings=settings,
                detector_dir=setup.detector,
                fallbacks={"dm": dm},
            )
        _FINALS[key] = out
    return _FINALS[key]


def refit_final(setup: StudySetup) -> tuple[Path, str]:
    """``breastfusion final`` (the command) in refit mode; returns (out, its output)."""
    key = (str(setup.root), "refit")
    if key not in _FINALS:
        from click.testing import CliRunner

        from breastfusion.final.cli import final_command

        out = setup.root / "final_refit"
        args = ["--search", str(setup.search), "--out", str(out), "--target-sensitivity", "0.9"]
        args += ["--bootstrap", "200", "--gradcam", "1", "--detector", str(setup.detector)]
        args += ["--no-onnx"]
        run = CliRunner().invoke(final_command, args, catch_exceptions=False)
        assert run.exit_code == 0, run.output
        (setup.root / "final_refit_cli.txt").write_text(run.output)
        _FINALS[key] = out
    out = _FINALS[key]
    return out, (setup.root / "final_refit_cli.txt").read_text()
