"""Frozen-feature probes (no backbone training): logistic regression on standardised features
and kNN (cosine) for class labels; ridge and kNN regression for numeric labels. Same folds as the
fine-tuning runs, same metrics, same results files, so ``compare`` pairs them with any run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge, RidgeCV
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from volta3d import layout
from volta3d.errors import InputError
from volta3d.protocol.cv import Fold, label_results, plan_folds, run_folds
from volta3d.protocol.labels import LabelSet
from volta3d.protocol.leakage import check_run_rows
from volta3d.protocol.scoring import fold_metrics, prediction_rows

PROBE_SETTINGS = ("logreg_cs", "knn_k", "ridge_alphas", "inner_folds")  # the probe: keys make_probe reads


def make_probe(
    name: str,
    kind: str,
    *,
    logreg_cs: Sequence[float],
    knn_k: int,
    ridge_alphas: Sequence[float],
    inner_folds: int,
    train_targets: np.ndarray,
    seed: int,
):
    """A scikit-learn estimator. ``linear``: logistic / ridge regression on standardised features, its
    regularisation chosen among ``logreg_cs`` / ``ridge_alphas`` by cross-validation inside the training
    rows only (``inner_folds`` stratified folds for logistic regression, leave-one-out for ridge), so
    learned features and the raw-volume floor each get their best setting without seeing a test subject;
    a one-value list fixes it. ``knn``: cosine k-nearest neighbours, uniform vote (k capped at the
    training size). The settings are the ``probe:`` config section's; ``train_targets`` the fold's training
    labels (the inner folds are capped by the smallest class)."""
    k = max(1, min(knn_k, len(train_targets)))
    if name == "linear":
        if kind != "regression":
            inner_folds = min(inner_folds, int(np.unique(train_targets, return_counts=True)[1].min()))
        return make_pipeline(StandardScaler(), _linear(kind, logreg_cs, ridge_alphas, inner_folds, seed))
    if name == "knn":
        cls = KNeighborsRegressor if kind == "regression" else KNeighborsClassifier
        return cls(n_neighbors=k, metric="cosine", weights="uniform")
    raise InputError(f"unknown probe '{name}' (choose linear or knn)")


def _linear(kind: str, cs: Sequence[float], alphas: Sequence[float], inner_folds: int, seed: int):
    """Ridge / logistic regression, with inner CV over the grid when it has more than one value; a class
    with fewer than 2 training subjects leaves nothing to choose on: the middle of the grid is used."""
    if kind == "regression":
        return Ridge(alpha=alphas[0]) if len(alphas) == 1 else RidgeCV(alphas=list(alphas))
    if len(cs) == 1 or inner_folds < 2:
        return LogisticRegression(C=cs[len(cs) // 2], max_iter=5000, random_state=seed)
    inner = StratifiedKFold(n_splits=inner_folds, shuffle=True, random_state=seed)
    return LogisticRegressionCV(
        Cs=list(cs), l1_ratios=(0.0,), cv=inner, scoring="neg_log_loss", max_iter=5000, random_state=seed,
        use_legacy_attributes=False,
    )  # fmt: skip


def _outputs(est, kind: str, x: np.ndarray, num_classes: int) -> np.ndarray:
    if kind == "regression":
        return est.predict(x)
    proba = np.zeros((len(x), num_classes))
    proba[:, est.classes_] = est.predict_proba(x)  # a class missing from training keeps probability 0
    return proba


def run_probe(
    features: np.ndarray,
    labels: LabelSet,
    splits: dict[str, Any],
    probe: str,
    *,
    feature_name: str,
    encoder: str | None,
    seed: int,
    fractions: Sequence[float],
    logreg_cs: Sequence[float],
    knn_k: int,
    ridge_alphas: Sequence[float],
    inner_folds: int,
    config: dict | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Fit ``probe`` on each fold's training rows of ``features`` (N, E), aligned to ``labels.table``,
    or on the same nested, stratified fractions of them that fine-tuning uses (reduced-data curve);
    return the results dictionary and predictions. ``seed`` is the config's, ``fractions`` and the
    probe settings the ``probe:`` section's."""

    def fit_fold(fold: Fold) -> dict[str, Any]:
        train, test = fold.train, fold.test
        est = make_probe(
            probe,
            labels.kind,
            logreg_cs=logreg_cs,
            knn_k=knn_k,
            ridge_alphas=ridge_alphas,
            inner_folds=inner_folds,
            train_targets=labels.targets[train],
            seed=seed,
        )
        est.fit(features[train], labels.targets[train])
        s_test = _outputs(est, labels.kind, features[test], labels.num_outputs)
        s_train = _outputs(est, labels.kind, features[train], labels.num_outputs)
        return {
            "fold": fold.index, "fraction": fold.fraction, "n_train": int(len(train)), "n_test": int(len(test)),
            "metrics": fold_metrics(labels.kind, labels.targets[test], s_test, labels.targets[train], s_train),
            "predictions": prediction_rows(labels, test, s_test, fold.index, fold.fraction),
        }  # fmt: skip

    plan = plan_folds(
        splits,
        labels.table["subject_id"].astype(str).tolist(),
        seed=seed,
        fractions=fractions,
        strata=labels.strata,
    )
    # no resume and no reseeding: a probe is cheap, and runs inside pretraining's online evaluation
    per_fraction = run_folds(plan, fit_fold, reseed=False)
    results = label_results(
        labels,
        per_fraction,
        task="probe",
        model=f"probe-{probe}-{feature_name}",
        encoder=encoder,
        seed=seed,
        config=config,
        splits=splits,
    )
    return results.to_dict(), results.predictions()


