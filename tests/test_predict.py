"""``breastfusion predict``: a bundle scores raw patients exactly as ``final`` scored them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import load_splits
from breastfusion.predict.inputs import parse_name
from breastfusion.predict.run import predict
from final_support import FakeDetector, StudySetup, ensemble_final, study_setup


@pytest.fixture(scope="module")
def setup(synthetic_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> StudySetup:
    return study_setup(synthetic_cohort, tmp_path_factory.getbasetemp() / "final_study")


@pytest.fixture(scope="module")
def bundle(setup: StudySetup) -> Path:
    return ensemble_final(setup)


@pytest.fixture(autouse=True)
def fake_detector(monkeypatch: pytest.MonkeyPatch):
    """The bundle's detector is the study's fake one; its crop rule comes from the bundle."""
    import breastfusion.predict.images as images
    from breastfusion.roi.bundle import read_bundle

    monkeypatch.setattr(
        images, "load_detector", lambda d, dev, w: (FakeDetector(), read_bundle(d)[1])
    )


def _raw_rows(setup: StudySetup, patients) -> pd.DataFrame:
    """The cohort's *raw* manifest rows of ``patients`` with absolute paths."""
    raw = load_manifest(setup.raw_manifest)
    rows = raw[raw["patient_id"].isin(set(patients))]
    return rows[["patient_id", "modality", "label"]].assign(path=rows["abs_path"])


def _holdout(setup: StudySetup) -> list[str]:
    return list(load_splits(setup.splits, load_manifest(setup.manifest)).holdout)


