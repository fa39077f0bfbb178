"""Cross-validated classification / regression from a preprocessed manifest (paper II-C, III-A/B).

For every (training fraction, fold): build the model afresh (seeded), train on the fold's
training subjects (or a nested, stratified fraction of them), predict the test subjects, and
record metrics and per-subject predictions in ``folds/<key>.json`` so a rerun skips finished folds.
For binary labels the model trains on most of the fold's training side and the Youden-J threshold
is fitted on its predictions for a stratified inner validation split of the rest (a threshold fitted
on the model's own training predictions is chosen where it is over-confident); the test fold never
touches it. ``positive_class`` names the class whose probability is the score (default: the second
sorted class), so sensitivity means sensitivity to that class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.transforms import Compose, RandFlipd, Resized
from torch.utils.data import DataLoader, Subset

from volta3d.data.dataset import VolumeDataset
from volta3d.downstream.classifier import MODES, ViTClassifier, build_classifier
from volta3d.downstream.external import test_record
from volta3d.downstream.labels import LabelSet
from volta3d.downstream.loop import train_model
from volta3d.downstream.saved import save_fold_model
from volta3d.evaluation.metrics import aggregate, binary_metrics, multiclass_metrics, regression_metrics
from volta3d.evaluation.results import FoldStore, save_run
from volta3d.evaluation.splits import fold_row_indices, make_holdout_split, nested_subsets
from volta3d.runtime import get_logger, seed_everything

REGRESSION_LOSSES = {"mse": nn.MSELoss, "l1": nn.L1Loss}


def balanced_class_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """w_c = n / (K * n_c) (scikit-learn's 'balanced'): each class carries equal total weight."""
    counts = np.bincount(targets, minlength=num_classes).astype(float)
    return np.where(counts > 0, len(targets) / (num_classes * np.maximum(counts, 1)), 0.0)


def _transforms(img_size: int | None, augment: bool, seed: int) -> tuple[Compose, Compose]:
    resize = [Resized(keys="image", spatial_size=(img_size,) * 3, mode="trilinear")] if img_size else []
    # RAS axis 0 is left-right: a mirror brain is still a brain of the same sex / diagnosis
    train = Compose([*resize, *([RandFlipd(keys="image", prob=0.5, spatial_axis=0)] if augment else [])])
    train.set_random_state(seed)
    return train, Compose(resize)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (N,) and raw model outputs (N, K) in loader order."""
    model.eval()
    idx, out = [], []
    for batch in loader:
        out.append(model(batch["image"].to(device)).float().cpu())
        idx.append(torch.as_tensor(batch["index"]))
    return torch.cat(idx).numpy(), torch.cat(out).numpy()


def output_scores(kind: str, outputs: np.ndarray, mu: float, sd: float) -> np.ndarray:
    if kind == "regression":
        return outputs[:, 0] * sd + mu
    return torch.softmax(torch.from_numpy(outputs), dim=1).numpy()


def fold_metrics(kind: str, y_test, s_test, y_thr, s_thr, positive: int = 1) -> dict[str, float]:
    """Metrics of the test fold; binary: class ``positive`` is the positive one, and the Youden
    threshold is fitted on ``(y_thr, s_thr)`` (the inner validation predictions)."""
    if kind == "binary":
        return binary_metrics((np.asarray(y_test) == positive).astype(int), s_test[:, positive],
                              (np.asarray(y_thr) == positive).astype(int), s_thr[:, positive])
    if kind == "multiclass":
        return multiclass_metrics(y_test, s_test)
    return regression_metrics(y_test, s_test)


def positive_index(labels: LabelSet, positive_class: Any | None) -> int:
    """Index of the positive class: ``positive_class`` (compared as text, so 1 and "1" agree) or,
    when None, the second sorted class."""
    if positive_class is None:
        return 1
    if labels.kind != "binary":
        raise ValueError(f"classify.positive_class applies to binary labels; '{labels.column}' is {labels.kind}")
    names = [str(c) for c in labels.classes]
    if str(positive_class) not in names:
        raise ValueError(f"classify.positive_class '{positive_class}' is not a class of '{labels.column}' "
                         f"(classes: {', '.join(names)})")
    return names.index(str(positive_class))


def threshold_split(labels: LabelSet, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_rows, threshold_rows)``: a stratified, subject-grouped inner hold-out of ``rows`` whose
    predictions fit the Youden threshold (binary labels only; otherwise no rows are held out)."""
    if labels.kind != "binary":
        return rows, rows[:0]
    subjects = labels.table["subject_id"].astype(str).to_numpy()
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"classify.youden_val_fraction must be in (0, 1) (got {fraction})")
    per_class = pd.Series(subjects[rows]).groupby(labels.targets[rows]).nunique()
    if len(per_class) < 2 or per_class.min() < 2:
        raise ValueError(f"the Youden validation split needs 2 subjects of each class among {len(rows)} training "
                         "scans; use more data or fewer folds")
    # stratification needs a subject of each class in every inner fold: at most min-class-count folds
    fraction = max(fraction, 1.0 / int(per_class.min()))
    inner = make_holdout_split(subjects[rows], labels.strata[rows], fraction=fraction, seed=seed)["folds"][0]
    held = np.isin(subjects[rows], inner["test"])
    fit, thr = rows[~held], rows[held]
    return fit, thr