def _probe_inputs(
    cfg: Any, embeddings: str | Path, data: str | Path, label: str, splits_file: str | Path | None
) -> tuple[dict, dict, LabelSet, np.ndarray, dict]:
    """The embeddings (refused when non-finite), the labels, the manifest row of each embedding and the folds."""
    from volta3d.data.dataset import read_manifest
    from volta3d.protocol.embeddings import embedding_rows, load_embeddings
    from volta3d.protocol.labels import label_kfold_splits, prepare_labels
    from volta3d.protocol.splits import load_splits

    emb, meta = load_embeddings(embeddings)
    bad = [k for k in ("cls", "mean", "tokens", "raw") if k in emb and not np.isfinite(emb[k]).all()]
    if bad:
        raise InputError(
            f"{embeddings} holds non-finite '{bad[0]}' features (NaN/Inf); re-embed with a finite encoder"
        )
    labels = prepare_labels(read_manifest(data), label, cfg.classify.task)
    rows = embedding_rows(emb["path"].tolist(), labels.table["path"].tolist(), f"{embeddings} ({data})")
    splits = (
        load_splits(splits_file) if splits_file else label_kfold_splits(labels, cfg.probe.n_splits, cfg.seed)
    )
    return emb, meta, labels, rows, splits


def probe_folder(
    cfg: Any,
    embeddings: str | Path,
    data: str | Path,
    label: str,
    output: str | Path,
    splits_file: str | Path | None,
) -> dict[str, Any]:
    """``volta3d probe``: linear and kNN probes of each feature of ``embeddings`` for ``label`` of the
    preprocessed folder ``data``; one run folder per probe and feature, and ``summary.json``, in ``output``."""
    from volta3d.config import save_config, to_kwargs
    from volta3d.protocol.results import save_run, write_json
    from volta3d.protocol.splits import save_splits
    from volta3d.runtime import get_logger, setup_logging

    out = Path(output)
    setup_logging(out)
    save_config(cfg, out)
    pc = to_kwargs(cfg.probe)
    emb, meta, labels, rows, splits = _probe_inputs(cfg, embeddings, data, label, splits_file)
    check_run_rows(labels.table, splits, labels)  # one scan under two subject ids, conflicting labels
    save_splits(splits, out)
    provenance = _provenance(meta, data, labels.table)
    summary = {}
    # raw-volume embeddings hold one feature, 'raw'; probe.features names the encoder's (cls / mean)
    for feat in ["raw"] if "raw" in emb else pc["features"]:
        if feat not in emb:
            get_logger().warning(
                f"embeddings have no '{feat}' feature (encoder without a summariser?); skipped"
            )
            continue
        for probe in ("linear", "knn"):
            results, preds = run_probe(
                emb[feat][rows], labels, splits, probe, feature_name=feat, encoder=meta.get("encoder"),
                seed=cfg.seed, config=to_kwargs(cfg), fractions=pc["fractions"],
                **{k: pc[k] for k in PROBE_SETTINGS},
            )  # fmt: skip
            results = {**results, **_embedding_record(meta, provenance)}
            save_run(out / f"{probe}_{feat}", results, preds)
            primary = results["primary_metric"]
            agg = results["aggregate"][primary]
            summary[f"{probe}_{feat}"] = {primary: agg}
            print(
                f"{probe:>6} probe on {feat:<4} ({meta.get('init')}): {primary} {agg['mean']:.3f} +- {agg['sd']:.3f}"
            )
    write_json(out / layout.PROBE_SUMMARY, summary)
    return summary


def _embedding_record(meta: dict[str, Any], provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The results.json keys that say where the probed embeddings came from."""
    record: dict[str, Any] = {"embedding_init": meta.get("init")}
    if provenance is not None:
        record["encoder_provenance"] = provenance
    if meta.get("grid") is not None:
        record["embedding_grid"] = meta["grid"]  # the report names the baseline by it
    return record


def _provenance(meta: dict, data: str | Path, table: pd.DataFrame) -> dict | None:
    """For embeddings of a pretrained export: how many probed subjects its pretraining saw, from the
    record the embeddings carry (files from before they carried it: from the export, which must exist)."""
    from volta3d.models.export import read_encoder_meta
    from volta3d.models.provenance import relate_to_pretraining
    from volta3d.runtime import get_logger

    if meta.get("init") != "pretrained" or not meta.get("encoder"):
        return None
    if "encoder_provenance" in meta:
        encoder_meta = {"provenance": meta["encoder_provenance"]}
    else:
        encoder_meta = read_encoder_meta(meta["encoder"])
    summary, warning = relate_to_pretraining(encoder_meta, data, table)
    if warning:
        get_logger().warning("warning: %s", warning)
    return {**summary, "preprocessing_warning": warning}
