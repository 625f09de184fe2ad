"""The final model: refit / ensemble, calibrated operating point, one holdout evaluation, and
the exported bundle (weights, ONNX, detector, metadata)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.data.manifest import load_manifest
from breastfusion.data.preprocess import default_spec
from breastfusion.data.splits import load_splits
from breastfusion.errors import ConfigError, SplitError, UserError
from breastfusion.evaluate.calibration import Calibration, fit_platt, sigmoid
from breastfusion.final import operating
from breastfusion.final.bundle import read_bundle
from breastfusion.final.choice import Choice, locate_best
from breastfusion.final.members import read_folds, refit_epochs
from breastfusion.final.refit import check_no_leak
from breastfusion.final.settings import FinalSettings
from breastfusion.io import atomic_write_json
from breastfusion.models.ensemble import CalibratedEnsemble
from final_support import TRIAL, StudySetup, ensemble_final, refit_final, study_setup

BUNDLE_FILES = ("metadata.json", "model.pt", "config.yaml", "detector/detector.json")
OUT_FILES = (
    "final.json",
    "predictions_holdout.csv",
    "oof_development.csv",
    "metrics.json",
    "metrics.md",
    "config.yaml",
    "gradcam/index.csv",
)


@pytest.fixture(scope="module")
def setup(synthetic_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> StudySetup:
    return study_setup(synthetic_cohort, tmp_path_factory.getbasetemp() / "final_study")


@pytest.fixture(scope="module")
def refit_dir(setup: StudySetup) -> Path:
    return refit_final(setup)[0]


def _meta(out: Path) -> dict:
    return json.loads((out / "bundle" / "metadata.json").read_text())


def _splits(setup: StudySetup):
    return load_splits(setup.splits, load_manifest(setup.manifest))


def _saved(out: Path) -> pd.Series:
    preds = pd.read_csv(out / "predictions_holdout.csv", dtype={"patient_id": str})
    return preds.set_index("patient_id")["y_score"].sort_index()


def _holdout_scores(model: torch.nn.Module, setup: StudySetup, cfg: Config) -> pd.Series:
    from breastfusion.engine.data import build_dataset
    from breastfusion.final.scoring import TorchRunner, score_dataset

    cfg = cfg.with_overrides({"data.manifest": str(setup.manifest), "data.splits": str(setup.splits),
                              "data.cache_dir": str(setup.root / "cache")})  # fmt: skip
    ds = build_dataset(cfg, load_manifest(setup.manifest), _splits(setup).holdout, train=False)
    scores = score_dataset(TorchRunner(model), ds, cfg.branches, 8)
    return scores.set_index("patient_id")["y_score"].sort_index()


# -- the command and its outputs -----------------------------------------------------------------


def test_final_command_writes_every_output(refit_dir: Path, setup: StudySetup):
    output = refit_final(setup)[1]
    assert "holdout" in output and "AUC" in output and "refit epoch 1/1" in output
    assert "elapsed" in output and "ETA" in output
    for name in OUT_FILES:
        assert (refit_dir / name).is_file(), name
    for name in BUNDLE_FILES:
        assert (refit_dir / "bundle" / name).is_file(), name
    assert not (refit_dir / "bundle" / "model.onnx").exists()  # --no-onnx
    assert not (refit_dir / ".staging.tmp").exists()
    metrics = json.loads((refit_dir / "metrics.json").read_text())
    (entry,) = metrics["models"].values()
    assert entry["operating_point"]["target_sensitivity"] == 0.9
    assert entry["threshold"] == entry["operating_point"]["threshold"]
    assert entry["score_scale"] == "logit"
    preds = pd.read_csv(refit_dir / "predictions_holdout.csv", dtype={"patient_id": str})
    assert list(preds.columns) == [
        "model", "patient_id", "y_true", "y_score", "probability", "call", "n_samples",
    ]  # fmt: skip
    assert preds["patient_id"].is_unique
    np.testing.assert_allclose(preds["probability"], sigmoid(preds["y_score"].to_numpy()))
    called = np.where(preds["y_score"] >= entry["threshold"], "malignant", "benign")
    assert list(preds["call"]) == list(called)
    index = pd.read_csv(refit_dir / "gradcam" / "index.csv", dtype={"patient_id": str})
    assert list(index.columns) == ["patient_id", "category", "branch", "file", "raw_file", "score"]
    assert len(index) and set(index["branch"]) == {"dm", "us"}
    assert all((refit_dir / "gradcam" / f).is_file() for f in index["file"])
    assert all((refit_dir / "gradcam" / f).is_file() for f in index["raw_file"])
    assert set(index["patient_id"]) <= set(preds["patient_id"])


def test_threshold_comes_from_pooled_calibrated_oof(refit_dir: Path, setup: StudySetup):
    from breastfusion.evaluate.metrics import patient_scores, threshold_for_sensitivity

    oof = pd.read_csv(refit_dir / "oof_development.csv", dtype={"patient_id": str})
    splits = _splits(setup)
    assert set(oof["patient_id"]) <= set(splits.development)
    assert not set(oof["patient_id"]) & set(splits.holdout)
    # y_score is each fold's own calibration of its raw log-odds
    for fold in runs.TrialDir(setup.search / "trials" / TRIAL).folds():
        cal = Calibration.from_dict(fold.metrics()["calibration"])
        part = oof[oof["fold"] == fold.k]
        np.testing.assert_allclose(part["y_score"], cal.apply(part["y_score_raw"]), rtol=1e-12)
    p = patient_scores(oof)
    expected = threshold_for_sensitivity(p["y_true"].to_numpy(), p["y_score"].to_numpy(), 0.9)
    metrics = json.loads((refit_dir / "metrics.json").read_text())
    (entry,) = metrics["models"].values()
    meta = _meta(refit_dir)
    assert entry["threshold"] == expected  # full precision, never rounded
    assert meta["operating_point"]["threshold"] == expected
    assert meta["operating_point"]["threshold_probability"] == pytest.approx(sigmoid(expected))
    assert "refit model's scores" in meta["operating_point"]["rule"]
    assert entry["threshold_rule"] == meta["operating_point"]["rule"]
    assert "not fitted on the refit model" in entry["calibration_source"]


def test_refit_carries_the_mean_fold_calibration_and_says_so(refit_dir: Path, setup: StudySetup):
    meta = _meta(refit_dir)
    facts = read_folds(runs.TrialDir(setup.search / "trials" / TRIAL).folds())
    (cal,) = meta["model"]["calibrations"]
    assert cal["a"] == np.mean([f.calibration.a for f in facts])
    assert cal["b"] == np.mean([f.calibration.b for f in facts])
    assert "transferred from the fold models" in meta["model"]["calibration_source"]
    assert "not fitted on the refit model" in meta["training"]["calibration"]
    state = torch.load(refit_dir / "bundle" / "model.pt", weights_only=True)
    assert state["cal_a"].dtype == torch.float64 and float(state["cal_a"][0]) == cal["a"]


def test_metadata_describes_inputs_exactly_and_names_no_patient(refit_dir: Path, setup: StudySetup):
    meta = _meta(refit_dir)
    assert meta["format"] == "breastfusion-model/2"
    assert meta["intended_use"] == "research use only, not for diagnosis"
    cfg = Config.from_dict(meta["config"])
    assert cfg.data.manifest is None and cfg.data.splits is None  # no training-data paths
    for branch in ("dm", "us"):
        spec = default_spec(branch, getattr(cfg.data, f"size_{branch}"), cfg.data.resize)
        assert meta["preprocessing"]["branches"][branch] == json.loads(json.dumps(spec.describe()))
    roi = meta["roi"]
    assert roi["mode"] == "detect" and roi["detector"] == "detector"
    assert roi["crop"]["margin"] == 0.1 and "central 0.6" in roi["rule"]
    data = meta["training_data"]
    assert data["holdout_in_training"] == 0 and "patient_ids" not in data
    assert data["train"]["patients"]["malignant"] > 0
    assert meta["training"]["epochs"] == 1 and "reported weights" in meta["training"]["epochs_rule"]
    assert meta["software"]["torch"] == importlib.metadata.version("torch")
    assert meta["metrics"]["holdout"]["auc"]["ci_low"] is not None
    text = "".join(
        p.read_text(errors="replace") for p in (refit_dir / "bundle").rglob("*") if p.is_file()
        and p.suffix in (".json", ".yaml")
    )  # fmt: skip
    ids = set(load_manifest(setup.manifest)["patient_id"])
    assert not [p for p in ids if p in text]
    assert str(setup.root) not in text and "/tmp" not in text  # relative paths only


def test_bundle_files_honour_the_umask(refit_dir: Path):
    umask = os.umask(0o022)
    os.umask(umask)
    for p in (refit_dir / "bundle").rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o777 if p.is_dir() else 0o666) & ~umask, p


def test_training_set_never_contains_a_holdout_patient(refit_dir: Path, setup: StudySetup):
    meta = _meta(refit_dir)
    n_train = sum(meta["training_data"]["train"]["patients"].values())
    assert 0 < n_train <= len(_splits(setup).development)
    with pytest.raises(SplitError, match="P9"):
        check_no_leak(["P1", "P9"], ["P9", "P8"])


def test_bundle_reloads_with_the_same_scores(refit_dir: Path, setup: StudySetup):
    bundle = read_bundle(refit_dir)  # the final folder or its bundle/ both work
    assert bundle.path == refit_dir / "bundle"
    got = _holdout_scores(bundle.load_model(), setup, bundle.config)
    pd.testing.assert_series_equal(got, _saved(refit_dir), atol=1e-9, rtol=0, check_names=False)


# -- the ensemble -------------------------------------------------------------------------------


def test_ensemble_averages_calibrated_fold_models(setup: StudySetup):
    from breastfusion.final.members import load_member

    out = ensemble_final(setup)
    meta = _meta(out)
    assert meta["mode"] == "ensemble" and meta["model"]["members"] == 2
    assert (out / "bundle" / "model.onnx").is_file() and meta["model"]["onnx"]["opset"] >= 17
    choice = locate_best(setup.search)
    facts = read_folds(list(choice.folds))
    chosen = Config.from_dict(choice.config)
    members = []
    for f in facts:
        model, cfg = load_member(f, chosen)
        raw = _holdout_scores(CalibratedEnsemble([model], [1.0], [0.0], cfg.branches), setup, cfg)
        members.append(f.calibration.apply(raw.to_numpy()))
        assert meta["model"]["calibrations"][len(members) - 1]["a"] == f.calibration.a
    expected = pd.Series(np.mean(members, axis=0), index=raw.index)
    pd.testing.assert_series_equal(_saved(out), expected, atol=1e-9, rtol=0, check_names=False)
    assert meta["fallbacks"] == {"dm": "../../final_dm"}  # relative to the bundle


def test_onnx_agrees_with_torch(setup: StudySetup):
    from breastfusion.final.export import example_inputs

    bundle = read_bundle(ensemble_final(setup))
    inputs = [x.numpy() for x in example_inputs(bundle.config, batch=7, seed=3)]
    torch_out = bundle.runner("torch")(inputs)
    onnx_out = bundle.runner("onnxruntime")(inputs)
    assert onnx_out.shape == (7, 2) and np.ptp(torch_out[:, 1]) > 0
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)


def test_an_onnx_export_that_disagrees_is_dropped_not_fatal(tmp_path: Path, monkeypatch):
    """A study must not crash after its searches because ONNX rounds differently: the bundle
    keeps model.pt, says why model.onnx is missing, and predict's onnxruntime backend says so."""
    import breastfusion.final.scoring as scoring
    from breastfusion.engine.fold import build_model_from_config
    from breastfusion.errors import UserError
    from breastfusion.final.bundle import Bundle
    from breastfusion.final.export import write_onnx
    from breastfusion.models.ensemble import CalibratedEnsemble

    real = scoring.OnnxRunner

    class Off(real):  # the exported graph, its outputs nudged by 1e-2
        def __call__(self, inputs):
            return super().__call__(inputs) + 1e-2

    monkeypatch.setattr(scoring, "OnnxRunner", Off)
    cfg = Config.from_dict({"data": {"modality": "dm", "size_dm": 32}})
    torch.manual_seed(0)
    net = build_model_from_config(cfg).eval()
    model = CalibratedEnsemble([net], [1.0], [0.0], ["dm"]).eval()
    record = write_onnx(model, cfg, tmp_path)
    assert record["file"] is None and "differs from the torch model" in record["skipped"]
    assert record["max_abs_diff_vs_torch"] > 1e-3 and not (tmp_path / "model.onnx").exists()
    bundle = Bundle(tmp_path, {"model": {"onnx": record}, "inputs": [{"name": "dm"}]})
    with pytest.raises(UserError, match="no ONNX model.*differs.*--backend torch"):
        bundle.runner("onnxruntime")


