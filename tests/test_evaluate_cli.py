"""`breastfusion evaluate`: outputs, operating point, and every bad input named clearly."""

from __future__ import annotations

import json

import click
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from breastfusion.cli import main
from breastfusion.errors import UserError
from breastfusion.evaluate import stats as S
from breastfusion.evaluate.calibration import sigmoid
from breastfusion.evaluate.cli import evaluate_command
from breastfusion.evaluate.holdout import evaluate_predictions


def predictions(n=120, seed=0, models=("dm", "us", "fusion"), prefix="T", rows_per_patient=2):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    rows = []
    for i in range(n):
        for k, model in enumerate(models):
            for _ in range(rows_per_patient):
                z = rng.normal((1.0 + k * 0.5) * y[i], 1.0)
                rows.append((model, f"{prefix}{i:03d}", int(y[i]), 1 / (1 + np.exp(-(z - 0.8)))))
    return pd.DataFrame(rows, columns=["model", "patient_id", "y_true", "y_score"])


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def _main_command(args):
    raise SystemExit(main(["evaluate", *args]))


def run(args):
    """Through cli.main, as a user would: a UserError becomes 'error: ...' and exit 2."""
    return CliRunner().invoke(_main_command, args)


@pytest.fixture
def files(tmp_path):
    test = tmp_path / "test.csv"
    val = tmp_path / "val.csv"
    predictions(seed=0).to_csv(test, index=False)
    predictions(n=80, seed=1, prefix="V").to_csv(val, index=False)
    return tmp_path, test, val


def test_outputs(files):
    tmp, test, _ = files
    out = tmp / "out"
    r = CliRunner().invoke(evaluate_command, [str(test), "--out", str(out), "--bootstrap", "300"])
    assert r.exit_code == 0, r.output
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["models"]) == {"dm", "us", "fusion"}
    df = predictions(seed=0)
    per_patient = df.groupby(["model", "patient_id"]).agg(
        y=("y_true", "first"), s=("y_score", "mean")
    )
    for name, e in data["models"].items():
        p = per_patient.loc[name]
        assert e["n_patients"] == 120 and e["n_malignant"] == int(p["y"].sum())
        assert e["threshold"] == 0.5
        assert e["auc"]["value"] == pytest.approx(roc_auc_score(p["y"], p["s"]), abs=1e-6)
        for key in (
            "auc",
            "auc_delong",
            "sensitivity",
            "specificity",
            "precision",
            "accuracy",
            "brier",
        ):
            assert set(e[key]) >= {"value", "ci_low", "ci_high"}
            assert e[key]["ci_low"] <= e[key]["value"] <= e[key]["ci_high"]
        assert e["auc"]["method"] == "bootstrap"
    assert len(data["comparisons"]) == 3
    for c in data["comparisons"]:
        assert set(c) >= {"a", "b", "n_patients", "auc_a", "auc_b", "p_value"}
        assert 0 <= c["p_value"] <= 1
    assert "Wilson" in data["method"]["sensitivity"] and "bootstrap" in data["method"]["auc"]
    md = (out / "metrics.md").read_text()
    assert "| fusion |" in md and "DeLong" in md
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Same inputs, same bytes.
    first = (out / "metrics.json").read_bytes()
    CliRunner().invoke(evaluate_command, [str(test), "--out", str(out), "--bootstrap", "300"])
    assert (out / "metrics.json").read_bytes() == first


def test_operating_point(files):
    tmp, test, val = files
    out = tmp / "op"
    args = [str(test), "--out", str(out), "--bootstrap", "200"]
    args += ["--target-sensitivity", "0.9", "--threshold-from", str(val)]
    r = CliRunner().invoke(evaluate_command, args)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "metrics.json").read_text())
    for e in data["models"].values():
        op = e["operating_point"]
        assert op["validation"]["sensitivity"]["value"] >= 0.9
        assert op["threshold"] == e["threshold"]
        assert op["test"]["sensitivity"] == e["sensitivity"]
        assert "val.csv" in e["threshold_source"]
    assert "Operating point" in (out / "metrics.md").read_text()


def test_models_compared_on_shared_patients():
    df = predictions(seed=2)
    df = df[~((df.model == "dm") & (df.patient_id == "T005"))]
    result, scores = evaluate_predictions(df, n_boot=200)
    assert result["n_patients_shared"] == 119
    assert all(e["n_patients"] == 119 for e in result["models"].values())
    # dm lacks T005, so fusion's and us's T005 rows are the ones left out.
    assert result["warnings"] == [
        f"model {m}: 1 of 120 patients not scored by every model are left out"
        for m in ("fusion", "us")
    ]
    assert "T005" not in set(scores["patient_id"])


