"""Brain-age metrics against references written from their formulas (numpy / scipy), the
regression-to-the-mean bias on shrunk predictions, and its correction fitted on training subjects only."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from volta3d.errors import InputError
from volta3d.protocol.brain_age import (
    BiasCorrection,
    brain_age_gap,
    brain_age_metrics,
    fit_bias_correction,
    gap_age_bias,
    mean_absolute_error,
    pearson_r,
)


def shrunk_cohort(n: int, seed: int, shrink: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Ages 20-80 and predictions pulled towards the mean age 50 (slope ``shrink``) plus noise: what a
    regression trained to minimise squared error does to subjects far from its training mean."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(20, 80, n)
    return age, 50 + shrink * (age - 50) + rng.normal(0, 4, n)


def test_metrics_match_their_formulas():
    age, pred = shrunk_cohort(200, seed=0)
    gap = pred - age
    np.testing.assert_allclose(brain_age_gap(age, pred), gap)
    assert mean_absolute_error(age, pred) == pytest.approx(np.mean(np.abs(gap)))
    assert pearson_r(pred, age) == pytest.approx(stats.pearsonr(pred, age).statistic)
    assert gap_age_bias(age, pred) == pytest.approx(stats.pearsonr(age, gap).statistic)
    m = brain_age_metrics(age, pred)
    assert m == pytest.approx(
        {
            "mae": np.mean(np.abs(gap)),
            "pearson_r": stats.pearsonr(pred, age).statistic,
            "gap_mean": gap.mean(),
            "gap_age_r": stats.pearsonr(age, gap).statistic,
        }
    )


def test_a_hand_computed_case():
    # ages 20, 40, 60 predicted 30, 40, 50: gaps +10, 0, -10 (mean 0), |gaps| average 20 / 3, and the gap
    # falls exactly linearly with age (r = -1) while the predictions rise with it (r = +1)
    m = brain_age_metrics([20, 40, 60], [30, 40, 50])
    assert m == pytest.approx({"mae": 20 / 3, "pearson_r": 1.0, "gap_mean": 0.0, "gap_age_r": -1.0})


def test_the_correction_is_the_least_squares_line_of_the_gap_on_age():
    age, pred = shrunk_cohort(100, seed=1)
    corr = fit_bias_correction(age, pred)
    fit = stats.linregress(age, pred - age)
    assert (corr.slope, corr.intercept, corr.n_fit) == pytest.approx((fit.slope, fit.intercept, 100))
    test_age, test_pred = shrunk_cohort(50, seed=2)
    np.testing.assert_allclose(
        corr.apply(test_age, test_pred), test_pred - (fit.slope * test_age + fit.intercept)
    )
    # de Lange & Cole (2020) fit predicted = alpha * age + beta and add age - (alpha * age + beta): the same
    line = stats.linregress(age, pred)
    np.testing.assert_allclose(
        corr.apply(test_age, test_pred), test_pred + test_age - (line.slope * test_age + line.intercept)
    )


def test_correction_fitted_on_training_removes_the_bias_on_test():
    train_age, train_pred = shrunk_cohort(400, seed=3)
    test_age, test_pred = shrunk_cohort(400, seed=4)
    before = brain_age_metrics(test_age, test_pred)
    assert before["gap_age_r"] < -0.8  # shrinkage of 0.6: gap = -0.4 (age - 50) + noise
    corr = fit_bias_correction(train_age, train_pred)  # never the test subjects
    assert corr.slope == pytest.approx(-0.4, abs=0.05)
    after = brain_age_metrics(test_age, test_pred, corr)
    assert abs(after["gap_age_r_corrected"]) < 0.1
    assert abs(after["gap_mean_corrected"]) < 1.0
    assert after["mae"] == before["mae"]  # the accuracy figure stays that of the model's own predictions


def test_a_constant_prediction_has_no_correlation():
    assert np.isnan(pearson_r([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]))
    assert np.isnan(brain_age_metrics([20, 40, 60], [45, 45, 45])["pearson_r"])


@pytest.mark.parametrize(
    ("true", "pred", "message"),
    [
        ([20, 40, 60], [30, 40], "3 true ages but 2 predicted ages"),
        ([20, float("nan"), 60], [30, 40, 50], "1 true age"),
        ([20, 40, 60], [30, float("inf"), 50], "1 predicted age"),
        ([[20, 40]], [[30, 40]], "1-D ages"),
        ([20], [30], "at least 2 subjects"),
    ],
)
def test_bad_inputs_are_input_errors(true, pred, message):
    with pytest.raises(InputError, match=message):
        brain_age_metrics(true, pred)
    with pytest.raises(InputError, match=message):
        fit_bias_correction(true, pred)


def test_the_correction_needs_different_ages():
    with pytest.raises(InputError, match="different ages"):
        fit_bias_correction([50, 50, 50], [45, 50, 55])
    with pytest.raises(InputError, match="NaN"):
        BiasCorrection(slope=-0.4, intercept=20.0, n_fit=10).apply([20, 40], [float("nan"), 40])
