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

from breastfusion import runs
from breastfusion.config import Config
from breastfusion.errors import UserError
from breastfusion.evaluate.aggregate import aggregate, load_aggregate, table_frame
from breastfusion.evaluate.cli import aggregate_command
from breastfusion.evaluate.metrics import roc_auc
from breastfusion.io import dumps_json
from breastfusion.models.registry import backbone_params
from breastfusion.report.cv import write_markdown

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
    degenerate_column: bool = True,
) -> Path:
    """A search folder shaped like ``distributed.search`` writes it.

    Each trial spec: ``backbone`` (or ``backbone_dm``/``backbone_us`` for fusion), ``strength``
    (separation of the classes: higher = better AUC), ``noise`` (seed), optional ``size``,
    ``lr``, ``status`` (complete | stopped | error), ``logit`` (scores as log-odds, as platform
    folds write them, instead of probabilities), ``fold_factor`` / ``fold_shift`` ({fold:
    value}: that fold's scores multiplied / shifted, a fold model on another scale), ``degenerate_folds`` (folds whose
    metrics.json says degenerate) and ``csv_degenerate`` (only trials.csv says so).
    With ``degenerate_column=False`` trials.csv has no ``degenerate`` column (older searches).
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
            z = z * spec.get("fold_factor", {}).get(k, 1.0) + spec.get("fold_shift", {}).get(k, 0.0)
            s = z if spec.get("logit") else 1 / (1 + np.exp(-z))
            pred = pd.DataFrame({"patient_id": ids, "y_true": y, "y_score": s})
            d = out / "trials" / trial / f"fold{k}"
            d.mkdir(parents=True)
            pred.to_csv(d / "predictions.csv", index=False)
            aucs[k] = roc_auc(y, s)
            fold_metrics: dict[str, Any] = {"auc": aucs[k]}
            if spec.get("logit"):
                fold_metrics["threshold"] = 0.0
            if k in spec.get("degenerate_folds", ()):
                fold_metrics.update(degenerate=True, degenerate_reason="2 distinct score(s)")
            (d / "metrics.json").write_text(json.dumps(fold_metrics))
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
        bad = list(spec.get("degenerate_folds", ()))
        if degenerate_column:
            row["degenerate"] = bool(bad) or bool(spec.get("csv_degenerate"))
            row["degenerate_folds"] = ";".join(map(str, bad))
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


def _fold_oof(search: Path, trial: str) -> pd.DataFrame:
    return runs.TrialDir(search / "trials" / trial).oof(FOLDS)


def _pair_weighted(oof: pd.DataFrame) -> float:
    """The fold AUCs weighted by their malignant × benign pairs."""
    num = den = 0.0
    for _, g in oof.groupby("fold"):
        pairs = int(g["y_true"].sum()) * int((1 - g["y_true"]).sum())
        num += pairs * roc_auc(g["y_true"], g["y_score"])
        den += pairs
    return num / den


def test_tables_best_and_files(searches: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "agg"
    res = aggregate(searches, out, n_boot=300, seed=1)
    write_markdown(res, out)

    path = out / "tables" / "table1_dm_backbones.csv"
    assert path.read_text() == runs.csv_text(table_frame(res, "table1_dm_backbones"))
    t1 = pd.read_csv(path, dtype={"trial": str})
    # Rows follow the study's backbone order, whatever order the trials ran in.
    assert list(t1["model"]) == ["ResNet-18", "ResNet-50", "VGG16"]
    r18 = t1.set_index("model").loc["ResNet-18"]
    trials = pd.read_csv(searches[0] / "trials.csv").set_index("trial")
    # Full precision: the numbers are the search's numbers, bit for bit.
    assert r18["mean_auc"] == trials.loc[r18["trial"], "mean_auc"]
    assert r18["std_auc"] == trials.loc[r18["trial"], "std_auc"]
    assert r18["n_patients"] == len(FOLDS) * N_PER_FOLD
    oof = _fold_oof(searches[0], r18["trial"])
    # Headline: the fold-stratified AUC = the pair-weighted fold AUCs; the pooled OOF AUC is
    # the AUC of all folds' predictions together (secondary).
    assert r18["stratified_auc"] == pytest.approx(_pair_weighted(oof), abs=1e-12)
    assert r18["pooled_auc"] == pytest.approx(roc_auc(oof["y_true"], oof["y_score"]), abs=1e-12)
    assert r18["threshold"] == 0.5 and r18["score_scale"] == "probability"
    for _, row in pd.concat([t1, table_frame(res, "table2_us_backbones")]).iterrows():
        for k in ("stratified_auc", "pooled_auc"):
            assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"]
            assert row[f"{k}_ci_low"] < row[f"{k}_ci_high"]
        for k in ("sensitivity", "specificity", "precision", "accuracy"):
            assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"]

    # A stopped trial never enters a table, even with the best partial score.
    t2 = table_frame(res, "table2_us_backbones")
    assert list(t2["model"]) == ["ResNet-18", "GoogLeNet"]

    t3 = table_frame(res, "table3_modalities")
    assert list(t3["model"]) == ["DM only", "US only", "DM+US"]
    assert t3.set_index("model").loc["DM only", "backbone"] == "resnet18"
    assert t3.set_index("model").loc["DM+US", "trial"].startswith("t0001_")
    assert len(res.comparisons) == 3
    assert all(0 <= c.p_value <= 1 for c in res.comparisons)
    assert all(c.method.startswith("stratified paired DeLong") for c in res.comparisons)
    assert all(c.n_patients == len(FOLDS) * N_PER_FOLD and c.n_folds == 3 for c in res.comparisons)

    best = json.loads((out / "best_config.json").read_text())
    assert best["search"] == "fusion" and best["trial"].startswith("t0001_")
    assert "highest mean patient-level validation AUC" in best["rule"]
    assert "fewest backbone parameters" in best["rule"]
    assert "not degenerate" in best["rule"]
    # The full resolved config, not just the searched values.
    assert best["config"]["data"]["modality"] == "fusion"
    assert best["config"]["optim"]["lr"] == pytest.approx(1e-4)
    assert best["config"]["optim"]["epochs"] == 3
    assert "batch_size" in best["config"]["optim"]
    assert best["config_source"] == "fold config.yaml"
    assert best["score"]["value"] == res.best_by_modality["fusion"]["score"]["value"]
    strat = best["cv"]["stratified_auc"]
    assert strat["ci_low"] <= strat["value"] <= strat["ci_high"] and "se" in strat

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
    assert "| ResNet-18 |" in md and " ± " in md and "fold-stratified AUC" in md
    summary = (out / "summary.md").read_text()
    assert "**Rule**" in summary and "Table 3" in summary
    assert "conditional on the fold models" in summary
    oof_best = pd.read_csv(out / "oof_best.csv")
    assert sorted(oof_best["model"].unique()) == ["DM only", "DM+US", "US only"]
    assert list(oof_best.columns) == ["model", "fold", "patient_id", "y_true", "y_score"]
    all_trials = pd.read_csv(out / "tables" / "trials.csv")
    assert len(all_trials) == 9
    assert set(all_trials["status"]) == {"complete", "stopped", "error"}
    loaded = load_aggregate(out)
    assert loaded.best["trial"] == best["trial"]
    assert loaded.rule == res.rule
    # aggregate.json reads back to the same typed result.
    assert dumps_json(loaded.to_dict()) == dumps_json(res.to_dict())
    assert loaded.files["aggregate.json"] == "aggregate.json"


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
    assert backbone_params("resnet18") < backbone_params("resnet50")
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
    with pytest.raises(UserError, match="aggregate.best_from must be one of dm, us, fusion"):
        aggregate(searches, tmp_path / "o2", n_boot=100, best_from="ct")


def test_without_config_yaml_or_oof_file(tmp_path: Path) -> None:
    # An older search: no fold config.yaml, no oof file, no degenerate column in trials.csv.
    search = make_search(
        tmp_path,
        "old",
        "us",
        [{"backbone": "vgg16", "strength": 2.0}],
        write_config=False,
        write_oof=False,
        degenerate_column=False,
    )
    res = aggregate([search], tmp_path / "out", n_boot=100)
    assert res.best["config_source"].startswith("reconstructed")
    assert res.best["config"]["model"]["backbone_us"] == "vgg16"
    assert res.best["config"]["data"]["modality"] == "us"
    assert res.best["cv"]["n_patients"] == len(FOLDS) * N_PER_FOLD
    assert all(t.degenerate is None for t in res.trials)


def test_degenerate_trials_are_marked_and_never_chosen(tmp_path: Path) -> None:
    search = make_search(
        tmp_path,
        "deg",
        "dm",
        [
            {"backbone": "resnet18", "strength": 5.0, "degenerate_folds": [1]},
            {"backbone": "resnet50", "strength": 4.0, "csv_degenerate": True},
            {"backbone": "vgg16", "strength": 1.0},
        ],
    )
    out = tmp_path / "out"
    res = aggregate([search], out, n_boot=100)
    assert res.best["backbone"] == "vgg16"  # the two stronger trials are degenerate
    by_backbone = {t.backbone: t for t in res.trials}
    assert by_backbone["resnet18"].degenerate == "fold 1: 2 distinct score(s)"
    assert by_backbone["resnet18"].degenerate_folds == (1,)
    assert by_backbone["resnet50"].degenerate == "marked degenerate in trials.csv"
    t1 = pd.read_csv(out / "tables" / "table1_dm_backbones.csv")
    row = t1.set_index("model").loc["ResNet-18"]
    assert row["degenerate"] and math.isnan(row["mean_auc"]) and math.isnan(row["stratified_auc"])
    write_markdown(res, out)
    md = (out / "tables" / "table1_dm_backbones.md").read_text()
    assert "degenerate (fold 1: 2 distinct score(s))" in md
    t3 = table_frame(res, "table3_modalities")
    assert t3.loc[0, "backbone"] == "vgg16"
    # All degenerate: nothing to choose, and the error says why.
    only = make_search(tmp_path, "alldeg", "us", [{"backbone": "resnet18", "strength": 2.0,
                                                   "degenerate_folds": [0, 2]}])  # fmt: skip
    with pytest.raises(UserError, match=r"no eligible trial .*degenerate .*fold 0: 2 distinct"):
        aggregate([only], tmp_path / "o2", n_boot=100)


def test_fold_scale_artefact(tmp_path: Path) -> None:
    """A fold model on another scale (fold 1's log-odds ×1e6 and shifted) sinks the pooled OOF
    AUC; the headline fold-stratified AUC and the Table 3 comparison do not move."""
    spec = {"backbone": "resnet18", "strength": 2.5, "noise": 3, "logit": True}
    plain = make_search(tmp_path, "plain", "dm", [spec])
    scaled = make_search(
        tmp_path, "scaled", "us", [{**spec, "fold_factor": {1: 1e6}, "fold_shift": {1: 4e6}}]
    )
    res = aggregate([plain, scaled], tmp_path / "o", n_boot=200)
    a, b = (res.trial(r.trial).cv for r in res.tables["table3_modalities"])
    assert a.score_scale == b.score_scale == "logit"
    assert a.threshold == 0.0 and "recorded" in a.threshold_source
    assert b.stratified_auc.value == pytest.approx(a.stratified_auc.value, abs=1e-12)
    assert b.pooled_auc.value < a.pooled_auc.value - 0.05
    assert b.pooled_auc.value < b.stratified_auc.ci_low
    (c,) = res.comparisons
    assert c.difference == pytest.approx(0.0, abs=1e-12) and c.p_value == 1.0


def test_within_fold_concordance_uses_the_raw_ranking() -> None:
    """A fold whose calibrated scores are constant (Platt slope 0) keeps its raw ranking in the
    headline fold-stratified AUC and the paired test; only pooled figures use calibrated ones."""
    from breastfusion.evaluate.cv import ranking_scores

    oof = pd.DataFrame(
        {
            "fold": [0, 0, 0, 0, 1, 1, 1, 1],
            "y_true": [0, 0, 1, 1, 0, 0, 1, 1],
            "y_score": [-1.0, -0.5, 0.5, 1.0, -0.3, -0.3, -0.3, -0.3],
            "y_score_raw": [-1.0, -0.5, 0.5, 1.0, 2.0, 1.0, -1.0, -2.0],
        }
    )
    assert list(ranking_scores(oof)) == list(oof["y_score_raw"])
    assert list(ranking_scores(oof.drop(columns="y_score_raw"))) == list(oof["y_score"])
    merged = oof.add_suffix("_a")
    assert list(ranking_scores(merged, "_a")) == list(oof["y_score_raw"])


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
    with pytest.raises(UserError, match=r"experiment.json: cannot read the search description"):
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
    with pytest.raises(UserError, match="aggregate.bootstrap must be at least 100"):
        aggregate(searches, tmp_path / "o", n_boot=10)
    with pytest.raises(UserError, match="aggregate.threshold must be a finite number"):
        aggregate(searches, tmp_path / "o", threshold=math.nan)
    with pytest.raises(UserError, match=r"aggregate.tie_tolerance must be in \[0, 0.5\)"):
        aggregate(searches, tmp_path / "o", tie_tolerance=0.7)
    assert not (tmp_path / "o").exists()
    # A complete trial whose predictions vanished: name the trial.
    trial_dir = next((searches[0] / "trials").iterdir())
    for p in trial_dir.rglob("*.csv"):
        p.unlink()
    with pytest.raises(UserError, match=f"complete trial {trial_dir.name} has no fold predictions"):
        aggregate(searches, tmp_path / "o")


def test_bad_predictions_named(tmp_path: Path) -> None:
    search = make_search(tmp_path, "bad", "dm", [{"backbone": "resnet18", "strength": 2}])
    fold0 = next((search / "trials").iterdir()) / "fold0" / "predictions.csv"
    df = pd.read_csv(fold0)
    df["y_score"] = df["y_score"].astype(object)
    df.loc[3, "y_score"] = "abc"
    df.to_csv(fold0, index=False)
    with pytest.raises(UserError, match=r"fold0/predictions.csv: invalid predictions") as exc:
        aggregate([search], tmp_path / "o")
    assert "not a number at line 5" in str(exc.value)


def test_different_splits_warn(tmp_path: Path) -> None:
    a = make_search(tmp_path, "a", "dm", [{"backbone": "resnet18", "strength": 2}])
    b = make_search(tmp_path, "b", "us", [{"backbone": "resnet18", "strength": 2}])
    exp = json.loads((b / "experiment.json").read_text())
    exp["splits_sha256"] = "x" * 64
    (b / "experiment.json").write_text(json.dumps(exp))
    res = aggregate([a, b], tmp_path / "o", n_boot=100)
    assert any("different splits" in w for w in res.warnings)
    write_markdown(res, tmp_path / "o")
    assert "different splits" in (tmp_path / "o" / "summary.md").read_text()


def test_command(searches: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        aggregate_command, [*map(str, searches), "--out", str(out), "--bootstrap", "200"]
    )
    assert result.exit_code == 0, result.output
    assert "best: fusion/t0001_" in result.output
    assert "| DM+US |" in result.output
    assert (out / "best_config.json").exists() and (out / "summary.md").exists()
    bad = CliRunner().invoke(aggregate_command, [str(tmp_path), "--out", str(out)])
    assert isinstance(bad.exception, UserError)
    flag = CliRunner().invoke(
        aggregate_command, [*map(str, searches), "--out", str(out), "--bootstrap", "5"]
    )
    assert "--bootstrap must be at least 100" in str(flag.exception)


def test_through_the_cli_main(
    searches: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Registered as `breastfusion aggregate`, a bad folder is one clean error line, exit 2."""
    from breastfusion import cli

    monkeypatch.setitem(
        cli.COMMANDS, "aggregate", ("breastfusion.evaluate.cli:aggregate_command", "")
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
