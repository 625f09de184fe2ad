"""The final model: refit / ensemble, one holdout evaluation, the export and its metadata."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from breastfusion import final as FM
from breastfusion.config import Config
from breastfusion.data.cache import default_spec
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import load_splits, make_splits, write_splits
from breastfusion.errors import SplitError, UserError
from breastfusion.io import atomic_write_json, sha256_file
from breastfusion.models.fusion import build_model

TRIAL = "t0000_lr=1e-04"
REQUIRED_FILES = (
    "model.pt",
    "model.torchscript.pt",
    "metadata.json",
    "metrics.json",
    "metrics.md",
    "predictions_holdout.csv",
    "oof_development.csv",
    "config.yaml",
    "gradcam/index.csv",
)


@pytest.fixture(scope="module")
def search_dir(synthetic_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real two-fold search folder of one trial (1 epoch, 32 px): fold models + OOF scores."""
    from breastfusion.engine.fold import run_fold

    root = tmp_path_factory.mktemp("final")
    df = load_manifest(synthetic_cohort)
    splits = root / "splits.json"
    write_splits(make_splits(df, folds=2, holdout=0.2, seed=0), splits)
    cfg = Config.from_dict(
        {
            "data": {
                "manifest": str(synthetic_cohort),
                "splits": str(splits),
                "cache_dir": str(root / "cache"),  # the shared cohort stays read-only
                "size_dm": 32,
                "size_us": 32,
                "num_workers": 0,
            },
            "optim": {"epochs": 1, "batch_size": 8, "patience": 0},
            "train": {"device": "cpu"},
        }
    )
    search = root / "search"
    for k in range(2):
        run_fold(cfg.with_overrides({"data.fold": k}), search / "trials" / TRIAL / f"fold{k}")
    atomic_write_json(
        search / "best.json", {"trial": TRIAL, "config": {"optim.lr": 1e-4}, "score": 0.5}
    )
    return search