@pytest.fixture(scope="module")
def holdout_manifest(setup: StudySetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("predict_in") / "holdout.csv"
    _raw_rows(setup, _holdout(setup)).to_csv(path, index=False)
    return path


def _final_scores(bundle: Path) -> pd.Series:
    saved = pd.read_csv(bundle / "predictions_holdout.csv", dtype={"patient_id": str})
    return saved.set_index("patient_id")["y_score"].sort_index()


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_predict_reproduces_the_final_holdout_scores(
    bundle: Path, holdout_manifest: Path, tmp_path: Path, backend: str
):
    result = predict(bundle, holdout_manifest, tmp_path / "out", backend=backend, n_boot=200,
                     evaluate=backend == "torch")  # fmt: skip
    table = result.predictions.set_index("patient_id")
    scored = table[table["status"] == "scored"]["y_score"].sort_index()
    expected = _final_scores(bundle)
    assert list(scored.index) == list(expected.index)
    np.testing.assert_allclose(scored.to_numpy(), expected.to_numpy(), atol=1e-4, rtol=0)
    meta = json.loads((bundle / "bundle" / "metadata.json").read_text())
    thr = meta["operating_point"]["threshold"]
    assert (table.loc[scored.index, "call"] == np.where(scored >= thr, "malignant", "benign")).all()
    on_disk = pd.read_csv(tmp_path / "out" / "predictions.csv", dtype={"patient_id": str})
    assert list(on_disk["patient_id"]) == list(dict.fromkeys(pd.read_csv(
        holdout_manifest, dtype=str)["patient_id"]))  # fmt: skip
    assert {"y_score", "probability", "call", "y_true", "modalities", "n_images", "status"} <= set(
        on_disk.columns
    )
    if backend == "torch":
        final = json.loads((bundle / "metrics.json").read_text())["models"]
        mine = json.loads((tmp_path / "out" / "metrics.json").read_text())["models"]
        (f,), (m,) = final.values(), mine.values()
        assert m["auc"]["value"] == pytest.approx(f["auc"]["value"], abs=1e-12)
        assert m["threshold"] == thr and m["auc"]["ci_low"] is not None
        assert (tmp_path / "out" / "metrics.md").is_file()


def test_patients_lacking_a_modality_get_a_status(
    bundle: Path, holdout_manifest: Path, tmp_path: Path
):
    rows = pd.read_csv(holdout_manifest, dtype=str)
    dm_only, us_only = sorted(rows["patient_id"].unique())[:2]
    rows = rows[~((rows["patient_id"] == dm_only) & (rows["modality"] == "US"))]
    rows = rows[~((rows["patient_id"] == us_only) & (rows["modality"] == "DM"))]
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    result = predict(bundle, manifest, tmp_path / "out")
    table = result.predictions.set_index("patient_id")
    # the ensemble names a DM-only bundle: it scores the patient without US
    assert table.at[dm_only, "status"] == "scored by the DM-only model (no US image)"
    assert np.isfinite(table.at[dm_only, "y_score"]) and table.at[dm_only, "model"] == "dm_refit"
    assert table.at[dm_only, "modalities"] == "DM"
    # no US-only bundle is named: the patient without DM is reported, not dropped
    assert table.at[us_only, "status"].startswith("not scored: no DM image; no US-only bundle")
    assert np.isnan(table.at[us_only, "y_score"]) and table.at[us_only, "call"] == ""
    assert len(table) == rows["patient_id"].nunique()  # nobody silently dropped
    both = rows.groupby("patient_id")["modality"].nunique() == 2
    others = table.loc[both[both].index]
    assert len(others) and (others["status"] == "scored").all()
    assert (others["modalities"] == "DM+US").all()


def test_images_csv_records_the_study_crops(
    setup: StudySetup, bundle: Path, holdout_manifest, tmp_path
):
    predict(bundle, holdout_manifest, tmp_path / "out")
    images = pd.read_csv(tmp_path / "out" / "images.csv", dtype={"patient_id": str})
    us = images[(images["modality"] == "US") & (images["status"] == "used")]
    assert len(us) and set(us["roi_source"]) <= {"detected", "fallback"}
    study = pd.read_csv(setup.root / "crops" / "crops.csv", dtype={"patient_id": str})
    study["abs"] = [str((setup.root / "crops" / p).resolve()) for p in study["source_path"]]
    merged = us.merge(study, left_on="path", right_on="abs", suffixes=("", "_study"))
    assert len(merged) == len(us)
    for ours, theirs in (
        ("crop_x0", "roi_x0"),
        ("crop_y1", "roi_y1"),
        ("roi_source", "roi_source_study"),
    ):
        assert list(merged[ours]) == list(merged[theirs])


def test_a_folder_of_images_scores_the_same_without_labels(
    setup: StudySetup, bundle: Path, holdout_manifest: Path, tmp_path: Path, capsys
):
    rows = pd.read_csv(holdout_manifest, dtype=str)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, r in enumerate(rows.itertuples()):
        shutil.copy(r.path, folder / f"{r.patient_id}_{r.modality}_{i}{Path(r.path).suffix}")
    assert parse_name("case_7_DM_cc") == ("case_7", "DM") and parse_name("x_cc") is None
    args = ["predict", bundle, "--manifest", folder, "--out", tmp_path / "o", "--gradcam", "1"]
    code = main([str(a) for a in args])
    assert code == 0, capsys.readouterr().err
    got = pd.read_csv(tmp_path / "o" / "predictions.csv", dtype={"patient_id": str})
    assert "y_true" not in got.columns
    gallery = pd.read_csv(tmp_path / "o" / "gradcam" / "index.csv", dtype={"patient_id": str})
    assert set(gallery["category"]) <= {"called_malignant", "called_benign"} and len(gallery)
    assert all((tmp_path / "o" / "gradcam" / f).is_file() for f in gallery["raw_file"])
    expected = _final_scores(bundle)
    mine = got[got["status"] == "scored"].set_index("patient_id")["y_score"].sort_index()
    np.testing.assert_allclose(mine.to_numpy(), expected.loc[mine.index].to_numpy(), atol=1e-4)
    assert set(mine.index) == set(expected.index)


def test_unreadable_images_get_a_status_and_nothing_crashes(
    setup: StudySetup, bundle: Path, tmp_path: Path
):
    both = [p for p in _holdout(setup) if set(_raw_rows(setup, [p])["modality"]) == {"DM", "US"}]
    rows = _raw_rows(setup, both[:3]).reset_index(drop=True)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    us = rows.index[rows["modality"] == "US"]
    first, second = rows.at[us[0], "patient_id"], rows.at[us[-1], "patient_id"]
    rows.loc[(rows["patient_id"] == first) & (rows["modality"] == "US"), "path"] = str(bad)
    rows.loc[rows["patient_id"] == second, "path"] = str(tmp_path / "missing.png")
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    result = predict(bundle, manifest, tmp_path / "out")
    status = result.predictions.set_index("patient_id")["status"]
    assert status[first] == "scored by the DM-only model (no US image)"
    assert status[second].startswith("not scored: no usable image (unreadable)")
    images = result.images
    assert images.loc[images["path"] == str(bad), "status"].str.contains("broken.png").all()


def _copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle / "bundle", dest)
    return dest


