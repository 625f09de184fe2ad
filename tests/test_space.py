"""Search-space YAML → validated SearchSpace, and every bad-input error of ``breastfusion search``
raised before any trial starts (no Ray here: each test takes well under a second)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from breastfusion.cli import main
from breastfusion.data.manifest import load_manifest
from breastfusion.data.splits import make_splits, write_splits
from breastfusion.distributed import search as search_mod
from breastfusion.distributed.space import load_space, parse_space
from breastfusion.errors import ConfigError, UserError
from breastfusion.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


# -- the shipped spaces --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["backbones_dm", "backbones_us", "fusion", "debug"])
def test_shipped_spaces_parse_and_map_to_tune(name):
    space = load_space(SPACES / f"{name}.yaml")
    assert space.name == name
    tune_space = space.to_tune()
    assert set(tune_space) == set(space.searched_keys)
    debug = space.for_debug()
    assert debug.fixed["optim.epochs"] == 1
    assert debug.fixed["data.max_patients"] <= 24
    assert debug.fixed["model.pretrained"] == "none"
    assert "data.size_dm" not in debug.searched_keys


def test_backbone_comparisons_are_the_studys_six_backbone_grids():
    six = {"resnet18", "resnet50", "resnext50_32x4d", "inception_v3", "vgg16", "googlenet"}
    for modality in ("dm", "us"):
        space = load_space(SPACES / f"backbones_{modality}.yaml")
        assert space.algorithm == "grid"
        assert space.fixed["data.modality"] == modality
        (domain,) = space.domains
        assert domain.key == f"model.backbone_{modality}" and set(domain.values) == six
        # Debug keeps the path but at most two trials, at a size every kept backbone accepts.
        debug = space.for_debug()
        assert len(debug.domains[0].values) == 2
        assert debug.fixed[f"data.size_{modality}"] >= 32


def test_fusion_space_searches_what_the_issue_lists():
    space = load_space(SPACES / "fusion.yaml")
    keys = set(space.searched_keys)
    for key in (
        "optim.lr",
        "optim.batch_size",
        "data.size_dm",
        "data.size_us",
        "model.backbone_dm",
        "model.backbone_us",
        "model.fusion",
        "augment.strength",
    ):
        assert key in keys
    lr = next(d for d in space.domains if d.key == "optim.lr")
    assert lr.kind == "loguniform"
    assert space.algorithm == "optuna" and space.scheduler.type == "asha"


def test_debug_size_respects_the_largest_backbone_minimum():
    space = parse_space(
        {
            "algorithm": "grid",
            "fixed": {"data.modality": "dm"},
            "space": {"model.backbone_dm": {"grid": ["resnet18", "inception_v3"]}},
        }
    )
    from breastfusion.models.registry import min_input_size

    assert space.for_debug().fixed["data.size_dm"] == max(32, min_input_size("inception_v3"))


def test_grid_debug_keeps_at_most_two_trials():
    space = parse_space(
        {
            "algorithm": "grid",
            "space": {
                "optim.lr": {"grid": [1e-3, 1e-4, 1e-5]},
                "model.fusion": {"grid": ["sum", "concat"]},
            },
        }
    )
    sizes = [len(d.values) for d in space.for_debug().domains]
    assert sizes == [2, 1]


# -- bad spaces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"foo": 1}, "unknown key 'foo'"),
        ({"fixed": {"optim.lrr": 1e-3}}, "unknown config key 'optim.lrr'"),
        (
            {"space": {"model.backbone_dm": {"choice": ["resnet18", "resnet9000"]}}},
            "unknown backbone 'resnet9000'",
        ),
        ({"space": {"optim.lr": {"loguniform": [1e-3, 1e-3]}}}, "empty range"),
        ({"space": {"optim.lr": {"uniform": [0.5, 0.1]}}}, "empty range"),
        ({"space": {"optim.lr": {"choice": []}}}, "non-empty list"),
        ({"space": {"optim.lr": {"loguniform": [0, 1e-3]}}}, "low > 0"),
        ({"space": {"optim.lr": {"normal": [1, 2]}}}, "'normal' is not one of"),
        ({"space": {"optim.lr": {"grid": [1e-3, 1e-4]}}}, "need algorithm: grid"),
        (
            {"algorithm": "grid", "space": {"optim.lr": {"choice": [1e-3, 1e-4]}}},
            "needs every domain to be a 'grid'",
        ),
        (
            {"fixed": {"optim.lr": 1e-3}, "space": {"optim.lr": {"choice": [1e-3]}}},
            "both fixed and searched",
        ),
        ({"fixed": {"data.fold": 1}}, "'data.fold' is set by the search"),
        ({"scheduler": {"type": "pbt"}}, "scheduler.type: 'pbt'"),
        ({"space": {"data.size_dm": {"choice": [8, 224]}}}, "8 px is below the minimum"),
        ({"resources": {"cpu": 0}}, "cpu must be > 0"),
        ({"num_samples": 0}, "num_samples: expected an integer >= 1"),
        ({"folds": 1}, "folds: expected an integer >= 2"),
        ({"keep_checkpoints": "some"}, "keep_checkpoints: 'some' is not one of best, all"),
        ({"fold_parallel": "yes"}, "fold_parallel: expected true or false"),
        ({"fold_parallel": True, "workers": 2}, "fold_parallel: true trains each fold"),
        ({"scheduler": {"type": "asha", "fold_margin": 2}}, "scheduler.fold_margin"),
        ({"scheduler": {"type": "asha", "patience": 2}}, "unknown key 'scheduler.patience'"),
    ],
)
def test_bad_spaces_name_the_problem(raw, message):
    with pytest.raises(ConfigError, match=None) as info:
        parse_space(raw)
    assert message in str(info.value)


def test_load_space_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {optim.lr: {loguniform: [1.0e-3, 1.0e-4]}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: space\.optim\.lr: empty range"):
        load_space(bad)
    with pytest.raises(ConfigError, match="cannot read search space"):
        load_space(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("space: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(tmp_path / "broken.yaml")


# -- the same problems through `breastfusion search`: exit 2, one line, no trial -----------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, request) -> tuple[Path, Path]:
    """(manifest, 2-fold splits) of the shared synthetic cohort."""
    manifest = request.getfixturevalue("synthetic_cohort")
    df = load_manifest(manifest)
    splits = make_splits(df, folds=2, holdout=0.0, seed=0, manifest_sha256=sha256_file(manifest))
    return manifest, write_splits(splits, tmp_path_factory.mktemp("space") / "splits.json")


def _space_file(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((SPACES / "debug.yaml").read_text())
    raw.update(changes)
    path = tmp_path / f"space{len(list(tmp_path.glob('space*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _search(space: Path, inputs, out: Path, *extra: str) -> list[str]:
    manifest, splits = inputs
    return [
        "search",
        "--space",
        str(space),
        "--manifest",
        str(manifest),
        "--splits",
        str(splits),
        "--out",
        str(out),
        "--debug",
        *extra,
    ]


@pytest.fixture
def no_tune(monkeypatch):
    """Fail the test if a search gets as far as starting Tune."""

    def boom(*args, **kwargs):
        raise AssertionError("a trial was about to start")

    monkeypatch.setattr(search_mod, "_run_tune", boom)


def _expect_user_error(argv: list[str], capsys, *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    return err


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"colour": "blue"}, ["unknown key 'colour'"]),
        (
            {"space": {"model.backbone_dm": {"choice": ["resnet18", "alexnet"]}}},
            ["unknown backbone 'alexnet'"],
        ),
        ({"space": {"optim.lr": {"loguniform": [1.0e-2, 1.0e-4]}}}, ["empty range"]),
        (
            {"algorithm": "optuna", "space": {"optim.lr": {"grid": [1.0e-3, 1.0e-4]}}},
            ["need algorithm: grid"],
        ),
        ({"folds": 5}, ["asks for 5 folds", "holds 2"]),
    ],
)
def test_cli_bad_space_fails_before_any_trial(
    inputs, tmp_path, capsys, no_tune, changes, fragments
):
    space = _space_file(tmp_path, **changes)
    out = tmp_path / "out"
    err = _expect_user_error(_search(space, inputs, out), capsys, *fragments)
    if "folds" not in changes:
        assert space.name in err  # the file is named
    assert not (out / "tune").exists()


def test_cli_refuses_an_output_folder_holding_another_experiment(
    inputs, tmp_path, capsys, monkeypatch
):
    # A first search claims the folder; stop it right after the claim (no Ray needed).
    def interrupted(*args, **kwargs):
        raise UserError("interrupted on purpose")

    monkeypatch.setattr(search_mod, "_run_tune", interrupted)
    space = _space_file(tmp_path)
    out = tmp_path / "out"
    _expect_user_error(_search(space, inputs, out), capsys, "interrupted on purpose")
    assert json.loads((out / "experiment.json").read_text())["space_name"] == "debug-debug"

    monkeypatch.setattr(search_mod, "_run_tune", lambda *a, **k: pytest.fail("trial started"))
    # The same experiment again without --resume.
    _expect_user_error(
        _search(space, inputs, out), capsys, "already holds this experiment", "--resume"
    )
    # Another experiment (another space) in the same folder, with or without --resume.
    other = _space_file(tmp_path, seed=1)
    for extra in ((), ("--resume",)):
        _expect_user_error(
            _search(other, inputs, out, *extra),
            capsys,
            "holds a different experiment",
            "space.seed: 0 → 1",  # what differs is named
        )
    # Not --debug is another experiment too (other folds, other sizes).
    argv = [a for a in _search(space, inputs, out, "--resume") if a != "--debug"]
    _expect_user_error(argv, capsys, "holds a different experiment")


def test_cli_resume_needs_something_to_resume(inputs, tmp_path, capsys, no_tune):
    _expect_user_error(
        _search(_space_file(tmp_path), inputs, tmp_path / "empty", "--resume"),
        capsys,
        "nothing to resume",
    )
    assert not (tmp_path / "empty").exists()  # nothing half-written


def test_cli_refuses_a_folder_another_search_is_writing(inputs, tmp_path, capsys, no_tune):
    from breastfusion.fsguard import FolderLock

    out = tmp_path / "busy"
    with FolderLock(out, "search"):
        _expect_user_error(
            _search(_space_file(tmp_path), inputs, out),
            capsys,
            "in use by another breastfusion process",
            f"pid {os.getpid()}",
        )
    assert not (out / "experiment.json").exists()


def test_cli_refuses_a_non_empty_foreign_folder(inputs, tmp_path, capsys, no_tune):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _expect_user_error(_search(_space_file(tmp_path), inputs, out), capsys, "not empty", str(out))


def test_cli_bad_mlflow_uri_fails_before_the_folder_is_claimed(inputs, tmp_path, capsys, no_tune):
    out = tmp_path / "out"
    _expect_user_error(
        _search(_space_file(tmp_path), inputs, out, "--mlflow-uri", "bogus://nowhere"),
        capsys,
        "tracking.mlflow_uri 'bogus://nowhere'",
    )
    assert not out.exists()
