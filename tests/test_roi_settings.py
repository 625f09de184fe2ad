"""ROI settings: the study's defaults, keyed errors, and the CLI as a face over the keys."""

from __future__ import annotations

import dataclasses

import pytest

from breastfusion.errors import ConfigError
from breastfusion.roi.settings import CropSettings, DetectorTrainSettings


def test_defaults_are_the_study_values() -> None:
    t = DetectorTrainSettings()
    assert (t.epochs, t.imgsz, t.batch, t.seed, t.weights) == (300, 640, 8, 0, None)
    c = CropSettings()
    assert (c.margin, c.fallback, c.conf, c.iou, c.centre_fraction) == (
        0.1,
        "centre",
        0.25,
        0.7,
        0.6,
    )
    assert DetectorTrainSettings.from_dict(None) == t and CropSettings.from_dict({}) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.margin = 0.2  # type: ignore[misc]


def test_from_dict_reads_values_at_full_precision() -> None:
    c = CropSettings.from_dict({"margin": 0.123456789012345, "fallback": "drop", "conf": 1})
    assert c.margin == 0.123456789012345 and c.fallback == "drop" and c.conf == 1.0
    assert CropSettings.from_dict(c.to_dict()) == c
    t = DetectorTrainSettings.from_dict({"epochs": 3.0, "weights": "None", "seed": 7})
    assert (t.epochs, t.weights, t.seed) == (3, None, 7) and isinstance(t.epochs, int)
    assert DetectorTrainSettings.from_dict({"weights": "w/best.pt"}).weights == "w/best.pt"


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (CropSettings, {"marginn": 0.1}, r"unknown setting roi\.crop\.marginn; allowed under "
         r"roi\.crop: margin, fallback, conf, iou, centre_fraction"),
        (CropSettings, {"margin": -0.1}, r"roi\.crop\.margin must be >= 0, got -0\.1"),
        (CropSettings, {"fallback": "nearest"}, r"roi\.crop\.fallback must be one of centre, "
         r"whole, drop, got 'nearest'"),
        (CropSettings, {"conf": 1.5}, r"roi\.crop\.conf must be in \[0, 1\]"),
        (CropSettings, {"iou": "0.5"}, r"roi\.crop\.iou must be a number, got '0\.5'"),
        (CropSettings, {"centre_fraction": 0}, r"roi\.crop\.centre_fraction must be in \(0, 1\]"),
        (CropSettings, {"margin": float("nan")}, r"roi\.crop\.margin must be finite"),
        (CropSettings, {"conf": True}, r"roi\.crop\.conf must be a number, got True"),
        (DetectorTrainSettings, {"epochs": 0}, r"roi\.train\.epochs must be an integer >= 1"),
        (DetectorTrainSettings, {"imgsz": 64.5}, r"roi\.train\.imgsz must be an integer, got 64\.5"),
        (DetectorTrainSettings, {"batch": -2}, r"roi\.train\.batch must be an integer >= 1"),
        (DetectorTrainSettings, {"weights": 3}, r"roi\.train\.weights must be a file path or none"),
        (DetectorTrainSettings, {"val_fraction": 1}, r"roi\.train\.val_fraction must be in \(0, 1\)"),
        (DetectorTrainSettings, {"epoch": 3, "lr": 1}, r"unknown setting roi\.train\.epoch, "
         r"roi\.train\.lr; allowed under roi\.train: epochs"),
        (CropSettings, ["margin"], r"roi\.crop must be a mapping"),
    ],
)  # fmt: skip
def test_errors_name_the_study_key(cls, raw, message) -> None:
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(raw)


def test_prefix_follows_where_the_settings_are_embedded() -> None:
    with pytest.raises(ConfigError, match=r"^study\.roi\.crop\.margin must be >= 0"):
        CropSettings.from_dict({"margin": -1}, prefix="study.roi.crop")
    with pytest.raises(ConfigError, match=r"^roi\.crop\.margin must be >= 0"):
        CropSettings(margin=-1)
    with pytest.raises(ConfigError, match=r"^roi\.train\.epochs"):
        DetectorTrainSettings().replace(epochs=0)