# -- operating points that transfer ---------------------------------------------------------------


class _Member(torch.nn.Module):
    """Raw log-odds = scale · (mean intensity − offset): fold models whose scales differ by
    orders of magnitude, as briefly trained fold models do."""

    def __init__(self, scale: float, offset: float):
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * (x.double().mean(dim=(1, 2, 3)) - self.offset)
        return torch.stack([-z / 2, z / 2], dim=1)


def _cohort(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    v = np.clip(0.5 + 0.1 * y + rng.normal(0, 0.08, n), 0, 1)
    return torch.tensor(v, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4), y


def test_ensemble_threshold_from_calibrated_oof_transfers_to_the_holdout():
    members = [_Member(10.0 ** (3 * k - 5), 0.5 + 0.03 * k) for k in range(4)]
    parts, cals = [], []
    for k, m in enumerate(members):
        x, y = _cohort(400, seed=k)
        raw = m(x).double()[:, 1] - m(x).double()[:, 0]
        cal = fit_platt(y, raw.numpy())
        cals.append(cal)
        ids = [f"f{k}_{i}" for i in range(len(y))]
        parts.append(pd.DataFrame({"fold": k, "patient_id": ids, "y_true": y,
                                   "y_score": cal.apply(raw.numpy())}))  # fmt: skip
    spans = [np.ptp(m(_cohort(50, 9)[0])[:, 1].numpy()) for m in members]
    assert max(spans) / min(spans) > 1e8  # the premise: raw scales differ enormously
    op = operating.from_oof(pd.concat(parts), 0.9, "the ensemble")
    ensemble = CalibratedEnsemble(members, [c.a for c in cals], [c.b for c in cals], ["us"])
    x, y = _cohort(3000, seed=99)
    with torch.no_grad():
        c = ensemble(x)[:, 1].numpy()
    called = c >= op.threshold
    sensitivity, specificity = called[y == 1].mean(), (~called[y == 0]).mean()
    assert abs(sensitivity - 0.9) < 0.05, (sensitivity, specificity)
    assert specificity > 0.3 and op.warnings == ()
    # the old rule (threshold on pooled raw softmax OOF, applied to the mean softmax) calls
    # every holdout patient malignant here, as it did for the study's three models
    from breastfusion.evaluate.metrics import threshold_for_sensitivity

    oof_y, oof_p = [], []
    for k, m in enumerate(members):
        xk, yk = _cohort(400, seed=k)
        oof_y.append(yk)
        oof_p.append(torch.softmax(m(xk).double(), dim=1)[:, 1].numpy())
    old = threshold_for_sensitivity(np.concatenate(oof_y), np.concatenate(oof_p), 0.9)
    with torch.no_grad():
        mean_p = torch.stack([torch.softmax(m(x).double(), 1)[:, 1] for m in members]).mean(0)
    old_called = mean_p.numpy() >= old
    assert old_called[y == 1].mean() == 1.0 and (~old_called[y == 0]).mean() < 0.05


def test_an_unusable_target_is_warned_about_with_the_achievable_points():
    oof = pd.DataFrame({
        "fold": 0, "patient_id": [f"p{i}" for i in range(8)],
        "y_true": [1, 1, 1, 1, 0, 0, 0, 0],
        "y_score": [-3.0, -2.0, 1.0, 2.0, -1.0, 0.0, 0.5, 1.5],
    })  # fmt: skip
    op = operating.from_oof(oof, 1.0, "the model")
    assert op.threshold == -3.0
    assert op.warnings and "every benign score" in op.warnings[0]
    assert op.achievable and {"sensitivity", "specificity", "threshold"} <= set(op.achievable[0])
    assert op.to_dict()["warnings"] == list(op.warnings)


# -- errors, settings, epochs --------------------------------------------------------------------


def test_refit_trains_on_development_only_and_a_crash_leaves_no_output(
    setup: StudySetup, monkeypatch: pytest.MonkeyPatch
):
    """The loader handed to ``fit`` holds development patients only; a failure late in the
    export (here: Grad-CAM) leaves no ``out`` folder and no staging folder behind."""
    import breastfusion.engine.loop as loop
    import breastfusion.explain.gradcam as gradcam
    from breastfusion.final.run import final_model

    seen: set[str] = set()

    def fake_fit(cfg, train_loader, val_loader, model, **kwargs):
        assert val_loader is None  # a refit has no validation fold
        seen.update(train_loader.dataset.sample_patient_ids)
        return loop.FitResult(best_epoch=1, best_val_auc=float("nan"), epochs_run=1,
                              stop_reason="completed")  # fmt: skip

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "fit", fake_fit)
    monkeypatch.setattr(gradcam, "write_gallery", boom)
    out = setup.root / "final_crash"
    settings = {"bootstrap": 200, "onnx": False, "gradcam_per_category": 1}
    with pytest.raises(RuntimeError, match="boom"):
        final_model(locate_best(setup.search), out, settings=settings)
    splits = _splits(setup)
    assert seen and not seen & set(splits.holdout)
    assert seen <= set(splits.development)
    assert not out.exists()


