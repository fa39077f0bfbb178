"""Cross-validated classification / regression from a preprocessed manifest (paper II-C, III-A/B).

For every (training fraction, fold): build the model afresh (seeded), train on the fold's
training subjects (or a nested, stratified fraction of them), predict the test subjects, and
record metrics and per-subject predictions in ``folds/<key>.json`` so a rerun skips finished folds.
The Youden-J threshold is fitted on predictions for the fold's own training subjects.
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
from volta3d.downstream.classifier import build_classifier
from volta3d.downstream.labels import LabelSet
from volta3d.downstream.loop import train_model
from volta3d.evaluation.metrics import aggregate, binary_metrics, multiclass_metrics, regression_metrics
from volta3d.evaluation.results import FoldStore, save_run
from volta3d.evaluation.splits import fold_row_indices, nested_subsets
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


def fold_metrics(kind: str, y_test, s_test, y_train, s_train) -> dict[str, float]:
    if kind == "binary":
        return binary_metrics(y_test, s_test[:, 1], y_train, s_train[:, 1])
    if kind == "multiclass":
        return multiclass_metrics(y_test, s_test)
    return regression_metrics(y_test, s_test)


def prediction_rows(labels: LabelSet, rows: np.ndarray, scores: np.ndarray, fold: int, fraction: float) -> list[dict]:
    table = labels.table
    out = []
    for r, s in zip(rows, scores, strict=True):
        row: dict[str, Any] = {"subject_id": str(table.at[r, "subject_id"]), "fold": fold, "fraction": fraction}
        if labels.kind == "regression":
            row.update(y_true=float(labels.targets[r]), prediction=float(s))
        else:
            row.update(y_true=int(labels.targets[r]), label=labels.classes[labels.targets[r]])
            if labels.kind == "binary":
                row["score"] = float(s[1])
            else:
                row.update({f"score_{c}": float(p) for c, p in zip(labels.classes, s, strict=True)})
            row["prediction"] = labels.classes[int(np.argmax(s))]
        out.append(row)
    return out


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
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (fraction, fold), write ``results.json`` / ``predictions.csv`` into ``out_dir`` and
    return the results dictionary (format in ``volta3d.evaluation.results``)."""
    log = get_logger()
    device = torch.device(device)
    if regression_loss not in REGRESSION_LOSSES:
        raise ValueError(f"classify.regression_loss must be one of {sorted(REGRESSION_LOSSES)} (got '{regression_loss}')")
    table, kind = labels.table, labels.kind
    fold_rows = fold_row_indices(splits, table["subject_id"].astype(str).tolist())
    fractions = sorted({float(f) for f in fractions})
    store = FoldStore(out_dir)
    targets = torch.from_numpy(np.array(labels.targets))  # a writable copy
    model_name = f"{model}-{'pretrained' if encoder else 'scratch'}"

    per_fraction: dict[float, list[dict[str, Any]]] = {}
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
            if kind != "regression" and len(np.unique(labels.targets[train_rows])) < 2:
                raise ValueError(f"fold {k} at fraction {frac} has one class in training; use more data or fewer folds")
            seed_everything(seed + k)
            train_tf, eval_tf = _transforms(img_size, augment, seed + k)
            train_ds = VolumeDataset(table, transform=train_tf)
            eval_ds = VolumeDataset(table, transform=eval_tf)
            gen = torch.Generator().manual_seed(seed + k)
            train_loader = DataLoader(Subset(train_ds, train_rows.tolist()), batch_size=batch_size, shuffle=True,
                                      generator=gen, num_workers=num_workers, drop_last=len(train_rows) > batch_size)

            net = build_classifier(model, labels.num_outputs, encoder=encoder, encoder_kwargs=encoder_kwargs,
                                   summariser_kwargs=summariser_kwargs, pooling=pooling, img_size=img_size,
                                   swin_kwargs=swin_kwargs)
            net.set_trainable(mode, unfreeze_last)
            net.to(device)
            mu, sd = 0.0, 1.0
            if kind == "regression":
                # standardised targets: one learning rate suits ages and volumes alike
                mu, sd = float(labels.targets[train_rows].mean()), float(labels.targets[train_rows].std() or 1.0)
                criterion: nn.Module = REGRESSION_LOSSES[regression_loss]()
            else:
                w = balanced_class_weights(labels.targets[train_rows], labels.num_outputs) if class_weighting else None
                criterion = nn.CrossEntropyLoss(weight=None if w is None else torch.tensor(w, dtype=torch.float32))
            criterion.to(device)

            def batch_loss(m: nn.Module, batch: dict[str, Any], mu=mu, sd=sd, criterion=criterion) -> torch.Tensor:
                out = m(batch["image"].to(device))  # (B, C, D, H, W) -> (B, K)
                y = targets[torch.as_tensor(batch["index"])].to(device)
                if kind == "regression":
                    return criterion(out[:, 0], (y.float() - mu) / sd)
                return criterion(out, y)

            log.info(f"{key}: training {model_name} on {len(train_rows)} scans, testing on {len(test_rows)}")
            fit = train_model(net, train_loader, batch_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                              desc=key, progress=progress)

            def loader(rows: np.ndarray, eval_ds=eval_ds) -> DataLoader:
                return DataLoader(Subset(eval_ds, rows.tolist()), batch_size=batch_size, num_workers=num_workers)

            test_idx, test_out = predict(net, loader(test_rows), device)
            train_idx, train_out = predict(net, loader(train_rows), device)
            s_test, s_train = output_scores(kind, test_out, mu, sd), output_scores(kind, train_out, mu, sd)
            metrics = fold_metrics(kind, labels.targets[test_idx], s_test, labels.targets[train_idx], s_train)
            payload = {
                "fold": k, "fraction": frac, "n_train": int(len(train_rows)), "n_test": int(len(test_rows)),
                "metrics": metrics, "final_loss": fit["history"][-1]["loss"] if fit["history"] else None,
                "predictions": prediction_rows(labels, test_idx, s_test, k, frac),
            }
            store.save(key, payload)
            log.info(f"{key}: " + ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if v is not None))
            per_fraction.setdefault(frac, []).append(payload)

    results = assemble_results(labels, per_fraction, splits, model_name, encoder, seed, config)
    preds = pd.DataFrame([r for folds in per_fraction.values() for f in folds for r in f["predictions"]])
    save_run(out_dir, results, preds)
    return results


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
