"""Config: strict validation, YAML round trip, stable hash, dotted overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from breastfusion import runs
from breastfusion.config import Config, dump_yaml, from_dict, load_yaml, save_yaml
from breastfusion.errors import ConfigError


def test_defaults_follow_the_study():
    cfg = Config.from_dict({})
    assert cfg.optim.optimizer == "adam" and cfg.optim.lr == 1e-4
    assert (cfg.model.backbone_dm, cfg.model.backbone_us, cfg.model.fusion) == (
        "resnet18",
        "resnet18",
        "sum",
    )
    assert cfg.data.modality == "fusion" and cfg.branches == ("dm", "us")
    assert cfg == Config()


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"optim": {"learning_rate": 1}},
            r"'optim\.learning_rate'.*known keys in 'optim': optimizer, lr",
        ),
        ({"optimiser": {}}, r"unknown config section 'optimiser'; known sections: data, augment"),
        ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a finite number, got 'fast'"),
        ({"optim": {"epochs": 1.5}}, r"optim\.epochs: expected an integer"),
        ({"optim": {"epochs": True}}, r"optim\.epochs: expected an integer"),
        ({"train": {"amp": "yes"}}, r"train\.amp: expected true or false"),
        ({"optim": {"lr": 0}}, r"optim\.lr: 0\.0 is out of range \(must be > 0"),
        ({"augment": {"hflip": 1.5}}, r"augment\.hflip: 1\.5 is out of range \(must be <= 1"),
        (
            {"optim": {"optimizer": "rmsprop"}},
            r"optim\.optimizer: 'rmsprop' is not one of 'adam', 'adamw', 'sgd'",
        ),
        ({"data": {"modality": "mri"}}, r"data\.modality: 'mri' is not one of"),
        ({"data": {"max_patients": 1}}, r"data\.max_patients: 1 is out of range"),
        ({"data": []}, r"config section 'data' must be a mapping"),
        (
            {"model": {"backbone_us": "resnet19"}},
            r"model\.backbone_us: unknown backbone 'resnet19'; known backbones: resnet18, resnet50",
        ),
        ({"model": {"fusion": "product"}}, r"model\.fusion: unknown fusion head 'product'.*sum"),
        (
            {"model": {"backbone_dm": "inception_v3"}, "data": {"size_dm": 64}},
            r"data\.size_dm: 64 px is below the minimum input size of inception_v3 \(75 px\)",
        ),
    ],
)
def test_each_invalid_value_is_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_sizes_are_checked_only_for_branches_in_use():
    cfg = from_dict(
        {
            "data": {"modality": "dm", "size_dm": 299, "size_us": 64},
            "model": {"backbone_us": "inception_v3"},
        }
    )
    assert cfg.branches == ("dm",)
    with pytest.raises(ConfigError, match="size_us"):
        cfg.with_overrides({"data.modality": "us"})


def test_lenient_only_where_yaml_and_search_libraries_need_it():
    cfg = from_dict({"optim": {"lr": "1e-3", "weight_decay": 0, "batch_size": np.int64(4)}})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.weight_decay, float)
    assert type(cfg.optim.batch_size) is int
    cfg = cfg.with_overrides({"optim.lr": np.float64(2e-4)})
    assert type(cfg.optim.lr) is float


def test_yaml_round_trip_and_stable_hash(tmp_path):
    cfg = Config().with_overrides({"optim.lr": 3e-4, "data.size_dm": 64, "model.fusion": "concat"})
    path = save_yaml(cfg, tmp_path / "config.yaml")
    again = load_yaml(path)
    assert again == cfg
    assert again.config_hash() == cfg.config_hash()
    assert dump_yaml(cfg).startswith(f"config_hash: {cfg.config_hash()}\n")
    # The hash is a pure function of the values, whatever the construction path.
    assert Config().config_hash() == Config.from_dict(Config().to_dict()).config_hash()
    assert cfg.config_hash() != Config().config_hash()
    assert len(cfg.config_hash()) == 64


def test_hash_is_stable_across_processes():
    code = "from breastfusion.config import Config; print(Config().config_hash())"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(root / "platform"), "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == Config().config_hash()


def test_saved_yaml_stores_paths_relative_to_its_folder_and_survives_a_move(tmp_path):
    """A study's config files must not name where the study was (``mv A B``)."""
    a = tmp_path / "A"
    (a / "data").mkdir(parents=True)
    cfg = Config().with_overrides(
        {
            "data.manifest": str(a / "data" / "manifest.csv"),
            "data.splits": str(a / "splits.json"),
            "data.cache_dir": str(a / "run" / "cache"),
        }
    )
    path = save_yaml(cfg, a / "run" / "fold0" / "config.yaml")
    text = path.read_text()
    assert str(a) not in text
    assert "manifest: ../../data/manifest.csv" in text
    assert load_yaml(path) == cfg
    b = tmp_path / "B"
    a.rename(b)
    moved = load_yaml(b / "run" / "fold0" / "config.yaml")
    assert moved.data.manifest == str(b / "data" / "manifest.csv")
    assert moved.data.cache_dir == str(b / "run" / "cache")
    # The fold-folder reader resolves the same way.
    fold = runs.FoldDir(b / "run" / "fold0", 0)
    assert fold.config()["data"]["splits"] == str(b / "splits.json")
    # Paths that are not paths stay as they are.
    assert (
        "pretrained: none"
        in save_yaml(
            cfg.with_overrides({"model.pretrained": "none"}), tmp_path / "c.yaml"
        ).read_text()
    )


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "cfg.yaml"
    path.write_text("data:\n  manifest: cohort/manifest.csv\n  splits: /abs/splits.json\n")
    cfg = load_yaml(path)
    assert cfg.data.manifest == str(tmp_path / "sub" / "cohort" / "manifest.csv")
    assert cfg.data.splits == "/abs/splits.json"


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.lr"):
        load_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: 1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(broken)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(tmp_path / "missing.yaml")


def test_dotted_overrides():
    base = Config()
    cfg = base.with_overrides({"optim.lr": 1e-3, "model.backbone_dm": "resnet50"})
    assert cfg.optim.lr == 1e-3 and cfg.model.backbone_dm == "resnet50"
    assert base.optim.lr == 1e-4  # the original is untouched
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.learning_rate'.*lr"):
        base.with_overrides({"optim.learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'.*section\.name"):
        base.with_overrides({"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"optim\.batch_size: 0 is out of range"):
        base.with_overrides({"optim.batch_size": 0})