@pytest.fixture(scope="module")
def refit_dir(search_dir: Path) -> Path:
    """``breastfusion final`` end to end (refit, operating point, Grad-CAM)."""
    out = search_dir.parent / "final"
    args = ["--search", str(search_dir), "--out", str(out), "--target-sensitivity", "0.9"]
    args += ["--bootstrap", "200", "--gradcam", "1"]
    run = CliRunner().invoke(FM.final_command, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "holdout" in run.output and "AUC" in run.output
    return out


def _meta(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def _cohort(out: Path) -> tuple[Config, pd.DataFrame, object]:
    cfg = Config.from_dict(_meta(out)["config"])
    df = load_manifest(cfg.data.manifest)
    return cfg, df, load_splits(cfg.data.splits, df)


def test_final_command_writes_every_output(refit_dir: Path):
    for name in REQUIRED_FILES:
        assert (refit_dir / name).is_file(), name
    leftovers = [p.name for p in refit_dir.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    metrics = json.loads((refit_dir / "metrics.json").read_text())
    (entry,) = metrics["models"].values()
    assert entry["operating_point"]["target_sensitivity"] == 0.9
    assert entry["threshold"] == entry["operating_point"]["threshold"]
    preds = pd.read_csv(refit_dir / "predictions_holdout.csv", dtype={"patient_id": str})
    assert list(preds.columns) == ["model", "patient_id", "y_true", "y_score"]
    assert preds["patient_id"].is_unique and preds["y_score"].between(0, 1).all()
    index = pd.read_csv(refit_dir / "gradcam" / "index.csv", dtype={"patient_id": str})
    assert list(index.columns) == ["patient_id", "category", "branch", "file", "score"]
    assert len(index) and set(index["branch"]) == {"dm", "us"}
    assert all((refit_dir / "gradcam" / f).is_file() for f in index["file"])
    assert set(index["patient_id"]) <= set(preds["patient_id"])


def test_threshold_comes_from_development_oof(refit_dir: Path):
    from breastfusion.evaluate.metrics import patient_scores, threshold_for_sensitivity

    oof = pd.read_csv(refit_dir / "oof_development.csv", dtype={"patient_id": str})
    _, _, splits = _cohort(refit_dir)
    assert set(oof["patient_id"]) <= set(splits.development)
    assert not set(oof["patient_id"]) & set(splits.holdout)
    p = patient_scores(oof)
    expected = threshold_for_sensitivity(p["y_true"].to_numpy(), p["y_score"].to_numpy(), 0.9)
    metrics = json.loads((refit_dir / "metrics.json").read_text())
    (entry,) = metrics["models"].values()
    assert entry["threshold"] == pytest.approx(expected, abs=1e-6)


def test_metadata_has_every_required_field(refit_dir: Path):
    meta = _meta(refit_dir)
    cfg = Config.from_dict(meta["config"])
    assert meta["intended_use"] == "research use only, not for diagnosis"
    assert meta["config_hash"] == cfg.config_hash()
    assert [i["name"] for i in meta["inputs"]] == ["dm", "us"]
    for item in meta["inputs"]:
        size = getattr(cfg.data, f"size_{item['name']}")
        assert item["shape"] == ["batch", 1, size, size]
        assert item["value_range"] == [0.0, 1.0] and item["channels"] == 1
        assert "grey" in item["channel"]
        spec = default_spec(item["name"], size, cfg.data.resize)
        assert meta["preprocessing"]["branches"][item["name"]]["hash"] == spec.hash
    assert meta["preprocessing"]["branches"]["dm"]["resize"] == "pad"
    assert meta["preprocessing"]["branches"]["us"]["resize"] == "squash"
    assert len(meta["preprocessing"]["hash"]) == 64
    holdout = meta["metrics"]["holdout"]
    for key in ("auc", "auc_delong", "sensitivity", "specificity", "precision", "accuracy"):
        assert {"value", "ci_low", "ci_high"} <= set(holdout[key]), key
    assert "operating_point" in holdout and meta["metrics"]["method"]["auc"]
    data = meta["training_data"]
    assert data["manifest_sha256"] == sha256_file(cfg.data.manifest)
    assert data["splits_sha256"] == sha256_file(cfg.data.splits)
    for part in ("train", "holdout"):
        assert set(data[part]["patients"]) == {"benign", "malignant"}
        assert set(data[part]["images"]) == {"DM", "US"}
    assert data["train"]["patients"]["malignant"] > 0
    assert meta["training"]["epochs"] == 1 and "mean best epoch" in meta["training"]["epochs_rule"]
    assert meta["software"]["torch"] == importlib.metadata.version("torch")
    assert meta["output"]["malignant_score"] == "softmax(output, dim=1)[:, 1]"


def test_training_set_never_contains_a_holdout_patient(refit_dir: Path):
    meta = _meta(refit_dir)
    _, df, splits = _cohort(refit_dir)
    assert meta["training_data"]["holdout_in_training"] == 0
    n_train = sum(meta["training_data"]["train"]["patients"].values())
    assert 0 < n_train <= len(splits.development)
    with pytest.raises(SplitError, match="P9"):
        FM.check_no_leak(["P1", "P9"], ["P9", "P8"])


def test_refit_trains_on_development_only_and_a_crash_leaves_no_output(
    search_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The loader handed to ``fit`` holds development patients only; a failure late in the
    export (here: Grad-CAM) leaves no ``out`` folder and no temporary folder behind."""
    import breastfusion.engine.loop as loop
    import breastfusion.explain.gradcam as gradcam

    seen: set[str] = set()

    def fake_fit(cfg, train_loader, val_loader, model, **kwargs):
        assert val_loader is None  # a refit has no validation fold
        seen.update(train_loader.dataset.sample_patient_ids)
        return loop.FitResult(
            best_epoch=1, best_val_auc=float("nan"), epochs_run=1, stop_reason="completed"
        )

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "fit", fake_fit)
    monkeypatch.setattr(gradcam, "write_gallery", boom)
    choice = FM.locate_best(search_dir)
    out = search_dir.parent / "final_crash"
    with pytest.raises(RuntimeError, match="boom"):
        FM.final_model(choice.config, None, None, out, fold_dirs=choice.fold_dirs, n_boot=200)
    cfg = Config.from_dict(choice.config)
    df = load_manifest(cfg.data.manifest)
    splits = load_splits(cfg.data.splits, df)
    assert seen and not seen & set(splits.holdout)
    assert seen <= set(splits.development)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".final_crash")]


def _holdout_scores(model: torch.nn.Module, out: Path) -> pd.Series:
    cfg, df, splits = _cohort(out)
    pred = FM.predict_patients(model, cfg, df, splits.holdout, "cpu")
    return pred.patients.set_index("patient_id")["y_score"]


def _saved_scores(out: Path) -> pd.Series:
    preds = pd.read_csv(out / "predictions_holdout.csv", dtype={"patient_id": str})
    return preds.set_index("patient_id")["y_score"]


def test_state_dict_reloads_into_build_model_with_the_same_scores(refit_dir: Path):
    meta = _meta(refit_dir)
    model = build_model(**meta["architecture"])
    model.load_state_dict(torch.load(refit_dir / "model.pt", weights_only=True))
    got = _holdout_scores(model.eval(), refit_dir)
    saved = _saved_scores(refit_dir)
    pd.testing.assert_series_equal(got.sort_index(), saved.sort_index(), atol=1e-6, rtol=0)


_CLEAN_RUN = textwrap.dedent(
    """
    import importlib.abc, json, sys
    from pathlib import Path

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "breastfusion":
                raise ImportError("breastfusion is not installed here")

    # The venv's editable install puts platform/ on sys.path: drop it, and refuse the import.
    sys.path = [p for p in sys.path if not (Path(p or ".") / "breastfusion").is_dir()]
    sys.meta_path.insert(0, Block())
    try:
        import breastfusion  # noqa: F401
        raise SystemExit("breastfusion importable")
    except ImportError:
        pass
    import torch

    model = torch.jit.load(sys.argv[1], map_location="cpu")
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        scores = torch.softmax(model(*inputs), dim=1)[:, 1]
    print(json.dumps({"scores": scores.tolist(),
                      "leaked": sorted(m for m in sys.modules if m.startswith("breastfusion"))}))
    """
)


def _torchscript_in_clean_process(out: Path, inputs: tuple[torch.Tensor, ...], tmp: Path) -> list:
    script, data = tmp / "run.py", tmp / "inputs.pt"
    script.write_text(_CLEAN_RUN)
    torch.save(inputs, data)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(out / "model.torchscript.pt"), str(data)],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["leaked"] == []
    return result["scores"]


def test_torchscript_runs_on_cpu_without_breastfusion(refit_dir: Path, tmp_path: Path):
    cfg = Config.from_dict(_meta(refit_dir)["config"])
    gen = torch.Generator().manual_seed(5)
    inputs = tuple(
        torch.rand(3, 1, s, s, generator=gen) for s in (cfg.data.size_dm, cfg.data.size_us)
    )
    model = FM.load_final_model(refit_dir)
    with torch.no_grad():
        expected = torch.softmax(model(*inputs), dim=1)[:, 1].tolist()
    got = _torchscript_in_clean_process(refit_dir, inputs, tmp_path)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ensemble_averages_the_fold_models(search_dir: Path, tmp_path: Path):
    from breastfusion.engine.checkpoint import load_checkpoint, load_weights
    from breastfusion.engine.fold import build_model_from_config

    choice = FM.locate_best(search_dir)
    out = tmp_path / "final_ensemble"
    result = FM.final_model(
        choice.config,
        None,
        None,
        out,
        mode="ensemble",
        fold_dirs=choice.fold_dirs,
        gradcam_per_category=1,
        n_boot=200,
    )
    assert result.mode == "ensemble" and (out / "gradcam" / "index.csv").is_file()
    members = []
    for d in choice.fold_dirs:
        ckpt = load_checkpoint(d / "model.pt")
        m = build_model_from_config(Config.from_dict(ckpt.config))
        load_weights(m, ckpt)
        members.append(_holdout_scores(m.eval(), out))
    expected = sum(members) / len(members)
    saved = _saved_scores(out)
    pd.testing.assert_series_equal(
        saved.sort_index(), expected.sort_index(), atol=1e-6, rtol=0, check_names=False
    )
    reloaded = _holdout_scores(FM.load_final_model(out), out)
    pd.testing.assert_series_equal(reloaded.sort_index(), saved.sort_index(), atol=1e-6, rtol=0)


def test_user_errors_name_what_is_missing(search_dir: Path, tmp_path: Path):
    choice = FM.locate_best(search_dir)
    with pytest.raises(UserError, match="out-of-fold"):
        FM.final_model(choice.config, None, None, tmp_path / "a", target_sensitivity=0.9)
    empty = [tmp_path / "fold0"]
    empty[0].mkdir()
    with pytest.raises(UserError, match=r"fold checkpoints.*fold0[/\\]model.pt"):
        FM.final_model(choice.config, None, None, tmp_path / "b", mode="ensemble", fold_dirs=empty)
    with pytest.raises(UserError, match="unknown setting 'colour'"):
        FM.final_from_best(search_dir, out=tmp_path / "c", settings={"colour": 1})
    with pytest.raises(UserError, match="no chosen trial"):
        FM.locate_best({"trial": None, "note": "no trial finished every fold"})
    assert not any((tmp_path / n).exists() for n in "abc")


def test_refit_epochs_is_the_rounded_mean_best_epoch(tmp_path: Path):
    dirs = []
    for k, best in enumerate((2, 3, 3)):
        d = tmp_path / f"fold{k}"
        atomic_write_json(d / "metrics.json", {"best_epoch": best})
        dirs.append(d)
    assert FM.refit_epochs(dirs, 200)[0] == 3
    assert FM.refit_epochs(dirs[:2], 200)[0] == 3  # 2.5 rounds half up
    epochs, rule = FM.refit_epochs([tmp_path / "nothing"], 200)
    assert epochs == 200 and "optim.epochs" in rule