def _write(tmp_path, df, name="p.csv"):
    path = tmp_path / name
    df.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.assign(y_true=0), "has no malignant patient among its"),
        (lambda d: d.drop(columns="y_score"), "missing column(s) y_score"),
        (
            lambda d: d.assign(y_score=d.y_score.where(d.index != 3, np.inf)),
            "y_score is infinite at line 5",
        ),
        (
            lambda d: d.assign(y_score=d.y_score.where(d.index != 0, np.nan)),
            "NaN or not a number at line 2",
        ),
        (
            lambda d: d.assign(y_true=np.where(d.index == 1, 1 - d.y_true, d.y_true)),
            "with two labels (y_true 0 and 1): patient T000 (model dm)",
        ),
    ],
)
def test_bad_input(tmp_path, mutate, message):
    path = _write(tmp_path, mutate(predictions(n=30)))
    r = run([str(path), "--out", str(tmp_path / "o"), "--bootstrap", "100"])
    assert r.exit_code == 2
    assert "error: " in r.output and message in r.output
    assert str(path) in r.output
    assert "Traceback" not in r.output


def test_two_labels_across_models(tmp_path):
    df = predictions(n=30, models=("a", "b"))
    df.loc[(df.model == "b") & (df.patient_id == "T001"), "y_true"] = 0
    with pytest.raises(UserError, match="two labels across models: T001"):
        evaluate_predictions(df, n_boot=100)


def test_no_patients_in_common():
    a = predictions(n=20, models=("a",), prefix="A")
    b = predictions(n=20, models=("b",), prefix="B")
    with pytest.raises(UserError, match=r"no patients in common \(a: 20, b: 20 patients\)"):
        evaluate_predictions(pd.concat([a, b]), n_boot=100, source="p.csv")


@pytest.mark.parametrize("target", ["0", "1.5", "-0.2"])
def test_bad_target_sensitivity(files, target):
    tmp, test, val = files
    r = run(
        [
            str(test),
            "--out",
            str(tmp / "o"),
            "--target-sensitivity",
            target,
            "--threshold-from",
            str(val),
        ]
    )
    assert r.exit_code == 2 and r"--target-sensitivity must be in (0, 1]" in r.output


def test_target_without_validation(files):
    tmp, test, _ = files
    r = run([str(test), "--out", str(tmp / "o"), "--target-sensitivity", "0.9"])
    assert r.exit_code == 2 and "--target-sensitivity needs --threshold-from" in r.output
    # The library names its settings keys, never a flag.
    with pytest.raises(UserError, match="^target_sensitivity needs validation predictions"):
        evaluate_predictions(predictions(n=20), target_sensitivity=0.9)
    with pytest.raises(UserError, match="^final.target_sensitivity needs validation"):
        evaluate_predictions(predictions(n=20), target_sensitivity=0.9, prefix="final")
    with pytest.raises(UserError, match=r"^final.target_sensitivity must be in \(0, 1\]"):
        evaluate_predictions(predictions(n=20), target_sensitivity=2.0, prefix="final")
    with pytest.raises(UserError, match="^bootstrap must be at least 100"):
        evaluate_predictions(predictions(n=20), n_boot=10)


def test_validation_problems(files):
    tmp, test, _ = files
    val = _write(tmp, predictions(n=40, models=("dm",), prefix="V"), "val_dm.csv")
    r = run(
        [
            str(test),
            "--out",
            str(tmp / "o"),
            "--target-sensitivity",
            "0.9",
            "--threshold-from",
            str(val),
        ]
    )
    assert r.exit_code == 2 and f"{val}: no predictions for model fusion (it has: dm)" in r.output
    benign_only = _write(tmp, predictions(n=40, prefix="V").assign(y_true=0), "val_benign.csv")
    r = run(
        [
            str(test),
            "--out",
            str(tmp / "o"),
            "--target-sensitivity",
            "0.9",
            "--threshold-from",
            str(benign_only),
        ]
    )
    assert r.exit_code == 2 and "has no malignant patient among its 40 validation" in r.output