def prediction_rows(labels: LabelSet, rows: np.ndarray, scores: np.ndarray, fold: int, fraction: float,
                    positive: int = 1) -> list[dict]:
    table = labels.table
    out = []
    for r, s in zip(rows, scores, strict=True):
        row: dict[str, Any] = {"subject_id": str(table.at[r, "subject_id"]), "fold": fold, "fraction": fraction}
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


def model_architecture(net: nn.Module, model: str, pooling: str) -> dict[str, Any]:
    """What a comparison needs to know was the same: the network's own recorded sizes."""
    if isinstance(net, ViTClassifier):
        summ = net.summariser.architecture if net.summariser is not None else None
        return {"model": model, "encoder": dict(net.encoder.architecture), "summariser": summ, "pooling": pooling}
    return {"model": model, **getattr(net, "architecture", {})}


def classifier_build(net: nn.Module, labels: LabelSet, model: str, pooling: str, img_size: int | None) -> dict:
    """What ``build_classifier`` needs to rebuild ``net`` without its encoder export."""
    if isinstance(net, ViTClassifier):
        summ = net.summariser.architecture if net.summariser is not None else None
        return {"model": model, "num_outputs": labels.num_outputs, "encoder_kwargs": dict(net.encoder.architecture),
                "summariser_kwargs": None if summ is None else {"num_heads": summ["num_heads"],
                                                                 "mlp_ratio": summ["mlp_ratio"]},
                "pooling": pooling, "img_size": img_size, "swin_kwargs": None}
    return {"model": model, "num_outputs": labels.num_outputs, "encoder_kwargs": None, "summariser_kwargs": None,
            "pooling": pooling, "img_size": img_size, "swin_kwargs": dict(net.architecture)}


def save_classifier(out_dir: str | Path, key: str, net: nn.Module, payload: dict[str, Any], labels: LabelSet,
                    setup: dict[str, Any], preprocessing: dict[str, Any] | None) -> None:
    """The fold's model and everything ``volta3d predict`` needs to apply it to new scans."""
    positive = setup["positive"]
    save_fold_model(out_dir, key, net, {
        "task": "classify", "kind": labels.kind, "label": labels.column, "classes": labels.classes,
        "positive_class": labels.classes[positive] if labels.kind == "binary" else None,
        "youden_threshold": payload["metrics"].get("youden_threshold"), "fold": payload["fold"],
        "fraction": payload["fraction"], "standardisation": payload.get("standardisation"),
        "build": classifier_build(net, labels, setup["model"], setup["pooling"], setup["img_size"]),
        "preprocessing": preprocessing, "encoder": str(setup["encoder"]) if setup["encoder"] else None,
    })  # fmt: skip


def effective_mode(mode: str, encoder: str | Path | None) -> str:
    """Frozen / partial transfer applies to a pretrained encoder; a scratch baseline always trains
    fully (a frozen random encoder is no baseline)."""
    if mode not in MODES:
        raise ValueError(f"classify.mode must be one of {MODES} (got '{mode}')")
    return mode if encoder is not None else "full"


