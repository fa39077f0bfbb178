from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from volta3d.evaluation.statistics import bootstrap_ci, delong_covariance, delong_test, paired_difference


def _direct_delong(y, scores):
    """DeLong et al. (1988) written directly from the Mann-Whitney kernel, O(m n):
    psi(x, y) = 1 if x > y, 1/2 if equal, 0 otherwise; V10_i = mean_j psi(X_i, Y_j),
    V01_j = mean_i psi(X_i, Y_j); Cov = S10 / m + S01 / n."""
    y = np.asarray(y)
    comps10, comps01, aucs = [], [], []
    for s in scores:
        s = np.asarray(s, dtype=float)
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])  # (m, n)
        aucs.append(psi.mean())
        comps10.append(psi.mean(axis=1))
        comps01.append(psi.mean(axis=0))
    m, n = len(comps10[0]), len(comps01[0])
    cov = np.cov(np.array(comps10)) / m + np.cov(np.array(comps01)) / n
    return np.array(aucs), cov


def test_delong_matches_direct_computation_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    a = np.round(y * 0.8 + rng.normal(0, 0.7, 60), 1)  # rounding creates ties
    b = np.round(y * 0.3 + rng.normal(0, 0.7, 60), 1)
    aucs, cov = delong_covariance(y, a, b)
    aucs_ref, cov_ref = _direct_delong(y, [a, b])
    np.testing.assert_allclose(aucs, aucs_ref, atol=1e-12)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, a), roc_auc_score(y, b)], atol=1e-12)
    np.testing.assert_allclose(cov, cov_ref, atol=1e-12)
    res = delong_test(y, a, b)
    var = cov_ref[0, 0] + cov_ref[1, 1] - 2 * cov_ref[0, 1]
    z = (aucs_ref[0] - aucs_ref[1]) / np.sqrt(var)
    assert res["z"] == pytest.approx(z)
    assert res["p"] == pytest.approx(2 * norm.sf(abs(z)))


def test_delong_identical_scores_and_one_class():
    y = [0, 1, 0, 1]
    s = [0.1, 0.9, 0.4, 0.3]
    assert delong_test(y, s, s)["p"] == 1.0
    with pytest.raises(ValueError, match="needs both classes"):
        delong_test([1, 1], [0.1, 0.2], [0.3, 0.4])


def test_bootstrap_ci_contains_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 1.0, 40)
    r1 = bootstrap_ci(np.mean, x, n_boot=500, seed=7)
    r2 = bootstrap_ci(np.mean, x, n_boot=500, seed=7)
    r3 = bootstrap_ci(np.mean, x, n_boot=500, seed=8)
    assert r1 == r2
    assert r1["ci_low"] != r3["ci_low"]
    assert r1["estimate"] == pytest.approx(x.mean())
    assert r1["ci_low"] < r1["estimate"] < r1["ci_high"]


def test_paired_difference_wilcoxon_and_ci():
    a = [0.9, 0.85, 0.92, 0.88, 0.95]
    b = [0.8, 0.84, 0.83, 0.80, 0.90]
    r = paired_difference(a, b, n_boot=300, seed=0)
    assert r["estimate"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert r["ci_low"] <= r["estimate"] <= r["ci_high"]
    # all 5 differences positive: exact two-sided Wilcoxon p = 2 / 2^5
    assert r["wilcoxon_p"] == pytest.approx(0.0625)
    assert paired_difference(a, a, n_boot=10)["wilcoxon_p"] == 1.0


def test_rank_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    from volta3d.evaluation.statistics import rank_auc

    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.normal(size=40) + y, 1)  # rounding makes ties
        assert rank_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(rank_auc(np.ones(5), np.arange(5.0)))