def _run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["predict", *map(str, args)])
    return code, capsys.readouterr().err


def test_a_moved_bundle_scores_the_same(bundle: Path, holdout_manifest: Path, tmp_path: Path):
    moved = _copy_bundle(bundle, tmp_path / "elsewhere" / "model")
    rows = pd.read_csv(holdout_manifest, dtype=str)
    dm_only = rows["patient_id"].iloc[0]
    rows = rows[~((rows["patient_id"] == dm_only) & (rows["modality"] == "US"))]
    manifest = tmp_path / "m.csv"
    rows.to_csv(manifest, index=False)
    result = predict(moved, manifest, tmp_path / "out")
    table = result.predictions.set_index("patient_id")
    scored = table[table["status"] == "scored"]["y_score"].sort_index()
    expected = _final_scores(bundle).drop(index=dm_only)
    np.testing.assert_allclose(scored.to_numpy(), expected.to_numpy(), atol=1e-4)
    # the DM-only fallback is a sibling of the study's bundle, not inside it: named, not used
    assert table.at[dm_only, "status"].startswith("not scored: no US image; no DM-only bundle at")


def test_bad_inputs_are_one_line_errors_and_write_nothing(
    bundle: Path, holdout_manifest: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    newer = _copy_bundle(bundle, tmp_path / "newer")
    meta = json.loads((newer / "metadata.json").read_text())
    (newer / "metadata.json").write_text(json.dumps({**meta, "format": "breastfusion-model/3"}))
    damaged = _copy_bundle(bundle, tmp_path / "damaged")
    data = (damaged / "model.pt").read_bytes()
    (damaged / "model.pt").write_bytes(data[: len(data) // 3])
    no_onnx = _copy_bundle(bundle, tmp_path / "no_onnx")
    (no_onnx / "model.onnx").unlink()
    header_only = tmp_path / "header.csv"
    header_only.write_text("patient_id,modality,path,label\n")
    unlabelled = tmp_path / "unlabelled.csv"
    pd.read_csv(holdout_manifest, dtype=str).drop(columns=["label"]).to_csv(unlabelled, index=False)
    cases = [
        ([empty, "--manifest", holdout_manifest], f"{empty / 'metadata.json'}: not found"),
        ([newer, "--manifest", holdout_manifest], "breastfusion-model/3 is newer"),
        ([damaged, "--manifest", holdout_manifest], "model.pt: the weights file is damaged"),
        ([no_onnx, "--manifest", holdout_manifest, "--backend", "onnxruntime"], "no ONNX model"),
        (
            [bundle, "--manifest", header_only],
            f"{header_only}: the manifest has a header but no rows",
        ),
        ([bundle, "--manifest", unlabelled, "--evaluate"], "evaluation needs a label"),
    ]
    for args, message in cases:
        code, err = _run([*args, "--out", out], capsys)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists(), args  # nothing half-written
