"""The typed study file: strict keys, defaults in one place, paths, --debug, stage settings."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from breastfusion.cli import main
from breastfusion.errors import ConfigError
from breastfusion.study_config import StudyConfig, load_study, parse_study

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "algorithm": "random",
    "num_samples": 1,
    "scheduler": "none",
    "fixed": {"data.modality": "fusion"},
    "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
}
MINIMAL = {"data": {"synthetic": {}}, "fusion": SPACE}


def _study(tmp_path: Path, doc: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _with(**sections) -> dict:
    doc = copy.deepcopy(MINIMAL)
    doc.update(sections)
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_with(bogus=1), "unknown setting bogus; allowed at the top level: name,"),
        (
            _with(roi={"crop": {"marginn": 0.1}}),
            "unknown setting roi.crop.marginn; allowed under roi.crop: margin,",
        ),
        (_with(roi={"train": {"epoch": 3}}), "unknown setting roi.train.epoch"),
        (
            {"data": {"synthetic": {"patiens": 50}}, "fusion": SPACE},
            "unknown setting data.synthetic.patiens; allowed under data.synthetic: patients,",
        ),
        (_with(final={"target_sensitivty": 0.9}), "unknown setting final.target_sensitivty"),
        (_with(final={"mode": "magic"}), "final.mode must be one of refit, ensemble"),
        (_with(final={"target_sensitivity": 1.5}), "final.target_sensitivity"),
        (_with(aggregate={"bootstrapp": 10}), "unknown setting aggregate.bootstrapp"),
        (_with(report={"bootstrap": 10}), "report.bootstrap must be >= 100"),
        (_with(tracking={"uri": "x"}), "unknown setting tracking.uri"),
        (_with(splits={"folds": 1}), "splits.folds must be >= 2"),
        (_with(splits={"holdout": "a lot"}), "splits.holdout must be a number"),
        (
            _with(splits={"near_duplicates": "group"}),
            "splits.near_duplicates must be one of off, refuse, got 'group'",
        ),
        (_with(roi={"mode": "magic"}), "roi.mode must be one of detect, boxes, none"),
        (_with(base={"optim.lrr": 1}), "base: unknown config key 'optim.lrr'"),
        (
            {"data": {}, "fusion": SPACE},
            "data needs exactly one of data.manifest or data.synthetic",
        ),
        (
            {"data": {"synthetic": {}, "manifest": "m.csv"}, "fusion": SPACE},
            "exactly one of data.manifest or data.synthetic",
        ),
        (_with(backbones={"mri": "x.yaml"}), "unknown setting backbones.mri"),
        ({"data": {"synthetic": {}}}, "the study runs no search"),
        (
            _with(fusion={"space": {"model.backbone_dm": {"choice": ["resnet19"]}}}),
            "unknown backbone 'resnet19'",
        ),
        (_with(fusion={"space": {"optim.lr": {"loguniform": [1, 1]}}}), "empty range"),
        (_with(fusion={**SPACE, "folds": 3}), "asks for 3 folds but splits.folds is 5"),
        (_with(fusion="no/such/space.yaml"), "cannot read search space"),
    ],
)
def test_bad_study_files_fail_before_any_stage_and_write_nothing(tmp_path, capsys, doc, message):
    out = tmp_path / "out"
    code = main(["run", str(_study(tmp_path, doc)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert "study.yaml" in err  # the file is named
    assert not out.exists()  # nothing started, nothing written


def test_defaults_live_in_the_typed_config(tmp_path):
    study = load_study(_study(tmp_path, MINIMAL))
    assert study.splits.to_dict() == {
        "folds": 5,
        "holdout": 0.2,
        "seed": 0,
        "near_duplicates": "off",
    }
    assert study.data.synthetic.to_dict() == {
        "patients": 120,
        "size": 128,
        "seed": 0,
        "difficulty": "standard",
    }
    assert study.roi.mode == "detect"
    assert (study.roi.crop.margin, study.roi.train.epochs, study.roi.train.imgsz) == (0.1, 300, 640)
    assert study.final.mode == "refit" and study.final.bootstrap == 2000
    assert study.report.bootstrap == 1000 and study.tracking.mlflow_uri is None
    assert study.aggregate.bootstrap == 2000
    # The hashed settings are the resolved ones: an explicit default hashes like none at all.
    explicit = load_study(
        _study(tmp_path, _with(roi={"crop": {"margin": 0.1}, "train": {"epochs": 300}}), "b.yaml")
    )
    changed = load_study(_study(tmp_path, _with(roi={"crop": {"margin": 0.2}}), "c.yaml"))
    assert explicit.stage_settings("03_roi") == study.stage_settings("03_roi")
    assert changed.stage_settings("03_roi") != study.stage_settings("03_roi")
    assert study.stage_settings("03_roi")["crop"]["margin"] == 0.1


def test_relative_paths_are_resolved_against_the_study_file(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "manifest.csv").write_text("patient_id,modality,path,label\n")
    (folder / "spaces").mkdir()
    (folder / "spaces" / "f.yaml").write_text(yaml.safe_dump(SPACE))
    doc = {
        "data": {"manifest": "data/manifest.csv", "cache_dir": "cache"},
        "fusion": "spaces/f.yaml",
        "out": "runs/x",
        "tracking": {"mlflow_uri": "sqlite:///mlflow.db"},
    }
    path = _study(folder, doc)
    monkeypatch.chdir(tmp_path)  # somewhere else
    study = load_study(path)
    assert study.data.manifest == str(folder / "data" / "manifest.csv")
    assert study.data.cache_dir == str(folder / "cache")
    assert study.searches["fusion"].file == str(folder / "spaces" / "f.yaml")
    assert study.out == folder / "runs" / "x"
    assert study.tracking.mlflow_uri == f"sqlite:///{folder.as_posix()}/mlflow.db"
    assert study.base_config().data.cache_dir == str(folder / "cache")
    # study.json stores inputs relative to the study file, so a moved project still matches.
    portable = study.to_dict(portable=True)
    assert portable["data"]["manifest"] == "data/manifest.csv"
    assert portable["searches"]["fusion"]["file"] == "spaces/f.yaml"
    assert study.stage_settings("01_data")["manifest"] == "data/manifest.csv"


def test_debug_is_decided_in_one_place(tmp_path):
    doc = _with(
        roi={"train": {"epochs": 50}},
        final={"bootstrap": 5000, "gradcam_per_category": 4},
        report={"bootstrap": 1000},
    )
    study = load_study(_study(tmp_path, doc))
    debug = study.for_debug()
    assert debug.debug and not study.debug
    assert debug.roi.train.epochs == 2
    assert debug.final.bootstrap == 200 and debug.final.gradcam_per_category == 1
    assert debug.report.bootstrap == 200 and debug.aggregate.bootstrap == 200
    assert debug.for_debug() is debug
    # Searches shrink the way `search(debug=True)` shrinks them, and the hash says so.
    assert debug.search_space("fusion").source.get("debug") is True
    assert debug.stage_settings("06_fusion") != study.stage_settings("06_fusion")
    assert debug.stage_settings("02_splits") == study.stage_settings("02_splits")


def test_a_refit_study_keeps_no_search_fold_models_unless_a_space_says(tmp_path):
    """A refit final model trains anew, so the searches' fold models (90 MB each for a dual
    ResNet-18) are dropped; an ensemble needs them; a space's own setting wins."""
    refit = load_study(_study(tmp_path, _with(final={"mode": "refit"})))
    assert refit.search_space("fusion").keep_checkpoints == "none"
    ensemble = load_study(_study(tmp_path, _with(final={"mode": "ensemble"}), "e.yaml"))
    assert ensemble.search_space("fusion").keep_checkpoints == "best"
    doc = _with(final={"mode": "refit"})
    doc["fusion"] = {**doc["fusion"], "keep_checkpoints": "all"}
    assert load_study(_study(tmp_path, doc, "k.yaml")).search_space("fusion").keep_checkpoints == (
        "all"
    )


