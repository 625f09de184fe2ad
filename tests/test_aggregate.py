"""Aggregation of (fake) search folders into the study's tables and a best configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from breastfusion.config import Config
from breastfusion.errors import UserError
from breastfusion.evaluate.aggregate import (
    BACKBONE_PARAMS,
    aggregate,
    aggregate_command,
    load_aggregate,
)
from breastfusion.evaluate.metrics import roc_auc

FOLDS = (0, 1, 2)
N_PER_FOLD = 30  # 10 malignant, 20 benign per fold


def _patients(fold: int) -> tuple[list[str], np.ndarray]:
    ids = [f"p{fold}{i:02d}" for i in range(N_PER_FOLD)]
    y = np.array([1 if i % 3 == 0 else 0 for i in range(N_PER_FOLD)])
    return ids, y


def make_search(
    root: Path,
    name: str,
    modality: str,
    trials: list[dict[str, Any]],
    *,
    folds: tuple[int, ...] = FOLDS,
    write_config: bool = True,
    write_oof: bool = True,
) -> Path:
    """A search folder shaped like ``distributed.search`` writes it.

    Each trial spec: ``backbone`` (or ``backbone_dm``/``backbone_us`` for fusion), ``strength``
    (separation of the classes: higher = better AUC), ``noise`` (seed), optional ``size``,
    ``lr``, ``status`` (complete | stopped | error).
    """
    out = root / name
    (out / "trials").mkdir(parents=True)
    key = {"dm": "model.backbone_dm", "us": "model.backbone_us"}.get(modality)
    fixed = {"data.modality": modality, "optim.epochs": 3}
    rows = []
    for i, spec in enumerate(trials):
        searched: dict[str, Any] = {}
        if modality == "fusion":
            searched["model.backbone_dm"] = spec.get("backbone_dm", "resnet18")
            searched["model.backbone_us"] = spec.get("backbone_us", "resnet18")
            searched["optim.lr"] = spec.get("lr", 1e-4)
        else:
            searched[key] = spec["backbone"]
        if "size" in spec:
            searched[f"data.size_{'dm' if modality != 'us' else 'us'}"] = spec["size"]
        trial = f"t{i:04d}_" + "_".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in searched.items())
        status = spec.get("status", "complete")
        done = list(folds) if status == "complete" else list(folds[:1])
        rng = np.random.default_rng(spec.get("noise", i))
        cfg = Config().with_overrides({**fixed, **searched})
        row: dict[str, Any] = {"trial": trial}
        row.update({f"config.{k}": v for k, v in searched.items()})
        aucs = {}
        oof = []
        for k in done:
            ids, y = _patients(k)
            z = spec["strength"] * (y - 0.5) + rng.normal(0, 1, len(y))
            s = 1 / (1 + np.exp(-z))
            pred = pd.DataFrame({"patient_id": ids, "y_true": y, "y_score": s})
            d = out / "trials" / trial / f"fold{k}"
            d.mkdir(parents=True)
            pred.to_csv(d / "predictions.csv", index=False)
            aucs[k] = roc_auc(y, s)
            (d / "metrics.json").write_text(json.dumps({"auc": aucs[k]}))
            if write_config:
                fold_cfg = cfg.with_overrides({"data.fold": k})
                doc = {"config_hash": fold_cfg.config_hash(), **fold_cfg.to_dict()}
                (d / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
            oof.append(pred.assign(fold=k)[["fold", "patient_id", "y_true", "y_score"]])
        if write_oof and oof:
            pd.concat(oof).to_csv(out / "trials" / trial / "oof_predictions.csv", index=False)
        for k in folds:
            row[f"fold{k}_auc"] = aucs.get(k, math.nan)
        complete = status == "complete"
        vals = list(aucs.values())
        row["mean_auc"] = float(np.mean(vals)) if complete else math.nan
        row["std_auc"] = float(np.std(vals, ddof=1)) if complete else math.nan
        row["folds_done"] = len(vals)
        row["status"] = status
        rows.append(row)
    pd.DataFrame(rows).to_csv(out / "trials.csv", index=False)
    experiment = {
        "space": {"name": name, "fixed": fixed},
        "space_name": name,
        "debug": False,
        "folds": list(folds),
        "manifest_sha256": "m" * 64,
        "splits_sha256": "s" * 64,
        "fingerprint": name,
    }
    (out / "experiment.json").write_text(json.dumps(experiment))
    (out / "best.json").write_text(json.dumps({"metric": "x"}))
    return out


def make_study_searches(root: Path) -> list[Path]:
    """DM backbones, US backbones, and a fusion search; the fusion one is the strongest."""
    dm = make_search(
        root,
        "backbones_dm",
        "dm",
        [
            {"backbone": "resnet50", "strength": 1.0},
            {"backbone": "resnet18", "strength": 3.0},
            {"backbone": "vgg16", "strength": 2.0},
        ],
    )
    us = make_search(
        root,
        "backbones_us",
        "us",
        [
            {"backbone": "googlenet", "strength": 1.5},
            {"backbone": "resnet18", "strength": 3.2},
            {"backbone": "resnet50", "strength": 4.0, "status": "stopped"},
        ],
    )
    fusion = make_search(
        root,
        "fusion",
        "fusion",
        [
            {"lr": 1e-3, "strength": 2.0},
            {"lr": 1e-4, "strength": 5.0},
            {"lr": 3e-4, "strength": 0.5, "status": "error"},
        ],
    )
    return [dm, us, fusion]


@pytest.fixture
def searches(tmp_path: Path) -> list[Path]:
    return make_study_searches(tmp_path / "runs")


def test_tables_best_and_files(searches: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "agg"
    res = aggregate(searches, out, n_boot=300, seed=1)

    t1 = res.tables["table1_dm_backbones"]
    # Rows follow the study's backbone order, whatever order the trials ran in.
    assert list(t1["model"]) == ["ResNet-18", "ResNet-50", "VGG16"]
    r18 = t1.set_index("model").loc["ResNet-18"]
    trials = pd.read_csv(searches[0] / "trials.csv").set_index("trial")
    assert r18["mean_auc"] == pytest.approx(trials.loc[r18["trial"], "mean_auc"])
    assert r18["std_auc"] == pytest.approx(trials.loc[r18["trial"], "std_auc"])
    assert r18["n_patients"] == len(FOLDS) * N_PER_FOLD
    # The pooled OOF AUC is the AUC of all folds' predictions together, inside its CI.
    oof = pd.read_csv(searches[0] / "trials" / r18["trial"] / "oof_predictions.csv")
    assert r18["pooled_auc"] == pytest.approx(roc_auc(oof["y_true"], oof["y_score"]), abs=1e-9)
    for _, row in pd.concat([t1, res.tables["table2_us_backbones"]]).iterrows():
        assert row["pooled_auc_ci_low"] <= row["pooled_auc"] <= row["pooled_auc_ci_high"]
        assert row["pooled_auc_ci_low"] < row["pooled_auc_ci_high"]
        for k in ("sensitivity", "specificity", "precision", "accuracy"):
            assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"]

    # A stopped trial never enters a table, even with the best partial score.
    t2 = res.tables["table2_us_backbones"]
    assert list(t2["model"]) == ["ResNet-18", "GoogLeNet"]

    t3 = res.tables["table3_modalities"]
    assert list(t3["model"]) == ["DM only", "US only", "DM+US"]
    assert t3.set_index("model").loc["DM only", "backbone"] == "resnet18"
    assert t3.set_index("model").loc["DM+US", "trial"].startswith("t0001_")
    assert len(res.comparisons) == 3
    assert all(0 <= c["p_value"] <= 1 for c in res.comparisons)

    best = json.loads((out / "best_config.json").read_text())
    assert best["search"] == "fusion" and best["trial"].startswith("t0001_")
    assert "highest mean patient-level validation AUC" in best["rule"]
    assert "fewest backbone parameters" in best["rule"]
    # The full resolved config, not just the searched values.
    assert best["config"]["data"]["modality"] == "fusion"
    assert best["config"]["optim"]["lr"] == pytest.approx(1e-4)
    assert best["config"]["optim"]["epochs"] == 3
    assert "batch_size" in best["config"]["optim"]
    assert best["config_source"] == "fold config.yaml"
    assert best["score"]["value"] == pytest.approx(res.best_by_modality["fusion"]["score"]["value"])

    for name in (
        "table1_dm_backbones",
        "table2_us_backbones",
        "table3_modalities",
        "table3_comparisons",
        "fusion_backbones",
        "trials",
    ):
        assert (out / "tables" / f"{name}.csv").exists()
        assert (out / "tables" / f"{name}.md").read_text().startswith("## ")
    md = (out / "tables" / "table1_dm_backbones.md").read_text()
    assert "| ResNet-18 |" in md and " ± " in md
    summary = (out / "summary.md").read_text()
    assert "**Rule**" in summary and "Table 3" in summary
    oof_best = pd.read_csv(out / "oof_best.csv")
    assert sorted(oof_best["model"].unique()) == ["DM only", "DM+US", "US only"]
    all_trials = pd.read_csv(out / "tables" / "trials.csv")
    assert len(all_trials) == 9
    assert set(all_trials["status"]) == {"complete", "stopped", "error"}
    loaded = load_aggregate(out)
    assert loaded["best"]["trial"] == best["trial"]
    assert loaded["rule"] == res.rule


def test_seeded_and_byte_stable(searches: list[Path], tmp_path: Path) -> None:
    aggregate(searches, tmp_path / "a", n_boot=200, seed=3)
    aggregate(searches, tmp_path / "b", n_boot=200, seed=3)
    a = (tmp_path / "a" / "aggregate.json").read_text()
    b = (tmp_path / "b" / "aggregate.json").read_text()
    assert a == b
    aggregate(searches, tmp_path / "c", n_boot=200, seed=4)
    assert (tmp_path / "c" / "aggregate.json").read_text() != a


def test_tie_goes_to_fewer_parameters_then_smaller_input(tmp_path: Path) -> None:
    # Same noise seed and strength → identical predictions and identical mean AUCs.
    search = make_search(
        tmp_path,
        "ties",
        "dm",
        [
            {"backbone": "resnet50", "strength": 2.0, "noise": 7, "size": 64},
            {"backbone": "resnet18", "strength": 2.0, "noise": 7, "size": 128},
            {"backbone": "resnet18", "strength": 2.0, "noise": 7, "size": 64},
        ],
    )
    assert BACKBONE_PARAMS["resnet18"] < BACKBONE_PARAMS["resnet50"]
    res = aggregate([search], tmp_path / "out", n_boot=100)
    assert res.best["backbone"] == "resnet18"
    assert res.best["trial"].startswith("t0002_")  # resnet18 at 64 px beats 128 px
    # A tolerance of 0 still ties exactly equal scores.
    res0 = aggregate([search], tmp_path / "out0", n_boot=100, tie_tolerance=0.0)
    assert res0.best["trial"].startswith("t0002_")


def test_tie_tolerance_is_a_band(tmp_path: Path) -> None:
    search = make_search(
        tmp_path,
        "band",
        "dm",
        [
            {"backbone": "resnet50", "strength": 3.0, "noise": 1},
            {"backbone": "googlenet", "strength": 2.6, "noise": 1},
        ],
    )
    trials = pd.read_csv(search / "trials.csv")
    gap = trials["mean_auc"][0] - trials["mean_auc"][1]
    assert gap > 0
    strict = aggregate([search], tmp_path / "s", n_boot=100, tie_tolerance=0.0)
    assert strict.best["backbone"] == "resnet50"
    loose = aggregate([search], tmp_path / "l", n_boot=100, tie_tolerance=gap + 1e-6)
    assert loose.best["backbone"] == "googlenet"  # inside the band, fewer parameters wins
    assert f"within {gap + 1e-6:g} AUC" in loose.rule


def test_best_from_one_modality(searches: list[Path], tmp_path: Path) -> None:
    res = aggregate(searches, tmp_path / "o", n_boot=100, best_from="us")
    assert res.best["modality"] == "us" and res.best["backbone"] == "resnet18"
    assert "US only" in res.best["selected_from"]
    with pytest.raises(UserError, match="--best-from"):
        aggregate(searches, tmp_path / "o2", n_boot=100, best_from="ct")


def test_without_config_yaml_or_oof_file(tmp_path: Path) -> None:
    # An older search: no fold config.yaml, no oof_predictions.csv — both are rebuilt.
    search = make_search(
        tmp_path,
        "old",
        "us",
        [{"backbone": "vgg16", "strength": 2.0}],
        write_config=False,
        write_oof=False,
    )
    res = aggregate([search], tmp_path / "out", n_boot=100)
    assert res.best["config_source"].startswith("reconstructed")
    assert res.best["config"]["model"]["backbone_us"] == "vgg16"
    assert res.best["config"]["data"]["modality"] == "us"
    assert res.best["pooled_oof"]["n_patients"] == len(FOLDS) * N_PER_FOLD


def test_not_a_search_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is not a breastfusion search folder"):
        aggregate([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(UserError, match="no such folder"):
        aggregate([tmp_path / "missing"], tmp_path / "out")
    half = tmp_path / "half"
    half.mkdir()
    (half / "experiment.json").write_text("{}")
    with pytest.raises(UserError, match=r"half: no trials.csv"):
        aggregate([half], tmp_path / "out")
    (half / "experiment.json").write_text("not json")
    with pytest.raises(UserError, match=r"experiment.json: cannot read as JSON"):
        aggregate([half], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_complete_trial(tmp_path: Path) -> None:
    search = make_search(
        tmp_path,
        "stopped",
        "dm",
        [
            {"backbone": "resnet18", "strength": 2, "status": "stopped"},
            {"backbone": "vgg16", "strength": 2, "status": "error"},
        ],
    )
    with pytest.raises(UserError, match=r"stopped: no complete trial .*1 error, 1 stopped"):
        aggregate([search], tmp_path / "out")


def test_bad_inputs(searches: list[Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="given twice"):
        aggregate([searches[0], searches[0]], tmp_path / "o")
    with pytest.raises(UserError, match="at least one search"):
        aggregate([], tmp_path / "o")
    with pytest.raises(UserError, match="--bootstrap"):
        aggregate(searches, tmp_path / "o", n_boot=10)
    with pytest.raises(UserError, match="--threshold"):
        aggregate(searches, tmp_path / "o", threshold=1.5)
    # A complete trial whose predictions vanished: name the trial.
    trial_dir = next((searches[0] / "trials").iterdir())
    for p in trial_dir.rglob("*.csv"):
        p.unlink()
    with pytest.raises(UserError, match=f"complete trial {trial_dir.name} has no oof"):
        aggregate(searches, tmp_path / "o")


def test_bad_predictions_named(tmp_path: Path) -> None:
    search = make_search(tmp_path, "bad", "dm", [{"backbone": "resnet18", "strength": 2}])
    oof = next((search / "trials").iterdir()) / "oof_predictions.csv"
    df = pd.read_csv(oof)
    df.loc[3, "y_score"] = 1.7
    df.to_csv(oof, index=False)
    with pytest.raises(UserError, match=r"oof_predictions.csv: invalid predictions") as exc:
        aggregate([search], tmp_path / "o")
    assert "outside [0, 1] at line 5" in str(exc.value)


def test_different_splits_warn(tmp_path: Path) -> None:
    a = make_search(tmp_path, "a", "dm", [{"backbone": "resnet18", "strength": 2}])
    b = make_search(tmp_path, "b", "us", [{"backbone": "resnet18", "strength": 2}])
    exp = json.loads((b / "experiment.json").read_text())
    exp["splits_sha256"] = "x" * 64
    (b / "experiment.json").write_text(json.dumps(exp))
    res = aggregate([a, b], tmp_path / "o", n_boot=100)
    assert any("different splits" in w for w in res.warnings)
    assert "different splits" in (tmp_path / "o" / "summary.md").read_text()


def test_command(searches: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        aggregate_command, [*map(str, searches), "--out", str(out), "--bootstrap", "200"]
    )
    assert result.exit_code == 0, result.output
    assert "best: fusion/t0001_" in result.output
    assert "| DM+US |" in result.output
    assert (out / "best_config.json").exists()
    bad = CliRunner().invoke(aggregate_command, [str(tmp_path), "--out", str(out)])
    assert isinstance(bad.exception, UserError)


def test_through_the_cli_main(
    searches: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Registered as `breastfusion aggregate`, a bad folder is one clean error line, exit 2."""
    from breastfusion import cli

    monkeypatch.setitem(
        cli.COMMANDS, "aggregate", ("breastfusion.evaluate.aggregate:aggregate_command", "")
    )
    assert cli.main(["aggregate", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a breastfusion search folder" in err
    assert "Traceback" not in err
    out = tmp_path / "ok"
    assert (
        cli.main(["aggregate", *map(str, searches), "--out", str(out), "--bootstrap", "100"]) == 0
    )
    assert (out / "aggregate.json").exists()
