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

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.transforms import Compose, RandFlipd, Resized
from torch.utils.data import DataLoader, Subset

from volta3d.data.dataset import VolumeDataset
from volta3d.downstream.classifier import (
    Classifier,
    ClassifierSpec,
    SwinClassifier,
    ViTClassifier,
    classifier_from_spec,
    swin_kwargs,
)
from volta3d.downstream.external import test_record
from volta3d.downstream.loop import train_model
from volta3d.downstream.recipe import FinetuneRecipe
from volta3d.downstream.saved import save_fold_model
from volta3d.downstream.sfcn import SFCN, sfcn_kwargs
from volta3d.errors import InputError
from volta3d.protocol.cv import Fold, label_results, plan_folds, run_folds
from volta3d.protocol.labels import LabelSet
from volta3d.protocol.scoring import fold_metrics, positive_index, prediction_rows
from volta3d.protocol.splits import make_holdout_split
from volta3d.runtime import get_logger

__all__ = [
    "fold_metrics",
    "positive_index",
    "prediction_rows",
    "run_classification",
]  # scoring's, re-exported

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
    """Model outputs as scores: regression un-standardised to the label's units, classes as probabilities."""
    if kind == "regression":
        return outputs[:, 0] * sd + mu
    return torch.softmax(torch.from_numpy(outputs), dim=1).numpy()


def threshold_split(
    labels: LabelSet, rows: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_rows, threshold_rows)``: a stratified, subject-grouped inner hold-out of ``rows`` whose
    predictions fit the Youden threshold (binary labels only; otherwise no rows are held out)."""
    if labels.kind != "binary":
        return rows, rows[:0]
    subjects = labels.table["subject_id"].astype(str).to_numpy()
    if not 0.0 < fraction < 1.0:
        raise InputError(f"classify.youden_val_fraction must be in (0, 1) (got {fraction})")
    per_class = pd.Series(subjects[rows]).groupby(labels.targets[rows]).nunique()
    if len(per_class) < 2 or per_class.min() < 2:
        raise InputError(
            f"the Youden validation split needs 2 subjects of each class among {len(rows)} training "
            "scans; use more data or fewer folds"
        )
    # stratification needs a subject of each class in every inner fold: at most min-class-count folds
    fraction = max(fraction, 1.0 / int(per_class.min()))
    inner = make_holdout_split(subjects[rows], labels.strata[rows], fraction=fraction, seed=seed)["folds"][0]
    held = np.isin(subjects[rows], inner["test"])
    fit, thr = rows[~held], rows[held]
    return fit, thr


def model_architecture(net: nn.Module, model: str, pooling: str) -> dict[str, Any]:
    """What a comparison needs to know was the same: the network's own recorded sizes."""
    if isinstance(net, ViTClassifier):
        summ = net.summariser.architecture if net.summariser is not None else None
        return {
            "model": model,
            "encoder": dict(net.encoder.architecture),
            "summariser": summ,
            "pooling": pooling,
        }
    return {"model": model, **getattr(net, "architecture", {})}


def classifier_build(
    net: Classifier, labels: LabelSet, model: str, pooling: str, img_size: int | None
) -> dict:
    """What ``build_classifier`` needs to rebuild ``net`` without its encoder export."""
    if isinstance(net, ViTClassifier):
        summ = net.summariser.architecture if net.summariser is not None else None
        return {
            "model": model,
            "num_outputs": labels.num_outputs,
            "encoder_kwargs": dict(net.encoder.architecture),
            "summariser_kwargs": None
            if summ is None
            else {"num_heads": summ["num_heads"], "mlp_ratio": summ["mlp_ratio"]},
            "pooling": pooling,
            "img_size": img_size,
            "swin_kwargs": None,
            "sfcn_kwargs": None,
        }
    return {
        "model": model,
        "num_outputs": labels.num_outputs,
        "encoder_kwargs": None,
        "summariser_kwargs": None,
        "pooling": pooling,
        "img_size": img_size,
        "swin_kwargs": dict(net.architecture) if isinstance(net, SwinClassifier) else None,
        "sfcn_kwargs": dict(net.architecture) if isinstance(net, SFCN) else None,
    }


