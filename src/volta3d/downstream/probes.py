"""Frozen-feature probes (no backbone training): logistic regression on standardised features
and kNN (cosine) for class labels; ridge and kNN regression for numeric labels. Same folds as the
fine-tuning runs, same metrics, same results files, so ``compare`` pairs them with any run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from volta3d.downstream.labels import LabelSet
from volta3d.downstream.train_classify import assemble_results, fold_metrics, prediction_rows
from volta3d.evaluation.splits import fold_row_indices, nested_subsets


def make_probe(name: str, kind: str, *, logreg_c: float = 1.0, knn_k: int = 20, ridge_alpha: float = 1.0,
               n_train: int, seed: int = 0):
    """A scikit-learn estimator. ``linear``: logistic / ridge regression on standardised features;
    ``knn``: cosine k-nearest neighbours, uniform vote (k capped at the training size)."""
    k = max(1, min(knn_k, n_train))
    if name == "linear":
        est = Ridge(alpha=ridge_alpha) if kind == "regression" else LogisticRegression(C=logreg_c, max_iter=5000, random_state=seed)
        return make_pipeline(StandardScaler(), est)
    if name == "knn":
        cls = KNeighborsRegressor if kind == "regression" else KNeighborsClassifier
        return cls(n_neighbors=k, metric="cosine", weights="uniform")
    raise ValueError(f"unknown probe '{name}' (choose linear or knn)")


def _outputs(est, kind: str, x: np.ndarray, num_classes: int) -> np.ndarray:
    if kind == "regression":
        return est.predict(x)
    proba = np.zeros((len(x), num_classes))
    proba[:, est.classes_] = est.predict_proba(x)  # a class missing from training keeps probability 0
    return proba


def run_probe(features: np.ndarray, labels: LabelSet, splits: dict[str, Any], probe: str, *,
              feature_name: str, encoder: str | None, seed: int = 0, config: dict | None = None,
              fractions: Sequence[float] = (1.0,), **probe_kwargs: Any) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit ``probe`` on each fold's training rows of ``features`` (N, E), aligned to ``labels.table``,
    or on the same nested, stratified fractions of them that fine-tuning uses (reduced-data curve);
    return the results dictionary and predictions."""
    subjects = np.asarray(labels.table["subject_id"].astype(str).tolist())
    per_fraction: dict[float, list[dict[str, Any]]] = {}
    for k, (train_all, test) in enumerate(fold_row_indices(splits, subjects.tolist())):
        subsets = nested_subsets(subjects[train_all], labels.strata[train_all], fractions, seed=seed + k)
        for frac, chosen in subsets.items():
            train = train_all[np.isin(subjects[train_all], chosen)]
            est = make_probe(probe, labels.kind, n_train=len(train), seed=seed, **probe_kwargs)
            est.fit(features[train], labels.targets[train])
            s_test = _outputs(est, labels.kind, features[test], labels.num_outputs)
            s_train = _outputs(est, labels.kind, features[train], labels.num_outputs)
            per_fraction.setdefault(frac, []).append({
                "fold": k, "fraction": frac, "n_train": int(len(train)), "n_test": int(len(test)),
                "metrics": fold_metrics(labels.kind, labels.targets[test], s_test, labels.targets[train], s_train),
                "predictions": prediction_rows(labels, test, s_test, k, frac),
            })  # fmt: skip
    results = assemble_results(labels, per_fraction, splits, f"probe-{probe}-{feature_name}", encoder, seed,
                               config, task="probe")
    preds = pd.DataFrame([r for folds in per_fraction.values() for f in folds for r in f["predictions"]])
    return results, preds
