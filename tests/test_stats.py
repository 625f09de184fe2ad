"""DeLong (fast vs direct, vs bootstrap), the vectorised bootstrap, coverage, Wilson."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from breastfusion.evaluate import stats as S


def binormal(m, n, d, rng, rho=0.0, ties=None):
    """Positives ~ N(d, 1), negatives ~ N(0, 1); optional second correlated model."""
    y = np.r_[np.ones(m, int), np.zeros(n, int)]
    z1 = rng.normal(size=m + n)
    z2 = rho * z1 + math.sqrt(1 - rho**2) * rng.normal(size=m + n)
    a, b = z1 + d * y, z2 + 0.7 * d * y
    if ties is not None:
        a, b = np.round(a, ties), np.round(b, ties)
    return y, a, b


@pytest.mark.parametrize("seed", range(6))
def test_fast_delong_equals_direct(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(3, 40)), int(rng.integers(3, 60))
    ties = [None, 0, 1][seed % 3]  # rounding to 0 decimals makes many ties
    y, a, b = binormal(m, n, 1.0, rng, rho=0.5, ties=ties)
    perm = rng.permutation(len(y))  # classes interleaved, not blocked
    y, a, b = y[perm], a[perm], b[perm]
    aucs, cov = S.delong_covariance(y, np.vstack([a, b]))
    aucs_d, cov_d = S.delong_direct(y, np.vstack([a, b]))
    np.testing.assert_allclose(aucs, aucs_d, atol=1e-12)
    np.testing.assert_allclose(cov, cov_d, atol=1e-12)
    assert aucs[0] == pytest.approx(roc_auc_score(y, a))
    assert cov[0, 1] == pytest.approx(cov[1, 0])


def test_delong_variance_matches_bootstrap():
    rng = np.random.default_rng(11)
    y, a, _ = binormal(150, 300, 1.2, rng)
    ci = S.delong_ci(y, a)
    boot = S.bootstrap_auc(y, a, n_boot=4000, seed=1)
    assert ci.se**2 == pytest.approx(np.var(boot, ddof=1), rel=0.2)
    assert ci.ci_low < ci.auc < ci.ci_high
    assert ci.ci_high - ci.ci_low == pytest.approx(2 * 1.959964 * ci.se)


def test_delong_paired_variance_matches_bootstrap():
    rng = np.random.default_rng(12)
    y, a, b = binormal(150, 300, 1.2, rng, rho=0.6)
    t = S.delong_test(y, a, b)
    counts = S.stratified_counts(y, 4000, seed=2)
    diff = S.bootstrap_auc(y, a, counts=counts) - S.bootstrap_auc(y, b, counts=counts)
    assert t.se**2 == pytest.approx(np.var(diff, ddof=1), rel=0.2)
    assert t.p_value == pytest.approx(2 * norm.sf(abs(t.difference / t.se)))


def test_delong_test_edge_cases():
    rng = np.random.default_rng(3)
    y, a, _ = binormal(20, 30, 1.0, rng)
    same = S.delong_test(y, a, a)
    assert same.p_value == 1.0 and same.difference == 0.0
    # A big true difference gives a small p value; a monotone transform changes nothing.
    y, a, b = binormal(200, 200, 2.0, rng, rho=0.0)
    assert S.delong_test(y, a, rng.normal(size=len(y))).p_value < 1e-6
    assert S.delong_test(y, a, np.exp(a)).p_value == 1.0


def test_single_positive_gives_nan_variance():
    y = np.array([1, 0, 0, 0])
    ci = S.delong_ci(y, np.array([0.9, 0.1, 0.2, 0.3]))
    assert ci.auc == 1.0 and math.isnan(ci.se)


def test_weighted_auc_equals_auc_of_expanded_resample():
    rng = np.random.default_rng(4)
    y, a, _ = binormal(30, 50, 0.8, rng, ties=1)
    counts = S.stratified_counts(y, 20, seed=5)
    reps = S.bootstrap_auc(y, a, counts=counts)
    for b in range(20):
        idx = np.r_[
            np.repeat(counts.pos_index, counts.pos_counts[b]),
            np.repeat(counts.neg_index, counts.neg_counts[b]),
        ]
        assert reps[b] == pytest.approx(roc_auc_score(y[idx], a[idx]), abs=1e-12)
    # Stratified: every resample keeps the class sizes.
    assert (counts.pos_counts.sum(axis=1) == 30).all()
    assert (counts.neg_counts.sum(axis=1) == 50).all()


def test_bootstrap_mean_equals_mean_of_expanded_resample():
    rng = np.random.default_rng(6)
    y, a, _ = binormal(10, 15, 1.0, rng)
    counts = S.stratified_counts(y, 5, seed=0)
    reps = S.bootstrap_mean(a, counts)
    for b in range(5):
        idx = np.r_[
            np.repeat(counts.pos_index, counts.pos_counts[b]),
            np.repeat(counts.neg_index, counts.neg_counts[b]),
        ]
        assert reps[b] == pytest.approx(a[idx].mean())


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(7)
    y, a, _ = binormal(20, 40, 1.0, rng)
    np.testing.assert_array_equal(S.bootstrap_auc(y, a, 50, 3), S.bootstrap_auc(y, a, 50, 3))
    assert not np.array_equal(S.bootstrap_auc(y, a, 50, 3), S.bootstrap_auc(y, a, 50, 4))


def test_bootstrap_ci_coverage():
    """Percentile CIs from 500 resamples cover the true AUC in about 95% of 200 cohorts."""
    d = 1.0
    true_auc = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    hits = 0
    for i in range(200):
        y, a, _ = binormal(60, 120, d, rng)
        lo, hi = S.percentile_ci(S.bootstrap_auc(y, a, n_boot=500, seed=i))
        hits += lo <= true_auc <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_bootstrap_speed_sanity():
    # Not a benchmark (those live in benchmarks/): only catches an accidental O(B·n²) path.
    rng = np.random.default_rng(8)
    y, a, _ = binormal(300, 700, 1.0, rng)
    start = time.perf_counter()
    S.bootstrap_auc(y, a, n_boot=2000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_percentile_ci():
    lo, hi = S.percentile_ci(np.arange(1001) / 1000)
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)


def test_wilson_known_values():
    # 8 of 10 → (0.4902, 0.9433) (Wilson 1927; Newcombe 1998 table I).
    lo, hi = S.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = S.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert S.wilson_interval(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in S.wilson_interval(0, 0))
    with pytest.raises(ValueError):
        S.wilson_interval(5, 3)


def test_input_checks():
    with pytest.raises(ValueError, match="one positive and one negative"):
        S.delong_covariance(np.zeros(4, int), np.arange(4.0))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        S.delong_covariance(np.array([0, 2]), np.arange(2.0))
    with pytest.raises(ValueError, match="finite"):
        S.delong_covariance(np.array([0, 1]), np.array([0.1, np.nan]))


# --------------------------------------------------------------------------------------------
# Fold-stratified AUC and the stratified DeLong variance / paired test
# --------------------------------------------------------------------------------------------


def _folds(rng, sizes=((6, 9), (4, 11), (7, 5)), d=1.0):
    """Labels, two correlated models' scores and fold ids for folds of (m, n) patients."""
    ys, a, b, f = [], [], [], []
    for k, (m, n) in enumerate(sizes):
        y, sa, sb = binormal(m, n, d, rng, rho=0.5)
        ys.append(y)
        a.append(sa)
        b.append(sb)
        f.append(np.full(m + n, k))
    return np.concatenate(ys), np.concatenate(a), np.concatenate(b), np.concatenate(f)


