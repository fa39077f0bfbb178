"""Brain-age metrics: accuracy, the brain-age gap and its regression-to-the-mean bias (issue 20).

A brain-age model is judged by the mean absolute error (MAE) and the Pearson r between predicted and
true age. Studies then use its brain-age gap (delta = predicted - true age) as a biomarker, but every
regression shrinks towards the mean age of its training data: old subjects get negative gaps and young
ones positive gaps, so the gap correlates negatively with age (Le et al., Front. Aging Neurosci. 10:317,
2018; Smith et al., "Estimation of brain age delta from brain imaging", NeuroImage 200, 2019).

The correction fits that dependence as a line on predictions whose ages may be used (the training
fold's, or better an inner validation split's: an over-fitted model shrinks its training predictions
less), ``gap = a * age + b``, and removes it from the test subjects' predictions:
``corrected = predicted - (a * age + b)`` (Smith et al. 2019; Beheshti et al., NeuroImage:
Clinical 24, 2019). De Lange & Cole (NeuroImage: Clinical 26, 2020, 102229) fit
``predicted = alpha * age + beta`` and add ``age - (alpha * age + beta)``: the same line with
``alpha = a + 1``, ``beta = b``, hence the same correction. Never fit it on the test subjects: their
ages would leak into the line and hide how much bias a new cohort keeps.

The correction reads each test subject's true age, so it serves group analyses of the gap; an MAE of
corrected ages is not the model's accuracy (a subject of unknown age cannot be corrected) and is not
reported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from volta3d.errors import InputError


def _ages(true_age: ArrayLike, predicted_age: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both as finite 1-D float arrays of one length, at least 2 subjects; else ``InputError``."""
    y, p = np.asarray(true_age, dtype=float), np.asarray(predicted_age, dtype=float)
    if y.ndim != 1 or p.ndim != 1:
        raise InputError(f"brain-age metrics take 1-D ages (got shapes {y.shape} and {p.shape})")
    if len(y) != len(p):
        raise InputError(f"{len(y)} true ages but {len(p)} predicted ages")
    if len(y) < 2:
        raise InputError(f"brain-age metrics need at least 2 subjects (got {len(y)})")
    for name, v in (("true", y), ("predicted", p)):
        if not np.isfinite(v).all():
            raise InputError(f"{int((~np.isfinite(v)).sum())} {name} age(s) are NaN or infinite")
    return y, p


def pearson_r(x: ArrayLike, y: ArrayLike) -> float:
    """Pearson correlation of two equal-length samples; NaN where either is constant (undefined)."""
    a, b = _ages(x, y)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a @ a) * (b @ b)))
    return float(np.clip((a @ b) / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def brain_age_gap(true_age: ArrayLike, predicted_age: ArrayLike) -> np.ndarray:
    """(N,) brain-age gap, predicted - true (positive: the brain looks older than its age)."""
    y, p = _ages(true_age, predicted_age)
    return p - y


def mean_absolute_error(true_age: ArrayLike, predicted_age: ArrayLike) -> float:
    return float(np.abs(brain_age_gap(true_age, predicted_age)).mean())


def gap_age_bias(true_age: ArrayLike, predicted_age: ArrayLike) -> float:
    """Pearson r of the gap with true age: negative when predictions shrink towards the mean age."""
    return pearson_r(true_age, brain_age_gap(true_age, predicted_age))


@dataclass(frozen=True)
class BiasCorrection:
    """The line ``gap = slope * age + intercept`` fitted on held-in predictions (``n_fit`` subjects)."""

    slope: float
    intercept: float
    n_fit: int

    def apply(self, true_age: ArrayLike, predicted_age: ArrayLike) -> np.ndarray:
        """(N,) corrected predicted ages, ``predicted - (slope * age + intercept)``."""
        y, p = _ages(true_age, predicted_age)
        return p - (self.slope * y + self.intercept)


def fit_bias_correction(true_age: ArrayLike, predicted_age: ArrayLike) -> BiasCorrection:
    """Least-squares line of the gap on age, from training or inner-validation predictions only."""
    y, p = _ages(true_age, predicted_age)
    if np.ptp(y) == 0:
        raise InputError("the bias correction needs subjects of different ages to fit its slope")
    slope, intercept = np.polyfit(y, p - y, deg=1)
    return BiasCorrection(slope=float(slope), intercept=float(intercept), n_fit=len(y))


def brain_age_metrics(
    true_age: ArrayLike, predicted_age: ArrayLike, correction: BiasCorrection | None = None
) -> dict[str, float]:
    """``mae``, ``pearson_r`` (predicted vs true), ``gap_mean`` and ``gap_age_r`` (the bias); with a
    ``correction`` fitted elsewhere, also ``gap_mean_corrected`` and ``gap_age_r_corrected``."""
    y, p = _ages(true_age, predicted_age)
    out = {
        "mae": mean_absolute_error(y, p),
        "pearson_r": pearson_r(p, y),
        "gap_mean": float((p - y).mean()),
        "gap_age_r": gap_age_bias(y, p),
    }
    if correction is not None:
        c = correction.apply(y, p)
        out.update(gap_mean_corrected=float((c - y).mean()), gap_age_r_corrected=gap_age_bias(y, c))
    return out