@dataclass(frozen=True)
class ClassifyRun:
    """What every fold of a classification (or regression) run shares: the ``classify:`` settings it
    uses, the recipe, the network's spec and where it trains."""

    model: str
    mode: str  # frozen / partial / full (full for a scratch network)
    unfreeze_last: int
    augment: bool
    epochs: int
    batch_size: int
    class_weighting: bool
    regression_loss: str
    num_workers: int
    recipe: FinetuneRecipe
    positive: int  # index of the positive class (binary labels)
    spec: ClassifierSpec
    device: torch.device
    progress: bool

    @property
    def encoder(self) -> str | Path | None:
        return self.spec.encoder

    def build(self) -> Classifier:
        """A fresh classifier for one fold."""
        return classifier_from_spec(self.model, self.spec)


def save_classifier(
    out_dir: str | Path,
    key: str,
    net: Classifier,
    payload: dict[str, Any],
    labels: LabelSet,
    run: ClassifyRun,
    preprocessing: dict[str, Any] | None,
) -> None:
    """The fold's model and everything ``volta3d predict`` needs to apply it to new scans."""
    positive = run.positive
    save_fold_model(out_dir, key, net, {
        "task": "classify", "kind": labels.kind, "label": labels.column, "classes": labels.classes,
        "positive_class": labels.classes[positive] if labels.kind == "binary" else None,
        "youden_threshold": payload["metrics"].get("youden_threshold"), "fold": payload["fold"],
        "fraction": payload["fraction"], "standardisation": payload.get("standardisation"),
        "build": classifier_build(net, labels, run.model, run.spec.pooling, run.spec.img_size),
        "preprocessing": preprocessing, "encoder": str(run.encoder) if run.encoder else None,
    })  # fmt: skip


def effective_mode(mode: str, encoder: str | Path | None) -> str:
    """Frozen / partial transfer applies to a pretrained encoder; a scratch baseline always trains
    fully (a frozen random encoder is no baseline). ``mode`` is ``classify.mode``, checked with the config."""
    return mode if encoder is not None else "full"