def _brute_force(y, s, folds):
    """Concordance over every within-fold pair, and Σ w² (S10/m + S01/n) by explicit loops."""
    num = den = var = 0.0
    parts = []
    for k in np.unique(folds):
        pos = [s[i] for i in range(len(y)) if folds[i] == k and y[i] == 1]
        neg = [s[i] for i in range(len(y)) if folds[i] == k and y[i] == 0]
        psi = [[1.0 if p > q else 0.5 if p == q else 0.0 for q in neg] for p in pos]
        num += sum(map(sum, psi))
        den += len(pos) * len(neg)
        v10 = [sum(row) / len(neg) for row in psi]
        v01 = [sum(psi[i][j] for i in range(len(pos))) / len(pos) for j in range(len(neg))]
        auc_k = sum(v10) / len(pos)
        s10 = sum((v - auc_k) ** 2 for v in v10) / (len(pos) - 1)
        s01 = sum((v - auc_k) ** 2 for v in v01) / (len(neg) - 1)
        parts.append((len(pos) * len(neg), s10 / len(pos) + s01 / len(neg)))
    for pairs, v in parts:
        var += (pairs / den) ** 2 * v
    return num / den, var


@pytest.mark.parametrize("ties", [None, 0])
def test_stratified_delong_equals_brute_force(ties):
    rng = np.random.default_rng(21)
    y, a, _, f = _folds(rng)
    if ties is not None:
        a = np.round(a, ties)
    perm = rng.permutation(len(y))
    y, a, f = y[perm], a[perm], f[perm]
    auc, var = _brute_force(y, a, f)
    ci = S.stratified_auc_ci(y, a, f)
    assert ci.auc == pytest.approx(auc, abs=1e-12)
    assert ci.se**2 == pytest.approx(var, rel=1e-10)
    res = S.stratified_delong(y, a, f)
    assert res.n_pairs == 6 * 9 + 4 * 11 + 7 * 5
    assert res.weights.sum() == pytest.approx(1.0)


