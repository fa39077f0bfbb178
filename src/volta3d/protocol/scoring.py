"""Scores, fold metrics and per-subject prediction rows of label-column tasks, shared by fine-tuning
(``train_classify``) and the frozen-feature probes (``probes``), so both report the same metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from volta3d.errors import InputError
from volta3d.protocol.brain_age import brain_age_metrics, fit_bias_correction
from volta3d.protocol.labels import LabelSet
from volta3d.protocol.metrics import binary_metrics, multiclass_metrics, regression_metrics


def fold_metrics(kind: str, y_test, s_test, y_thr, s_thr, positive: int = 1) -> dict[str, float]:
    """Metrics of the test fold; binary: class ``positive`` is the positive one, and the Youden
    threshold is fitted on ``(y_thr, s_thr)`` (the inner validation predictions); regression: the
    brain-age gap's bias correction is fitted on them (the training subjects' predictions)."""
    if kind == "binary":
        return binary_metrics(
            (np.asarray(y_test) == positive).astype(int),
            s_test[:, positive],
            (np.asarray(y_thr) == positive).astype(int),
            s_thr[:, positive],
        )
    if kind == "multiclass":
        return multiclass_metrics(y_test, s_test)
    return {**regression_metrics(y_test, s_test), **_gap_metrics(y_test, s_test, y_thr, s_thr)}


def _gap_metrics(y_test: Any, s_test: Any, y_fit: Any, s_fit: Any | None) -> dict[str, float]:
    """Brain-age style metrics of a regression (``volta3d.protocol.brain_age``): Pearson r, the gap's
    mean and its correlation with the true value, and that correlation after the bias correction fitted
    on ``(y_fit, s_fit)`` (the training subjects' predictions) when there are any."""
    if len(y_test) < 2:
        return {}
    correction = None
    if s_fit is not None and len(y_fit) >= 2 and np.ptp(np.asarray(y_fit, dtype=float)) > 0:
        correction = fit_bias_correction(y_fit, s_fit)
    return brain_age_metrics(y_test, s_test, correction)


def positive_index(labels: LabelSet, positive_class: Any | None) -> int:
    """Index of the positive class: ``positive_class`` (compared as text, so 1 and "1" agree) or,
    when None, the second sorted class."""
    if positive_class is None:
        return 1
    if labels.kind != "binary":
        raise InputError(
            f"classify.positive_class applies to binary labels; '{labels.column}' is {labels.kind}"
        )
    names = [str(c) for c in labels.classes]
    if str(positive_class) not in names:
        raise InputError(
            f"classify.positive_class '{positive_class}' is not a class of '{labels.column}' "
            f"(classes: {', '.join(names)})"
        )
    return names.index(str(positive_class))


def prediction_rows(
    labels: LabelSet, rows: np.ndarray, scores: np.ndarray, fold: int, fraction: float, positive: int = 1
) -> list[dict]:
    """One ``predictions.csv`` row per test scan: truth, score(s) and the predicted class or value."""
    table = labels.table
    out = []
    for r, s in zip(rows, scores, strict=True):
        row: dict[str, Any] = {
            "subject_id": str(table.at[r, "subject_id"]),
            "fold": fold,
            "fraction": fraction,
        }
        if labels.kind == "regression":
            row.update(y_true=float(labels.targets[r]), prediction=float(s))
        else:
            row.update(y_true=int(labels.targets[r]), label=labels.classes[labels.targets[r]])
            if labels.kind == "binary":
                row.update(score=float(s[positive]), positive_class=labels.classes[positive])
            else:
                row.update({f"score_{c}": float(p) for c, p in zip(labels.classes, s, strict=True)})
            row["prediction"] = labels.classes[int(np.argmax(s))]
        out.append(row)
    return out
