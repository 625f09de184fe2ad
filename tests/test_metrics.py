"""Patient-level metrics against scikit-learn; operating points; calibration; bad input."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    brier_score_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from breastfusion.errors import UserError
from breastfusion.evaluate.metrics import (
    binary_metrics,
    brier_score,
    patient_scores,
    read_predictions,
    reliability_curve,
    roc_auc,
    threshold_for_sensitivity,
    validate_predictions,
)


def simulated(n=200, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-rng.normal(1.5 * y - 0.7, 1.0)))
    if ties:
        s = np.round(s, 1)
    return y, s


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, False), (3, True)])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.7])
def test_binary_metrics_match_sklearn(seed, ties, threshold):
    y, s = simulated(seed=seed, ties=ties)
    m = binary_metrics(y, s, threshold)
    pred = (s >= threshold).astype(int)
    assert m.sensitivity == pytest.approx(recall_score(y, pred))
    assert m.specificity == pytest.approx(recall_score(1 - y, 1 - pred))
    assert m.precision == pytest.approx(precision_score(y, pred))
    assert m.accuracy == pytest.approx(accuracy_score(y, pred))
    assert m.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m.tp + m.fp + m.tn + m.fn == len(y)


def test_auc_on_tied_and_constant_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    assert roc_auc(y, np.full(6, 0.3)) == 0.5
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.8])
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(roc_auc(np.zeros(3), np.array([0.1, 0.2, 0.3])))


def test_precision_undefined_when_nothing_called_malignant():
    m = binary_metrics(np.array([0, 1, 0]), np.array([0.1, 0.2, 0.3]), threshold=0.9)
    assert math.isnan(m.precision) and m.sensitivity == 0 and m.specificity == 1


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_reaches_target_and_is_the_largest(target):
    y, s = simulated(n=300, seed=4, ties=True)
    t = threshold_for_sensitivity(y, s, target)
    assert binary_metrics(y, s, t).sensitivity >= target
    # Any larger score used as threshold misses the target: t is the largest that reaches it.
    larger = np.unique(s[s > t])
    if len(larger):
        assert binary_metrics(y, s, larger[0]).sensitivity < target


def test_threshold_exact_fraction():
    # 10 malignant patients, target 0.9: exactly 9 must be caught (not 10, despite 0.9*10 > 9).
    y = np.array([1] * 10 + [0] * 5)
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.1, 0.5, 0.4, 0.3, 0.2, 0.1])
    assert threshold_for_sensitivity(y, s, 0.9) == 0.55


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, float("nan")])
def test_threshold_refuses_bad_target(target):
    with pytest.raises(UserError, match=r"target_sensitivity must be in \(0, 1\]"):
        threshold_for_sensitivity(np.array([0, 1]), np.array([0.2, 0.8]), target)


def test_brier_and_reliability_match_sklearn():
    y, s = simulated(n=500, seed=5)
    assert brier_score(y, s) == pytest.approx(brier_score_loss(y, s))
    curve = reliability_curve(y, s, n_bins=10)
    frac, mean = calibration_curve(y, s, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(curve.fraction_positive, frac)
    np.testing.assert_allclose(curve.mean_predicted, mean)
    assert sum(curve.count) == len(y)
    # Bin edges are shared with sklearn: scores exactly on an edge.
    edge_s = np.array([0.0, 0.1, 0.2, 0.5, 1.0, 0.3])
    edge_y = np.array([0, 1, 0, 1, 1, 0])
    c = reliability_curve(edge_y, edge_s)
    frac, mean = calibration_curve(edge_y, edge_s, n_bins=10)
    np.testing.assert_allclose(c.mean_predicted, mean)
    np.testing.assert_allclose(c.fraction_positive, frac)


def test_patient_scores_average_rows():
    df = pd.DataFrame(
        {
            "model": ["a", "a", "a", "b"],
            "patient_id": ["P1", "P1", "P2", "P1"],
            "y_true": [1, 1, 0, 1],
            "y_score": [0.2, 0.6, 0.3, 0.9],
        }
    )
    out = patient_scores(df)
    assert list(out.columns) == ["model", "patient_id", "y_true", "y_score", "n_rows"]
    row = out[(out.model == "a") & (out.patient_id == "P1")].iloc[0]
    assert row.y_score == pytest.approx(0.4) and row.n_rows == 2 and row.y_true == 1
    assert len(out) == 3


def test_patient_with_two_labels_is_named():
    df = pd.DataFrame(
        {
            "model": ["a", "a", "a"],
            "patient_id": ["P1", "P1", "P7"],
            "y_true": [1, 0, 0],
            "y_score": [0.2, 0.6, 0.3],
        }
    )
    with pytest.raises(
        UserError, match=r"preds.csv: 1 patient\(s\) with two labels.*P1 \(model a\)"
    ):
        patient_scores(df, "preds.csv")


def test_validate_predictions_messages():
    df = pd.DataFrame(
        {
            "model": ["a", "a", "a", "a"],
            "patient_id": ["P1", "P2", "P3", "P4"],
            "y_true": [1, 2, 0, 1],
            "y_score": [0.5, 0.5, np.inf, np.nan],
        }
    )
    with pytest.raises(UserError) as exc:
        validate_predictions(df, "p.csv")
    msg = str(exc.value)
    assert msg.startswith("p.csv: invalid predictions")
    assert "y_true must be 0 (benign) or 1 (malignant) at line 3 (model a, patient P2)" in msg
    # any finite score is accepted (log-odds); infinities are not
    assert "y_score is infinite at line 4 (model a, patient P3)" in msg
    assert "y_score is missing, NaN or not a number at line 5 (model a, patient P4)" in msg
    with pytest.raises(UserError, match="p.csv: missing column\\(s\\) y_score"):
        validate_predictions(df.drop(columns="y_score"), "p.csv")


def test_read_predictions(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("patient_id,y_true,y_score\n007,1,0.9\n008,0,0.1\n")
    df = read_predictions(path)
    assert list(df["patient_id"]) == ["007", "008"]  # ids stay strings (leading zeros)
    assert set(df["model"]) == {"model"}
    with pytest.raises(UserError, match="missing column"):
        read_predictions(path, require_model=True)
    with pytest.raises(UserError, match="nope.csv: predictions file not found"):
        read_predictions(tmp_path / "nope.csv")


def test_read_predictions_keeps_patient_ids_verbatim(tmp_path):
    """Leading zeros stay, 'NA'/'null' are ids (not missing), padding is stripped as the
    manifest strips it; an empty id is still an error naming its line."""
    from breastfusion.evaluate.metrics import read_predictions

    path = tmp_path / "p.csv"
    path.write_text("patient_id,y_true,y_score\n007,1,0.9\nNA,0,0.1\nnull,0,0.2\n 042 ,1,0.7\n")
    df = read_predictions(path)
    assert df["patient_id"].tolist() == ["007", "NA", "null", "042"]
    path.write_text("patient_id,y_true,y_score\n007,1,0.9\n,0,0.1\n")
    with pytest.raises(UserError, match=r"empty patient_id at line 3"):
        read_predictions(path)