def test_fold_scale_moves_pooled_auc_but_not_stratified():
    """Fold 1 scores ×1e6 (a fold model on another scale): the pooled AUC drops, the
    fold-stratified AUC is the pair-weighted mean of the fold AUCs and does not move."""
    rng = np.random.default_rng(5)
    y, a, _, f = _folds(rng, sizes=((20, 40), (20, 40), (15, 30)), d=1.5)
    a = a - a.min() + 1.0  # positive scores, so scaling one fold moves it away from the others
    before = S.stratified_auc_ci(y, a, f)
    scaled = np.where(f == 1, a * 1e6, a)
    after = S.stratified_auc_ci(y, scaled, f)
    fold_aucs = [roc_auc_score(y[f == k], a[f == k]) for k in range(3)]
    pairs = [int(y[f == k].sum()) * int((1 - y[f == k]).sum()) for k in range(3)]
    weighted = float(np.dot(fold_aucs, pairs) / sum(pairs))
    assert before.auc == pytest.approx(weighted, abs=1e-12)
    assert after.auc == pytest.approx(before.auc, abs=1e-12)
    assert after.se == pytest.approx(before.se, rel=1e-12)
    pooled_before, pooled_after = roc_auc_score(y, a), roc_auc_score(y, scaled)
    assert pooled_after < pooled_before - 0.05
    assert pooled_after < after.ci_low  # the artefact the pooled number showed


def test_stratified_variance_matches_within_fold_bootstrap():
    rng = np.random.default_rng(9)
    y, a, _, f = _folds(rng, sizes=((60, 90), (50, 100)), d=1.0)
    ci = S.stratified_auc_ci(y, a, f)
    boot = []
    for k in range(2):  # resample patients within each fold and class
        idx = np.flatnonzero(f == k)
        counts = S.stratified_counts(y[idx], 3000, seed=k)
        boot.append(S.bootstrap_auc(y[idx], a[idx], counts=counts))
    res = S.stratified_delong(y, a, f)
    reps = res.weights[0] * boot[0] + res.weights[1] * boot[1]
    assert ci.se**2 == pytest.approx(np.var(reps, ddof=1), rel=0.2)


def test_stratified_paired_test():
    rng = np.random.default_rng(13)
    y, a, b, f = _folds(rng, sizes=((40, 60), (40, 60), (40, 60)), d=1.2)
    t = S.stratified_delong_test(y, a, b, f)
    res = S.stratified_delong(y, np.vstack([a, b]), f)
    var = sum(
        w**2 * (c[0, 0] + c[1, 1] - 2 * c[0, 1])
        for w, c in zip(
            res.weights,
            [S.delong_direct(y[f == k], np.vstack([a[f == k], b[f == k]]))[1] for k in range(3)],
            strict=True,
        )
    )
    assert t.difference == pytest.approx(res.aucs[0] - res.aucs[1])
    assert t.se**2 == pytest.approx(var, rel=1e-10)
    assert t.p_value == pytest.approx(2 * norm.sf(abs(t.difference) / t.se))
    # Per-fold rescaling of one model changes nothing; identical models give p = 1.
    scaled = np.where(f == 2, b * 1e6, b)
    assert S.stratified_delong_test(y, a, scaled, f).p_value == pytest.approx(t.p_value)
    assert S.stratified_delong_test(y, a, a, f).p_value == 1.0


def test_stratified_skips_one_class_folds_and_checks_inputs():
    y = np.array([1, 0, 0, 1, 0, 0, 0])
    s = np.array([0.9, 0.1, 0.3, 0.8, 0.7, 0.2, 0.4])
    f = np.array([0, 0, 0, 1, 1, 1, 2])  # fold 2 has one benign patient only: no pairs
    res = S.stratified_delong(y, s, f)
    assert res.strata == (0, 1) and res.n_pairs == 4
    assert math.isnan(S.stratified_auc_ci(y, s, f).se)  # one malignant per fold: no variance
    with pytest.raises(ValueError, match="a stratum with at least one positive"):
        S.stratified_delong(np.array([1, 0]), np.array([0.2, 0.1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="strata must have shape"):
        S.stratified_delong(y, s, f[:3])
