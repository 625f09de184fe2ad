"""``breastfusion train`` / ``run_fold`` end to end on the synthetic cohort (32 px, 1 epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from breastfusion.cli import main
from breastfusion.config import Config, load_yaml
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, subsample_patients, write_splits
from breastfusion.engine.checkpoint import load_checkpoint
from breastfusion.engine.cli import resolve_config
from breastfusion.engine.fold import (
    CHECKPOINT_DIR,
    METRICS_NAME,
    run_fold,
)
from breastfusion.errors import ConfigError, UserError
from breastfusion.io import sha256_file

FAST = [
    "--size",
    "32",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--num-workers",
    "0",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, request) -> tuple[Path, Path]:
    """(manifest, splits) of the shared synthetic cohort fixture, 2 folds, no holdout."""
    manifest = request.getfixturevalue("synthetic_cohort")
    df = load_manifest(manifest)
    splits = make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest))
    return manifest, write_splits(splits, tmp_path_factory.mktemp("splits") / "splits.json")


def fast_cfg(manifest: Path, splits: Path, tmp_path: Path, **extra) -> Config:
    overrides = {
        "data.manifest": str(manifest),
        "data.splits": str(splits),
        "data.size_dm": 32,
        "data.size_us": 32,
        "data.num_workers": 0,
        "data.cache_dir": str(tmp_path / "cache"),
        "optim.epochs": 1,
        "optim.batch_size": 4,
        "train.device": "cpu",
        **extra,
    }
    return Config().with_overrides(overrides)


def test_train_writes_every_output(cohort, tmp_path, capsys):
    manifest, splits = cohort
    out = tmp_path / "run"
    args = ["train", "--manifest", str(manifest), "--splits", str(splits), "--fold", "1", *FAST]
    rc = main([*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "epoch 1/1" in printed.out and "validation (patients): auc" in printed.out

    cfg = load_yaml(out / "config.yaml")
    assert cfg.data.fold == 1 and cfg.data.size_dm == 32 and cfg.data.modality == "fusion"
    assert (out / "config.yaml").read_text().startswith(f"config_hash: {cfg.config_hash()}")

    metrics = json.loads((out / METRICS_NAME).read_text())
    for key in ("auc", "sensitivity", "specificity", "precision", "accuracy", "n_patients"):
        assert key in metrics
    # The threshold is a probability in the config, stored on the calibrated log-odds scale.
    assert metrics["threshold"] == 0.0 and metrics["threshold_probability"] == 0.5
    assert metrics["config_hash"] == cfg.config_hash()
    assert metrics["calibration"]["method"] == "platt" and metrics["calibration"]["a"] >= 0
    assert metrics["degenerate"] in (True, False) and "selection" in metrics
    # patience 20 (the default): the epoch is picked on an inner split, never the fold itself
    assert "inner" in metrics["selection"] and metrics["inner_patients"] >= 2

    pred = pd.read_csv(out / "predictions.csv", dtype={"patient_id": str})
    assert list(pred.columns) == ["patient_id", "y_true", "y_score", "y_score_raw"]
    assert pred["patient_id"].is_unique and len(pred) == metrics["n_patients"]
    cal = metrics["calibration"]
    assert pred["y_score"].to_numpy() == pytest.approx(
        cal["a"] * pred["y_score_raw"].to_numpy() + cal["b"], rel=1e-12, abs=1e-12
    )
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1] and "val_auc" in history.columns
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    df = load_manifest(manifest)
    truth = df.groupby(df["patient_id"].astype(str))["y"].max()
    assert (pred.set_index("patient_id")["y_true"] == truth.loc[pred["patient_id"]]).all()

    ckpt = load_checkpoint(out / "model.pt")
    assert ckpt.config_hash == cfg.config_hash()
    assert ckpt.meta["metrics"]["n_patients"] == metrics["n_patients"]
    assert not (out / CHECKPOINT_DIR).exists()  # training checkpoints go once model.pt exists


def test_config_file_with_flags_overriding(cohort, tmp_path):
    manifest, splits = cohort
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "data:\n  modality: us\n  size_us: 48\n  max_patients: 6\noptim:\n  lr: 1.0e-3\n  epochs: 5\n"
    )
    cfg = resolve_config(
        str(config),
        ["augment.elastic=0", "model.dropout=0.1"],
        manifest=str(manifest),
        splits=str(splits),
        epochs=1,
        size_us=32,
        backbone="resnet18",
    )
    assert (cfg.data.modality, cfg.data.size_us, cfg.optim.lr, cfg.optim.epochs) == (
        "us",
        32,
        1e-3,
        1,
    )
    assert cfg.augment.elastic == 0.0 and cfg.model.dropout == 0.1
    assert cfg.data.manifest == str(Path(manifest).resolve())

    seen = []
    result = run_fold(
        cfg.with_overrides({"data.cache_dir": str(tmp_path / "cache"), "train.device": "cpu"}),
        tmp_path / "us",
        callback=seen.append,
    )
    assert [m["epoch"] for m in seen] == [1]
    # max_patients: at most 6 patients per split, both classes kept.
    assert result.metrics["val_patients"] <= 6 and result.metrics["train_patients"] <= 6
    assert 0 < result.metrics["n_malignant"] < result.metrics["n_patients"]
    assert (tmp_path / "us" / METRICS_NAME).is_file()


def test_a_crashed_run_leaves_nothing_that_looks_finished(cohort, tmp_path):
    manifest, splits = cohort
    out = tmp_path / "run"
    out.mkdir()
    (out / METRICS_NAME).write_text("{}")  # from an earlier, finished run

    def crash(metrics):
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_fold(fast_cfg(manifest, splits, tmp_path, **{"data.max_patients": 4}), out, crash)
    assert not (out / METRICS_NAME).exists()
    assert not (out / "predictions.csv").exists() and not (out / "model.pt").exists()


def test_subset_keeps_both_classes_and_order():
    ids = [f"P{i:02d}" for i in range(20)]
    labels = pd.Series([int(i < 3) for i in range(20)], index=ids)
    kept = subsample_patients(ids, labels, 5, seed=0)
    assert len(kept) == 5 and kept == sorted(kept)
    assert labels.loc[kept].sum() >= 1 and (labels.loc[kept] == 0).sum() >= 1
    assert subsample_patients(ids, labels, 5, seed=0) == kept


def _run_cli(capsys, *args) -> tuple[int, str]:
    rc = main(["train", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--backbone", "resnet19"],
            r"unknown backbone 'resnet19'; known backbones: resnet18, resnet50",
        ),
        (
            ["--backbone-us", "inception_v3"],
            r"size_us: 32 px is below the minimum input size of inception_v3 \(75 px\)",
        ),
        (["--size", "16"], r"16 px is below the minimum input size of resnet18 \(32 px\)"),
        (["--fold", "2"], r"fold 2 is out of range: .*splits\.json has 2 folds \(0\.\.1\)"),
        (["--set", "optim.learning_rate=1"], r"unknown config key 'optim\.learning_rate'"),
        (["--lr", "0"], r"optim\.lr: 0\.0 is out of range"),
    ],
)
def test_bad_input_is_a_clear_error(cohort, tmp_path, capsys, extra, message):
    manifest, splits = cohort
    out = tmp_path / "bad"
    rc, err = _run_cli(
        capsys,
        "--manifest",
        str(manifest),
        "--splits",
        str(splits),
        *FAST,
        *extra,
        "--out",
        str(out),
    )
    assert rc == 2
    assert pytest.importorskip("re").search(message, err), err
    assert not (out / METRICS_NAME).exists()


def test_splits_of_another_cohort_are_refused(cohort, tmp_path, capsys):
    manifest, _ = cohort
    df = load_manifest(manifest)
    other = df.assign(patient_id="X" + df["patient_id"].astype(str))
    bad = write_splits(make_splits(other, folds=2, holdout=0.0, seed=0), tmp_path / "other.json")
    rc, err = _run_cli(
        capsys,
        "--manifest",
        str(manifest),
        "--splits",
        str(bad),
        *FAST,
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 2 and "other.json" in err


def test_missing_inputs_are_named(tmp_path, capsys):
    rc, err = _run_cli(capsys, *FAST, "--out", str(tmp_path / "o"))
    assert rc == 2 and "no manifest given (--manifest" in err
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        resolve_config(None, ["optim.lr"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_a_user_error(cohort, tmp_path):
    manifest, splits = cohort
    cfg = fast_cfg(manifest, splits, tmp_path, **{"train.device": "cuda", "data.max_patients": 4})
    with pytest.raises(UserError, match="CUDA is not available"):
        run_fold(cfg, tmp_path / "cuda")


def test_a_cpu_fold_repeats_exactly(cohort, tmp_path):
    """Same config, same seed: identical validation scores (augmentation and sampler on)."""
    manifest, splits = cohort
    cfg = fast_cfg(
        manifest,
        splits,
        tmp_path,
        **{
            "data.modality": "us",
            "data.max_patients": 8,
            "augment.elastic": 0.5,
            "optim.epochs": 2,
        },
    )
    a = run_fold(cfg, tmp_path / "a").predictions
    b = run_fold(cfg, tmp_path / "b").predictions
    pd.testing.assert_frame_equal(a, b)


def test_train_refuses_a_foreign_folder_and_a_second_writer(tmp_path, capsys):
    from breastfusion.fsguard import FolderLock

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    args = ["--manifest", "m.csv", "--splits", "s.json", *FAST, "--out", str(out)]
    rc, err = _run_cli(capsys, *args)
    assert rc == 2 and "thesis.docx" in err and "--overwrite" in err
    assert (out / "thesis.docx").read_text() == "precious"
    busy = tmp_path / "busy"
    with FolderLock(busy, "train"):
        rc, err = _run_cli(
            capsys, "--manifest", "m.csv", "--splits", "s.json", *FAST, "--out", str(busy)
        )
    assert rc == 2 and "in use by another breastfusion process" in err and "pid" in err


_IMPORTS_PROBE = """
import json, sys
from breastfusion.config import Config
from breastfusion.distributed.worker import warm_process
from breastfusion.engine.fold import run_fold

def packages():
    return {m.split(".")[0] for m in sys.modules}

cfg = Config.from_dict(json.loads(sys.argv[1]))
before = packages()
warm_process(cfg)
warmed = packages()
run_fold(cfg, sys.argv[2])
print(json.dumps({"warm": sorted(warmed - before), "fold": sorted(packages() - warmed)}))
"""


def test_a_warmed_trial_process_imports_nothing_new_in_its_first_fold(cohort, tmp_path):
    """A search's trial process pays the fold's lazy imports when it starts
    (``worker.warm_process``), not in its first fold: the fold then imports no new package."""
    import subprocess
    import sys

    manifest, splits = cohort
    cfg = fast_cfg(manifest, splits, tmp_path, **{"data.max_patients": 4})
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE, json.dumps(cfg.to_dict()), str(tmp_path / "f")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"albumentations", "torchvision", "tensorboard"} <= set(seen["warm"]), seen
    assert seen["fold"] == []