def run_classification(
    labels: LabelSet,
    out_dir: str | Path,
    splits: dict[str, Any],
    section: Mapping[str, Any],
    *,
    seed: int,
    device: str | torch.device,
    progress: bool,
    encoder: str | Path | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    summariser_kwargs: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    test_set: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (fraction, fold) of ``splits`` with the ``classify:`` config ``section`` (keys as in
    default.yaml), write ``results.json`` / ``predictions.csv`` into ``out_dir`` and return the results
    dictionary (layout in ``volta3d.protocol.cv``). Without ``encoder`` (an export to fine-tune) the
    model is built from scratch: a ViT from ``encoder_kwargs`` / ``summariser_kwargs``, a Swin from
    ``section["swin"]`` or an SFCN from ``section["sfcn"]``."""
    run = _setup(
        labels,
        section,
        encoder=encoder,
        encoder_kwargs=encoder_kwargs,
        summariser_kwargs=summariser_kwargs,
        device=device,
        progress=progress,
    )
    built: dict[str, Any] = {}

    def fit_fold(fold: Fold) -> dict[str, Any]:
        fit_rows, thr_rows = _fold_rows(labels, fold, section["youden_val_fraction"])
        payload, net = train_fold(labels, fold, fit_rows, thr_rows, run)
        built["architecture"] = model_architecture(net, run.model, run.spec.pooling)
        save_classifier(out_dir, fold.key, net, payload, labels, run, preprocessing)
        return payload

    per_fraction = run_folds(_plan(labels, splits, section, seed), fit_fold, out_dir=out_dir)
    if "architecture" not in built:  # every fold resumed: rebuild once to record the sizes
        built["architecture"] = model_architecture(run.build(), run.model, run.spec.pooling)
    extra = _results_extra(labels, run, section["youden_val_fraction"], test_set, built["architecture"])
    model_name = f"{run.model}-{'pretrained' if encoder else 'scratch'}"
    return label_results(
        labels,
        per_fraction,
        task="classify",
        model=model_name,
        encoder=encoder,
        seed=seed,
        config=config,
        splits=splits,
        **extra,
    ).save(out_dir)


def _plan(labels: LabelSet, splits: dict[str, Any], section: Mapping[str, Any], seed: int) -> list[Fold]:
    """The (fraction, fold) plan of ``splits``: nested training fractions, stratified by the label."""
    subjects = labels.table["subject_id"].astype(str).tolist()
    return plan_folds(splits, subjects, seed=seed, fractions=section["fractions"], strata=labels.strata)


def _setup(
    labels: LabelSet,
    section: Mapping[str, Any],
    *,
    encoder: str | Path | None,
    encoder_kwargs: dict[str, Any] | None,
    summariser_kwargs: dict[str, Any] | None,
    device: str | torch.device,
    progress: bool,
) -> ClassifyRun:
    """What every fold needs, checked before any fold runs (a bad class name fails at once)."""
    positive = positive_index(labels, section["positive_class"])
    train_mode = effective_mode(section["mode"], encoder)
    if train_mode != section["mode"]:
        get_logger().info(
            f"classify.mode={section['mode']} applies to pretrained encoders; "
            "the scratch baseline trains fully"
        )
    recipe = FinetuneRecipe.from_section(section)
    spec = ClassifierSpec(
        labels.num_outputs, section["pooling"], section["img_size"], encoder, encoder_kwargs, summariser_kwargs,
        swin_kwargs(**section["swin"]), sfcn_kwargs(**section["sfcn"]),
    )  # fmt: skip
    return ClassifyRun(
        model=section["model"], mode=train_mode, unfreeze_last=section["unfreeze_last"],
        augment=section["augment"], epochs=section["epochs"], batch_size=section["batch_size"],
        class_weighting=section["class_weighting"], regression_loss=section["regression_loss"],
        num_workers=section["num_workers"], recipe=recipe if encoder is not None else recipe.for_scratch(),
        positive=positive, spec=spec, device=torch.device(device), progress=progress,
    )  # fmt: skip


def _fold_rows(labels: LabelSet, fold: Fold, youden_val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(fit_rows, threshold_rows)`` of the fold's training side; a one-class training side is an error."""
    if labels.kind != "regression" and len(np.unique(labels.targets[fold.train])) < 2:
        raise InputError(
            f"fold {fold.index} at fraction {fold.fraction} has one class in training; "
            "use more data or fewer folds"
        )
    return threshold_split(labels, fold.train, youden_val_fraction, fold.seed)


def _results_extra(
    labels: LabelSet,
    run: ClassifyRun,
    youden_val_fraction: float,
    test_set: dict[str, Any] | None,
    architecture: dict[str, Any],
) -> dict[str, Any]:
    """The classification-only keys of results.json (see ``volta3d.protocol.cv``)."""
    binary = labels.kind == "binary"
    extra: dict[str, Any] = {
        "test": test_set or test_record(None),
        "positive_class": labels.classes[run.positive] if binary else None,
        "mode": run.mode,
    }
    if binary:
        extra["youden_fit"] = {
            "source": "inner_validation",
            "fraction": youden_val_fraction,
            "note": "stratified subject-grouped hold-out of each fold's training side",
        }
    extra["architecture"] = architecture
    return extra


def _criterion(labels: LabelSet, fit_rows: np.ndarray, run: ClassifyRun) -> tuple[nn.Module, float, float]:
    """The loss and the target standardisation ``(mean, sd)``: standardised regression targets let
    one learning rate suit ages and volumes alike; classes may be balanced (scikit-learn's weights)."""
    if labels.kind == "regression":
        mu, sd = float(labels.targets[fit_rows].mean()), float(labels.targets[fit_rows].std() or 1.0)
        return REGRESSION_LOSSES[run.regression_loss](), mu, sd
    w = balanced_class_weights(labels.targets[fit_rows], labels.num_outputs) if run.class_weighting else None
    return nn.CrossEntropyLoss(weight=None if w is None else torch.tensor(w, dtype=torch.float32)), 0.0, 1.0


def _fit(
    net: nn.Module,
    labels: LabelSet,
    key: str,
    fit_rows: np.ndarray,
    train_tf: Compose,
    seed: int,
    run: ClassifyRun,
) -> tuple[dict[str, Any], float, float]:
    """Train ``net`` on ``fit_rows``; return ``train_model``'s record and the target standardisation."""
    device, bs, kind = run.device, run.batch_size, labels.kind
    train_ds = VolumeDataset(labels.table, transform=train_tf)
    loader = DataLoader(
        Subset(train_ds, fit_rows.tolist()),
        batch_size=bs,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=run.num_workers,
        drop_last=len(fit_rows) > bs,
    )
    targets = torch.from_numpy(np.array(labels.targets))  # a writable copy
    criterion, mu, sd = _criterion(labels, fit_rows, run)
    criterion.to(device)

    def batch_loss(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = m(batch["image"].to(device))  # (B, C, D, H, W) -> (B, K)
        y = targets[torch.as_tensor(batch["index"])].to(device)
        return criterion(out[:, 0], (y.float() - mu) / sd) if kind == "regression" else criterion(out, y)

    fit = train_model(
        net,
        loader,
        batch_loss,
        epochs=run.epochs,
        recipe=run.recipe,
        num_layers=net.encoder.num_layers if isinstance(net, ViTClassifier) else 0,
        desc=key,
        progress=run.progress,
    )
    return fit, mu, sd


def train_fold(
    labels: LabelSet, fold: Fold, fit_rows: np.ndarray, thr_rows: np.ndarray, run: ClassifyRun
) -> tuple[dict[str, Any], Classifier]:
    """Train one fold's model on ``fit_rows``, fit the threshold on ``thr_rows``, score the fold's test
    rows; return the fold payload and the trained network."""
    log, kind, k, frac = get_logger(), labels.kind, fold.index, fold.fraction
    train_tf, eval_tf = _transforms(run.spec.img_size, run.augment, fold.seed)
    net = run.build()
    net.set_trainable(run.mode, run.unfreeze_last)
    if isinstance(net, ViTClassifier):
        net.encoder.set_drop_path(run.recipe.drop_path)
    net.to(run.device)
    log.info(
        f"{fold.key}: training on {len(fit_rows)} scans (threshold {len(thr_rows)}), "
        f"testing on {len(fold.test)}"
    )
    fit, mu, sd = _fit(net, labels, fold.key, fit_rows, train_tf, fold.seed, run)
    eval_ds = VolumeDataset(labels.table, transform=eval_tf)

    def scores(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        loader = DataLoader(
            Subset(eval_ds, rows.tolist()), batch_size=run.batch_size, num_workers=run.num_workers
        )
        idx, out = predict(net, loader, run.device)
        return idx, output_scores(kind, out, mu, sd)

    test_idx, s_test = scores(fold.test)
    # binary: the Youden threshold's inner split; regression: the training subjects, whose predictions fit
    # the brain-age gap's bias correction (never the test subjects' ages)
    held_in = fit_rows if kind == "regression" else thr_rows
    thr_idx, s_thr = scores(held_in) if len(held_in) else (held_in, None)
    metrics = fold_metrics(
        kind, labels.targets[test_idx], s_test, labels.targets[thr_idx], s_thr, run.positive
    )
    log.info(f"{fold.key}: " + ", ".join(f"{m} {v:.3f}" for m, v in metrics.items() if v is not None))
    subjects = labels.table["subject_id"].astype(str)
    payload = {
        "fold": k, "fraction": frac, "n_train": int(len(fit_rows)), "n_threshold": int(len(thr_rows)),
        "threshold_subjects": sorted(set(subjects.iloc[thr_rows])), "n_test": int(len(fold.test)),
        "metrics": metrics, "final_loss": fit["history"][-1]["loss"] if fit["history"] else None,
        "predictions": prediction_rows(labels, test_idx, s_test, k, frac, run.positive),
    }  # fmt: skip
    if kind == "regression":
        payload["standardisation"] = {"mean": mu, "sd": sd}
    return payload, net