def test_report_gradcam_fills_the_final_setting_unless_final_sets_it(tmp_path):
    only_report = load_study(_study(tmp_path, _with(report={"gradcam_per_category": 2})))
    assert only_report.final.gradcam_per_category == 2
    both = _with(report={"gradcam_per_category": 2}, final={"gradcam_per_category": 5})
    assert load_study(_study(tmp_path, both, "b.yaml")).final.gradcam_per_category == 5


def test_types_are_checked_with_the_key_named(tmp_path):
    for doc, message in (
        (
            _with(data={"synthetic": {"patients": 12.5}}),
            "data.synthetic.patients must be an integer",
        ),
        (_with(data={"synthetic": {}, "check_images": "yes"}), "data.check_images must be true"),
        (_with(roi={"crop": "wide"}), "roi.crop must be a mapping"),
        (_with(name=3), "name must be a string"),
    ):
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            parse_study(doc, tmp_path / "s.yaml")


def test_shipped_study_files_load():
    for name in ("debug.yaml", "demo.yaml", "study.yaml"):
        study = load_study(ROOT / "jobs" / name)
        assert isinstance(study, StudyConfig)
        assert set(study.searches) == {"dm", "us", "fusion"}


def test_splits_near_duplicates_reads_yaml_words_and_hashes_only_when_on(tmp_path):
    def splits_of(text: str, name: str) -> StudyConfig:
        doc = yaml.safe_dump(MINIMAL) + text
        path = tmp_path / name
        path.write_text(doc)
        return load_study(path)

    plain = splits_of("", "plain.yaml")
    off = splits_of("splits:\n  near_duplicates: off\n", "off.yaml")  # YAML 1.1: false
    on = splits_of("splits:\n  near_duplicates: refuse\n", "on.yaml")
    bare_on = splits_of("splits:\n  near_duplicates: on\n", "bare.yaml")  # YAML 1.1: true
    assert off.splits.near_duplicates == "off" and plain.splits.near_duplicates == "off"
    assert on.splits.near_duplicates == bare_on.splits.near_duplicates == "refuse"
    # Off is the default and leaves the splits stage's hash as it was before the key existed.
    assert plain.stage_settings("02_splits") == {"folds": 5, "holdout": 0.2, "seed": 0}
    assert off.stage_settings("02_splits") == plain.stage_settings("02_splits")
    assert on.stage_settings("02_splits")["near_duplicates"] == "refuse"