def run_classification(
    labels: LabelSet,
    out_dir: str | Path,
    splits: dict[str, Any],
    *,
    model: str = "vit",
    encoder: str | Path | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    summariser_kwargs: dict[str, Any] | None = None,
    swin_kwargs: dict[str, Any] | None = None,
    pooling: str = "cls",
    mode: str = "full",
    unfreeze_last: int = 0,
    img_size: int | None = None,
    augment: bool = True,
    epochs: int = 50,
    batch_size: int = 2,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    class_weighting: bool = False,
    regression_loss: str = "mse",
    fractions: Sequence[float] = (1.0,),
    positive_class: Any | None = None,
    youden_val_fraction: float = 0.2,
    preprocessing: dict[str, Any] | None = None,
    test_set: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (fraction, fold), write ``results.json`` / ``predictions.csv`` into ``out_dir`` and
    return the results dictionary (format in ``volta3d.evaluation.results``)."""
    log = get_logger()
    if regression_loss not in REGRESSION_LOSSES:
        raise ValueError(f"classify.regression_loss must be one of {sorted(REGRESSION_LOSSES)} (got '{regression_loss}')")
    positive = positive_index(labels, positive_class)
    train_mode = effective_mode(mode, encoder)
    if train_mode != mode:
        log.info(f"classify.mode={mode} applies to pretrained encoders; the scratch baseline trains fully")
    table = labels.table
    fold_rows = fold_row_indices(splits, table["subject_id"].astype(str).tolist())
    fractions = sorted({float(f) for f in fractions})
    store = FoldStore(out_dir)
    setup = dict(
        model=model, encoder=encoder, encoder_kwargs=encoder_kwargs, summariser_kwargs=summariser_kwargs,
        swin_kwargs=swin_kwargs, pooling=pooling, mode=train_mode, unfreeze_last=unfreeze_last, img_size=img_size,
        augment=augment, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        class_weighting=class_weighting, regression_loss=regression_loss, positive=positive,
        device=torch.device(device), num_workers=num_workers, progress=progress,
    )  # fmt: skip
    model_name = f"{model}-{'pretrained' if encoder else 'scratch'}"
    per_fraction: dict[float, list[dict[str, Any]]] = {}
    architecture = None
    for k, (train_all, test_rows) in enumerate(fold_rows):
        subjects = table["subject_id"].astype(str).to_numpy()
        subsets = nested_subsets(subjects[train_all], labels.strata[train_all], fractions, seed=seed + k)
        for frac in fractions:
            key = f"fraction{frac:.2f}_fold{k}"
            if store.has(key):
                log.info(f"{key}: finished in an earlier run, skipped")
                per_fraction.setdefault(frac, []).append(store.load(key))
                continue
            train_rows = train_all[np.isin(subjects[train_all], subsets[frac])]
            if labels.kind != "regression" and len(np.unique(labels.targets[train_rows])) < 2:
                raise ValueError(f"fold {k} at fraction {frac} has one class in training; use more data or fewer folds")
            fit_rows, thr_rows = threshold_split(labels, train_rows, youden_val_fraction, seed + k)
            payload, net = train_fold(labels, key, k, frac, fit_rows, thr_rows, test_rows, seed=seed + k, **setup)
            architecture = model_architecture(net, model, pooling)
            save_classifier(out_dir, key, net, payload, labels, setup, preprocessing)
            store.save(key, payload)
            per_fraction.setdefault(frac, []).append(payload)

    results = assemble_results(labels, per_fraction, splits, model_name, encoder, seed, config)
    results["test"] = test_set or test_record(None)
    results.update(positive_class=labels.classes[positive] if labels.kind == "binary" else None, mode=train_mode)
    if labels.kind == "binary":
        results["youden_fit"] = {"source": "inner_validation", "fraction": youden_val_fraction,
                                 "note": "stratified subject-grouped hold-out of each fold's training side"}
    if architecture is None:  # every fold resumed: rebuild once to record the sizes
        architecture = model_architecture(_build(labels, **setup), model, pooling)
    results["architecture"] = architecture
    preds = pd.DataFrame([r for folds in per_fraction.values() for f in folds for r in f["predictions"]])
    save_run(out_dir, results, preds)
    return results


def _build(labels: LabelSet, *, model: str, encoder: str | Path | None, encoder_kwargs: dict[str, Any] | None,
           summariser_kwargs: dict[str, Any] | None, swin_kwargs: dict[str, Any] | None, pooling: str,
           img_size: int | None, **_: Any) -> nn.Module:
    """A fresh classifier for one fold (``setup`` carries more keys than the builder takes)."""
    return build_classifier(model, labels.num_outputs, encoder=encoder, encoder_kwargs=encoder_kwargs,
                            summariser_kwargs=summariser_kwargs, pooling=pooling, img_size=img_size,
                            swin_kwargs=swin_kwargs)


def train_fold(labels: LabelSet, key: str, k: int, frac: float, fit_rows: np.ndarray, thr_rows: np.ndarray,
               test_rows: np.ndarray, *, seed: int, **setup: Any) -> tuple[dict[str, Any], nn.Module]:
    """Train one fold's model on ``fit_rows``, fit the threshold on ``thr_rows``, score ``test_rows``;
    return the fold payload and the trained network."""
    log, kind, device = get_logger(), labels.kind, setup["device"]
    bs, workers = setup["batch_size"], setup["num_workers"]
    seed_everything(seed)
    train_tf, eval_tf = _transforms(setup["img_size"], setup["augment"], seed)
    train_ds, eval_ds = VolumeDataset(labels.table, transform=train_tf), VolumeDataset(labels.table, transform=eval_tf)
    train_loader = DataLoader(Subset(train_ds, fit_rows.tolist()), batch_size=bs, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), num_workers=workers,
                              drop_last=len(fit_rows) > bs)
    net = _build(labels, **setup)
    net.set_trainable(setup["mode"], setup["unfreeze_last"])
    net.to(device)
    targets = torch.from_numpy(np.array(labels.targets))  # a writable copy
    mu, sd = 0.0, 1.0
    if kind == "regression":
        # standardised targets: one learning rate suits ages and volumes alike
        mu, sd = float(labels.targets[fit_rows].mean()), float(labels.targets[fit_rows].std() or 1.0)
        criterion: nn.Module = REGRESSION_LOSSES[setup["regression_loss"]]()
    else:
        w = balanced_class_weights(labels.targets[fit_rows], labels.num_outputs) if setup["class_weighting"] else None
        criterion = nn.CrossEntropyLoss(weight=None if w is None else torch.tensor(w, dtype=torch.float32))
    criterion.to(device)

    def batch_loss(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = m(batch["image"].to(device))  # (B, C, D, H, W) -> (B, K)
        y = targets[torch.as_tensor(batch["index"])].to(device)
        return criterion(out[:, 0], (y.float() - mu) / sd) if kind == "regression" else criterion(out, y)

    log.info(f"{key}: training on {len(fit_rows)} scans (threshold {len(thr_rows)}), testing on {len(test_rows)}")
    fit = train_model(net, train_loader, batch_loss, epochs=setup["epochs"], lr=setup["lr"],
                      weight_decay=setup["weight_decay"], desc=key, progress=setup["progress"])

    def scores(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loader = DataLoader(Subset(eval_ds, rows.tolist()), batch_size=bs, num_workers=workers)
        idx, out = predict(net, loader, device)
        return idx, output_scores(kind, out, mu, sd)

    test_idx, s_test = scores(test_rows)
    thr_idx, s_thr = scores(thr_rows) if len(thr_rows) else (thr_rows, None)
    metrics = fold_metrics(kind, labels.targets[test_idx], s_test, labels.targets[thr_idx], s_thr, setup["positive"])
    log.info(f"{key}: " + ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if v is not None))
    subjects = labels.table["subject_id"].astype(str)
    payload = {
        "fold": k, "fraction": frac, "n_train": int(len(fit_rows)), "n_threshold": int(len(thr_rows)),
        "threshold_subjects": sorted(set(subjects.iloc[thr_rows])), "n_test": int(len(test_rows)),
        "metrics": metrics, "final_loss": fit["history"][-1]["loss"] if fit["history"] else None,
        "predictions": prediction_rows(labels, test_idx, s_test, k, frac, setup["positive"]),
    }  # fmt: skip
    if kind == "regression":
        payload["standardisation"] = {"mean": mu, "sd": sd}
    return payload, net


def assemble_results(labels: LabelSet, per_fraction: dict[float, list[dict]], splits: dict, model_name: str,
                     encoder: str | Path | None, seed: int, config: dict | None, task: str = "classify") -> dict[str, Any]:
    """The results dictionary from per-fold payloads (``{fraction: [payload, ...]}``)."""
    def summary(folds: list[dict]) -> dict[str, Any]:
        folds = sorted(folds, key=lambda f: f["fold"])
        slim = [{k: v for k, v in f.items() if k != "predictions"} for f in folds]
        return {"folds": slim, "aggregate": aggregate([f["metrics"] for f in folds])}

    top = max(per_fraction)
    results: dict[str, Any] = {
        "task": task,
        "kind": labels.kind,
        "label": labels.column,
        "classes": labels.classes,
        "dropped_rows": labels.dropped,
        "model": model_name,
        "encoder": str(encoder) if encoder else None,
        "seed": seed,
        "primary_metric": "mae" if labels.kind == "regression" else "auroc",
        "config": config or {},
        "splits": splits,
        **summary(per_fraction[top]),
    }
    if len(per_fraction) > 1:
        results["fractions"] = {f"{f:g}": summary(v) for f, v in sorted(per_fraction.items())}
    return results