def test_library_functions_name_keys_not_flags(tmp_path) -> None:
    import pandas as pd

    from breastfusion.roi.crop import crop_manifest
    from breastfusion.roi.dataset import plan_detector_patients

    df = pd.DataFrame(columns=["patient_id", "modality", "path", "label", "row", "abs_path", "y"])
    for kwargs, key in (
        ({"margin": -1}, "roi.crop.margin"),
        ({"fallback": "x"}, "roi.crop.fallback"),
        ({"centre_fraction": 2}, "roi.crop.centre_fraction"),
    ):
        with pytest.raises(ConfigError) as info:
            crop_manifest(df, tmp_path / "out", None, **kwargs)
        assert key in str(info.value) and "--" not in str(info.value)
    with pytest.raises(ConfigError, match=r"roi\.train\.val_fraction"):
        plan_detector_patients(df, [], val_fraction=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["crop", "--margin", "-1"], "error: roi.crop.margin (--margin) must be >= 0, got -1.0"),
        (["crop", "--conf", "2"], "error: roi.crop.conf (--conf) must be in [0, 1], got 2.0"),
        (["crop", "--centre-fraction", "0"],
         "error: roi.crop.centre_fraction (--centre-fraction) must be in (0, 1]"),
        (["train", "--epochs", "0"], "error: roi.train.epochs (--epochs) must be an integer >= 1"),
        (["train", "--val-fraction", "1"],
         "error: roi.train.val_fraction (--val-fraction) must be in (0, 1)"),
    ],
)  # fmt: skip
def test_cli_maps_flags_onto_keys(tmp_path, capsys, argv, expected) -> None:
    from breastfusion.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text("patient_id,modality,path,label\n")
    code = main(["roi", *argv, "--manifest", str(manifest), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_help_shows_the_settings_defaults() -> None:
    from click.testing import CliRunner

    from breastfusion.roi.cli import roi_group

    text = CliRunner().invoke(roi_group, ["crop", "--help"]).output
    assert "roi.crop.margin" in text and "[default: 0.1]" in text
    text = CliRunner().invoke(roi_group, ["train", "--help"]).output
    assert "roi.train.epochs [default: 300]" in text


def _outside_manifest(tmp_path):
    """A manifest whose image paths leave its folder (``../cohort/img/...``)."""
    import pandas as pd

    from test_roi import write_cohort

    source = write_cohort(tmp_path / "cohort", n_patients=4, us_per_patient=1)
    df = pd.read_csv(source)
    df["path"] = "../cohort/" + df["path"]
    lists = tmp_path / "lists"
    lists.mkdir()
    df.to_csv(lists / "manifest.csv", index=False)
    return lists / "manifest.csv"


def test_cli_allow_outside_reaches_the_manifest(tmp_path, capsys) -> None:
    from breastfusion.cli import main
    from breastfusion.data.manifest import load_manifest

    manifest = _outside_manifest(tmp_path)
    for cmd in ("crop", "train"):
        extra = ["--use-boxes"] if cmd == "crop" else ["--splits", str(tmp_path / "none.json")]
        argv = ["roi", cmd, "--manifest", str(manifest), *extra]
        code = main([*argv, "--out", str(tmp_path / f"{cmd}1")])
        err = capsys.readouterr().err
        assert code == 2 and "leaves the manifest's folder" in err, err
        assert "data.allow_outside (--allow-outside)" in err and "Traceback" not in err
        assert not (tmp_path / f"{cmd}1").exists()

    code = main(["roi", "train", "--manifest", str(manifest), "--allow-outside",
                 "--splits", str(tmp_path / "none.json"), "--out", str(tmp_path / "train2")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "splits file not found" in err, err  # the manifest was accepted

    out = tmp_path / "crop2"
    code = main(["roi", "crop", "--manifest", str(manifest), "--use-boxes", "--allow-outside",
                 "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(load_manifest(out / "manifest.csv")) == 8  # the crops live inside the folder