def test_user_errors_name_what_is_wrong(setup: StudySetup, tmp_path: Path):
    from breastfusion.final.run import final_from_best, final_model

    choice = locate_best(setup.search)
    bare = Choice(config=choice.config, source="a config file")
    with pytest.raises(UserError, match="out-of-fold"):
        final_model(bare, tmp_path / "a", settings={"target_sensitivity": 0.9})
    with pytest.raises(UserError, match="mode ensemble needs"):
        final_model(bare, tmp_path / "b", settings={"mode": "ensemble"})
    with pytest.raises(ConfigError, match=r"final\.colour.*allowed under final: mode"):
        final_from_best(setup.search, out=tmp_path / "c", settings={"colour": 1})
    with pytest.raises(UserError, match="no chosen trial"):
        locate_best({"trial": None, "note": "no trial finished every fold"})
    with pytest.raises(UserError, match="detector_dir: .*not a detector bundle"):
        final_model(choice, tmp_path / "d", detector_dir=tmp_path)
    foreign = tmp_path / "e"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*notes.txt"):
        final_model(choice, foreign, settings={"onnx": False, "bootstrap": 200})
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_a_damaged_fold_model_is_explained_in_words(setup: StudySetup, tmp_path: Path):
    import shutil

    from breastfusion.final.members import load_member

    fold = tmp_path / "fold0"
    shutil.copytree(setup.fold_dirs[0], fold)
    data = (fold / "model.pt").read_bytes()
    (fold / "model.pt").write_bytes(data[: len(data) // 2])
    (facts,) = read_folds([runs.FoldDir(fold, 0)])
    chosen = Config.from_dict(locate_best(setup.search).config)
    with pytest.raises(UserError, match=r"model.pt: the fold model file is damaged or incomplete"):
        load_member(facts, chosen)


def test_settings_are_strict_and_name_their_keys():
    assert FinalSettings.from_dict(None) == FinalSettings()
    debug = FinalSettings.from_dict({"bootstrap": 500}, debug=True)
    assert debug.bootstrap == 500 and debug.gradcam_per_category == 1
    assert FinalSettings.from_dict({"target_sensitivity": 1}).target_sensitivity == 1.0
    for raw, key in (
        ({"mode": "average"}, "final.mode"),
        ({"target_sensitivity": 1.5}, "final.target_sensitivity"),
        ({"epochs": 0}, "final.epochs"),
        ({"bootstrap": 10}, "final.bootstrap"),
        ({"device": "tpu"}, "final.device"),
        ({"keep_patient_ids": "yes"}, "final.keep_patient_ids"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            FinalSettings.from_dict(raw)
    with pytest.raises(ConfigError, match=r"study\.final\.x"):
        FinalSettings.from_dict({"x": 1}, prefix="study.final")


def _fold(tmp: Path, k: int, **metrics) -> runs.FoldDir:
    atomic_write_json(
        tmp / f"fold{k}" / "metrics.json", {"calibration": {"a": 1, "b": 0}, **metrics}
    )
    return runs.FoldDir(tmp / f"fold{k}", k)


def test_refit_epochs_follow_the_folds_reported_models(tmp_path: Path):
    facts = read_folds([_fold(tmp_path, k, reported_epoch=e) for k, e in enumerate((2, 3, 3))])
    assert refit_epochs(facts, 200)[0] == 3
    assert refit_epochs(facts[:2], 200)[0] == 3  # 2.5 rounds half up
    # patience 0: the fold reported its last epoch (5), not its best-AUC epoch (2)
    last = read_folds([_fold(tmp_path / "x", 0, reported_epoch=5, best_epoch=2, epochs_run=5)])
    assert refit_epochs(last, 200)[0] == 5
    epochs, rule = refit_epochs(read_folds([_fold(tmp_path / "y", 0)]), 200)
    assert epochs == 200 and "optim.epochs" in rule
    with pytest.raises(UserError, match="no calibration"):
        atomic_write_json(tmp_path / "z" / "fold0" / "metrics.json", {"best_epoch": 1})
        read_folds([runs.FoldDir(tmp_path / "z" / "fold0", 0)])


def test_outputs_appear_only_when_complete_and_only_in_owned_folders(tmp_path: Path):
    from breastfusion.final.outdir import staged_output
    from breastfusion.fsguard import FolderBusy

    names, out = ("a.txt", "b", "done.json"), tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output(out, "final", names, "done.json") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert not out.exists()  # a folder this run created is gone again
    with staged_output(out, "final", names, "done.json") as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b").mkdir()
        (tmp / "done.json").write_text("{}")
        assert not (out / "a.txt").exists()  # nothing visible before the end
        with pytest.raises(FolderBusy):  # one writer at a time
            with staged_output(out, "final", names, "done.json"):
                pass
    assert (out / "a.txt").read_text() == "1" and (out / "b").is_dir()
    with staged_output(out, "final", names, "done.json") as tmp:
        (tmp / "a.txt").write_text("2")
        (tmp / "done.json").write_text("{}")
    assert (out / "a.txt").read_text() == "2" and not (out / "b").exists()  # stale output gone
    with pytest.raises(RuntimeError):
        with staged_output(out, "final", names, "done.json") as tmp:
            raise RuntimeError("crash")
    assert (out / "a.txt").read_text() == "2" and (out / "done.json").is_file()  # kept as was
    with pytest.raises(UserError, match="not a predict folder"):
        with staged_output(out, "predict", names, "done.json"):
            pass