def test_overlap_between_validation_and_test_is_a_warning(files):
    tmp, test, _ = files
    r = CliRunner().invoke(
        evaluate_command,
        [
            str(test),
            "--out",
            str(tmp / "o"),
            "--bootstrap",
            "100",
            "--target-sensitivity",
            "0.8",
            "--threshold-from",
            str(test),
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((tmp / "o" / "metrics.json").read_text())
    assert any("both the validation and the test" in w for w in data["warnings"])


def test_missing_file_and_bad_options(tmp_path, files):
    _, test, _ = files
    r = run([str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope.csv: predictions file not found" in r.output
    r = run([str(test), "--out", str(tmp_path / "o"), "--bootstrap", "10"])
    assert r.exit_code == 2 and "--bootstrap must be at least 100" in r.output
    r = run([str(test), "--out", str(tmp_path / "o"), "--threshold", "nan"])
    assert r.exit_code == 2 and "--threshold must be a finite number" in r.output


def log_odds(n=120, seed=0, models=("dm", "fusion"), prefix="T", shift=0.0):
    """Predictions as platform models write them: calibrated log-odds, any real number."""
    df = predictions(n=n, seed=seed, models=models, prefix=prefix, rows_per_patient=1)
    p = df["y_score"].to_numpy()
    return df.assign(y_score=np.log(p) - np.log1p(-p) + shift)


def test_log_odds_scores(tmp_path):
    df = log_odds(shift=1.5)  # log-odds: many scores outside [0, 1]
    result, scores = evaluate_predictions(df, n_boot=200)
    assert result["settings"]["score_scale_used"] == "logit"
    e = result["models"]["fusion"]
    assert e["threshold"] == 0.0 and "default for logit" in e["threshold_source"]
    assert e["threshold_probability"] == 0.5
    g = scores[scores.model == "fusion"]
    y, s = g["y_true"].to_numpy(), g["y_score"].to_numpy()
    assert e["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # Brier and reliability on probabilities sigmoid(score); calibration slope on log-odds.
    assert e["brier"]["value"] == pytest.approx(np.mean((sigmoid(s) - y) ** 2), abs=1e-12)
    assert max(e["reliability"]["mean_predicted"]) <= 1.0
    assert 0 < e["calibration"]["slope"] and e["calibration"]["intercept"] < 0  # shifted up
    assert "log-odds" in result["method"]["score_scale"]
    # Forcing the probability scale on log-odds is refused, naming the setting.
    with pytest.raises(UserError, match="score_scale is probability, but .* outside"):
        evaluate_predictions(df, n_boot=200, score_scale="probability")
    # A threshold anywhere on the real line.
    neg, _ = evaluate_predictions(df, n_boot=200, threshold=-2.5)
    assert neg["models"]["dm"]["threshold"] == -2.5
    low, default = neg["models"]["dm"], result["models"]["dm"]
    assert low["sensitivity"]["value"] > default["sensitivity"]["value"]
    assert low["specificity"]["value"] < default["specificity"]["value"]


def test_full_precision_round_trip(tmp_path):
    df = log_odds(n=200, seed=4)
    df.loc[df.model == "dm", "y_score"] = np.random.default_rng(0).normal(size=200)  # no signal
    out = tmp_path / "o"
    r = CliRunner().invoke(
        evaluate_command,
        [
            str(_write(tmp_path, df)),
            "--out",
            str(out),
            "--bootstrap",
            "100",
            "--threshold",
            "4.5e-7",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads((out / "metrics.json").read_text())
    assert data["models"]["dm"]["threshold"] == 4.5e-7
    (c,) = data["comparisons"]
    g = df.sort_values("patient_id")
    ya = g[g.model == "dm"]["y_true"].to_numpy()
    expected = S.delong_test(
        ya, g[g.model == "dm"]["y_score"].to_numpy(), g[g.model == "fusion"]["y_score"].to_numpy()
    )
    assert c["p_value"] == expected.p_value and c["p_value"] < 1e-3  # exact, never rounded
    assert c["se"] == expected.se
    md = (out / "metrics.md").read_text()
    assert "4.5e-07" in md and f"{expected.p_value:.3g}" in md
    assert "at threshold 4.5e-07" in r.output
    scores = pd.read_csv(out / "patient_scores.csv", dtype={"patient_id": str})
    got = scores.set_index(["model", "patient_id"])["y_score"]
    want = df.set_index(["model", "patient_id"])["y_score"]
    assert (got.sort_index() == want.sort_index()).all()  # bit for bit


def test_operating_point_warnings_and_achievable_points():
    """A target reachable only by calling nearly everyone malignant is warned about."""
    rng = np.random.default_rng(3)
    val = log_odds(n=80, seed=1, prefix="V")
    # The most suspicious-looking malignant validation patient scores below every benign one.
    lowest = val.loc[val.y_true == 1].groupby("model").head(1).index
    val.loc[lowest, "y_score"] = val["y_score"].min() - 1 - rng.random(len(lowest))
    result, _ = evaluate_predictions(log_odds(), target_sensitivity=1.0, validation=val, n_boot=100)
    for name, e in result["models"].items():
        op = e["operating_point"]
        assert op["validation"]["sensitivity"]["value"] == 1.0
        assert op["warnings"] and "every benign score" in op["warnings"][0]
        assert op["warnings"][0] in result["warnings"]
        assert f"model {name}" in op["warnings"][0]
        assert len(op["achievable"]) > 1
        assert set(op["achievable"][0]) == {"threshold", "sensitivity", "specificity"}
        assert op["threshold_probability"] == pytest.approx(float(sigmoid(op["threshold"])))
    # A reachable target gives no warning.
    fine, _ = evaluate_predictions(
        log_odds(),
        target_sensitivity=0.5,
        validation=log_odds(n=80, seed=1, prefix="V"),
        n_boot=100,
    )
    assert all(not e["operating_point"]["warnings"] for e in fine["models"].values())
