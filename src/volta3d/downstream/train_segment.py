"""Segmentation training and evaluation (paper II-C, III-C) on the manifest's ``label_path`` masks.

Per fold: train on foreground-sampled random crops (MONAI ``RandCropByPosNegLabeld``) with
Dice + cross-entropy (background excluded from the Dice term); pick the best epoch by Dice on
validation subjects carved from the TRAINING side (the test subjects never choose the model);
predict whole test volumes with sliding-window inference; report Dice and HD95 (mm) per structure
and subject. The chosen checkpoint is kept as ``fold<k>_best.pt``; each test subject's predicted label
map is kept as ``predictions/<file>.npy`` (uint8 (D, H, W) on the preprocessed grid), listed with its
scan and ground-truth paths in ``predictions/index.csv``, so a report can draw overlays; the fold's
network is also saved as ``models/<key>/`` (safetensors + JSON) for ``volta3d predict``. A left-right
flipped crop swaps the label values of ``flip_label_pairs`` (left / right structures).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.data import list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose, Lambdad, RandCropByPosNegLabeld, SpatialPadd
from torch.utils.data import DataLoader, Subset

from volta3d.data.dataset import VolumeDataset
from volta3d.downstream.external import test_record
from volta3d.downstream.flip import RandLeftRightFlipd, check_label_pairs
from volta3d.downstream.loop import train_model
from volta3d.downstream.saved import save_fold_model
from volta3d.downstream.segmenter import UNETR_LAYERS, UNETR_PATCH, build_segmenter
from volta3d.evaluation.metrics import aggregate, segmentation_metrics
from volta3d.evaluation.results import FoldStore, save_run
from volta3d.evaluation.splits import fold_row_indices, make_holdout_split
from volta3d.models.export import encoder_kwargs_from_meta, read_encoder_export
from volta3d.runtime import get_logger, seed_everything


def _with_channel(mask: torch.Tensor) -> torch.Tensor:
    """Masks may be cached as (D, H, W) or (1, D, H, W); the models want (1, D, H, W)."""
    return mask if mask.ndim == 4 else mask[None]


def check_mask_classes(label_paths: Sequence[str], num_classes: int | None) -> int:
    """Number of classes (incl. background) the masks use; an error names a mask whose labels do
    not fit the declared ``num_classes``."""
    highest = 0
    for p in label_paths:
        values = np.unique(np.load(p))
        if values.min() < 0:
            raise ValueError(f"mask {p} has negative label {int(values.min())}")
        if num_classes is not None and values.max() >= num_classes:
            raise ValueError(
                f"mask {p} has label {int(values.max())} but segment.num_classes={num_classes} (labels 0..{num_classes - 1})"
            )
        highest = max(highest, int(values.max()))
    if num_classes is None:
        num_classes = highest + 1
    if num_classes < 2:
        raise ValueError("the masks hold no foreground label (only 0); nothing to segment")
    return num_classes


def _infer(model: nn.Module, image: torch.Tensor, crop: int, sw_batch_size: int, overlap: float) -> torch.Tensor:
    """Whole-volume labels by sliding-window inference: (1, C, D, H, W) -> (1, 1, D, H, W)."""
    logits = sliding_window_inference(image, (crop,) * 3, sw_batch_size, model, overlap=overlap)
    return logits.argmax(1, keepdim=True)


def effective_unetr_kwargs(encoder: str | Path | None, unetr_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``build_unetr`` keyword arguments as built: with an export, its ViT sizes replace the given ones."""
    arch = dict(unetr_kwargs or {})
    if encoder is not None:
        meta = encoder_kwargs_from_meta(read_encoder_export(encoder)[1])
        arch.update({k: meta[k] for k in ("hidden_size", "mlp_dim", "num_heads", "qkv_bias", "input_norm")})
    return arch


def save_segmenter(out_dir: str | Path, key: str, net: nn.Module, fold: int, num_classes: int, *, model: str,
                   encoder: str | Path | None, unetr_kwargs: dict | None, unet_kwargs: dict | None, crop_size: int,
                   sw_batch_size: int, sw_overlap: float, preprocessing: dict[str, Any] | None) -> None:
    """The fold's model and what ``volta3d predict`` needs to segment new scans with it."""
    save_fold_model(out_dir, key, net, {
        "task": "segment", "kind": "segmentation", "classes": list(range(num_classes)), "fold": fold,
        "fraction": 1.0, "build": {"model": model, "in_channels": 1, "out_channels": num_classes,
                                   "img_size": crop_size, "unetr_kwargs": effective_unetr_kwargs(encoder, unetr_kwargs),
                                   "unet_kwargs": dict(unet_kwargs or {})},
        "inference": {"crop_size": crop_size, "sw_batch_size": sw_batch_size, "sw_overlap": sw_overlap},
        "preprocessing": preprocessing, "encoder": str(encoder) if encoder else None,
    })  # fmt: skip


def segmenter_architecture(net: nn.Module, model: str, encoder: str | Path | None, num_classes: int, crop_size: int,
                           unetr_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The sizes that must agree for two segmenters to be a fair comparison."""
    if model == "unet":
        return {"model": "unet", "channels": list(net.channels), "strides": list(net.strides),
                "num_res_units": int(net.num_res_units), "out_channels": num_classes}
    arch = effective_unetr_kwargs(encoder, unetr_kwargs)
    return {"model": "unetr", **arch, "patch_size": UNETR_PATCH, "num_layers": UNETR_LAYERS,
            "img_size": crop_size, "out_channels": num_classes}


PREDICTIONS_DIR = "predictions"


def prediction_file(subject_id: str, row: int, n_scans: int) -> str:
    """``<subject_id>.npy``; a subject with several scans gets the manifest row appended."""
    return f"{subject_id}.npy" if n_scans == 1 else f"{subject_id}_row{row}.npy"


def _evaluate(model: nn.Module, dataset: VolumeDataset, rows: Sequence[int], num_classes: int, crop: int,
              sw_batch_size: int, overlap: float, spacing: Sequence[float], device: torch.device,
              save_as: dict[int, Path] | None = None) -> list[dict]:
    """Per-subject metrics for ``rows``; ``save_as`` maps a row to the .npy file for its prediction."""
    model.eval()
    out = []
    with torch.no_grad():
        for r in rows:
            item = dataset[int(r)]
            pred = _infer(model, item["image"][None].to(device), crop, sw_batch_size, overlap).cpu()
            if save_as is not None:
                save_as[int(r)].parent.mkdir(parents=True, exist_ok=True)
                np.save(save_as[int(r)], pred[0, 0].numpy().astype(np.uint8))  # (1, 1, D, H, W) -> (D, H, W)
            m = segmentation_metrics(pred, item["mask"][None], num_classes, spacing)
            row: dict[str, Any] = {"subject_id": item["subject_id"]}
            for c in range(1, num_classes):
                row[f"dice_label{c}"] = float(m["dice"][0, c - 1])
                row[f"hd95_label{c}"] = float(m["hd95"][0, c - 1])
            row["dice_mean"] = float(np.nanmean(m["dice"][0])) if np.isfinite(m["dice"][0]).any() else float("nan")
            row["hd95_mean"] = float(np.nanmean(m["hd95"][0])) if np.isfinite(m["hd95"][0]).any() else float("nan")
            out.append(row)
    return out


def run_segmentation(
    table: pd.DataFrame,
    out_dir: str | Path,
    splits: dict[str, Any],
    *,
    model: str = "unetr",
    encoder: str | Path | None = None,
    num_classes: int | None = None,
    unetr_kwargs: dict[str, Any] | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    crop_size: int = 96,
    samples_per_volume: int = 2,
    pos_fraction: float = 0.5,
    epochs: int = 500,
    batch_size: int = 2,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    val_every: int = 10,
    val_fraction: float = 0.1,
    sw_batch_size: int = 4,
    sw_overlap: float = 0.25,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    flip_label_pairs: Sequence[Sequence[int]] | None = None,
    preprocessing: dict[str, Any] | None = None,
    test_set: dict[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every fold of ``splits``; write results.json / predictions.csv into
    ``out_dir``; return the results dictionary."""
    log = get_logger()
    device = torch.device(device)
    table = table.reset_index(drop=True)
    num_classes = check_mask_classes(table["label_path"].tolist(), num_classes)
    label_pairs = check_label_pairs(flip_label_pairs, num_classes)
    subjects = table["subject_id"].astype(str).to_numpy()
    store = FoldStore(out_dir)
    model_name = f"{model}-{'pretrained' if encoder else 'scratch'}"
    crop = (crop_size,) * 3
    keys = ["image", "mask"]
    eval_ds = VolumeDataset(table, with_mask=True, transform=Lambdad("mask", _with_channel))
    n_scans = pd.Series(subjects).value_counts()
    pred_dir = Path(out_dir) / PREDICTIONS_DIR
    folds, index = [], []
    for k, (train_all, test_rows) in enumerate(fold_row_indices(splits, subjects)):
        key = f"fold{k}"
        save_as = {int(r): pred_dir / prediction_file(subjects[r], int(r), int(n_scans[subjects[r]])) for r in test_rows}
        index += [{"subject_id": subjects[r], "fold": k, "image": table.at[r, "path"], "label": table.at[r, "label_path"],
                   "prediction": save_as[r].name} for r in save_as]  # fmt: skip
        if store.has(key):
            log.info(f"{key}: finished in an earlier run, skipped")
            folds.append(store.load(key))
            continue
        # -- validation subjects for best-epoch selection come out of the training side
        train_rows, val_rows = train_all, np.array([], dtype=int)
        if val_fraction > 0 and len(set(subjects[train_all])) >= 4:
            inner = make_holdout_split(subjects[train_all], None, fraction=val_fraction, seed=seed + k)["folds"][0]
            val_rows = train_all[np.isin(subjects[train_all], inner["test"])]
            train_rows = train_all[np.isin(subjects[train_all], inner["train"])]
        seed_everything(seed + k)
        train_tf = Compose([
            Lambdad("mask", _with_channel),
            SpatialPadd(keys, crop),
            RandCropByPosNegLabeld(keys, label_key="mask", spatial_size=crop, pos=pos_fraction,
                                   neg=1.0 - pos_fraction, num_samples=samples_per_volume),
            RandLeftRightFlipd(keys, "mask", label_pairs, prob=0.5),
        ])  # fmt: skip
        train_tf.set_random_state(seed + k)
        train_ds = VolumeDataset(table, with_mask=True, transform=train_tf)
        loader = DataLoader(Subset(train_ds, train_rows.tolist()), batch_size=batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed + k), collate_fn=list_data_collate,
                            num_workers=num_workers)
        net = build_segmenter(model, 1, num_classes, crop_size, encoder=encoder,
                              unetr_kwargs=unetr_kwargs, unet_kwargs=unet_kwargs).to(device)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

        def batch_loss(m: nn.Module, batch: dict[str, Any], loss_fn=loss_fn) -> torch.Tensor:
            # (B * samples, 1, d, h, w) crops -> (B * samples, K, d, h, w) logits
            return loss_fn(m(batch["image"].to(device)), batch["mask"].to(device))

        def validate(m: nn.Module, val_rows=val_rows) -> float:
            rows = _evaluate(m, eval_ds, val_rows, num_classes, crop_size, sw_batch_size, sw_overlap, spacing, device)
            return float(np.nanmean([r["dice_mean"] for r in rows]))

        log.info(f"{key}: training {model_name} on {len(train_rows)} scans (validation {len(val_rows)}, "
                 f"test {len(test_rows)}), {num_classes} classes")
        fit = train_model(net, loader, batch_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                          validate=validate if len(val_rows) else None, val_every=val_every, desc=key,
                          progress=progress)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        torch.save({k2: v.cpu() for k2, v in net.state_dict().items()}, Path(out_dir) / f"{key}_best.pt")
        rows = _evaluate(net, eval_ds, test_rows, num_classes, crop_size, sw_batch_size, sw_overlap, spacing, device,
                         save_as=save_as)
        save_segmenter(out_dir, key, net, k, num_classes, model=model, encoder=encoder, unetr_kwargs=unetr_kwargs,
                       unet_kwargs=unet_kwargs, crop_size=crop_size, sw_batch_size=sw_batch_size,
                       sw_overlap=sw_overlap, preprocessing=preprocessing)
        for r in rows:
            r["fold"] = k
        per_metric = pd.DataFrame(rows).drop(columns=["subject_id", "fold"]).mean(skipna=True).to_dict()
        metrics = {"dice": per_metric.pop("dice_mean"), "hd95": per_metric.pop("hd95_mean"), **per_metric}
        payload = {"fold": k, "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
                   "n_test": int(len(test_rows)), "best_epoch": fit["best_epoch"], "metrics": metrics,
                   "predictions": rows}
        store.save(key, payload)
        log.info(f"{key}: Dice {metrics['dice']:.3f}, HD95 {metrics['hd95']:.2f} mm (best epoch {fit['best_epoch']})")
        folds.append(payload)

    folds.sort(key=lambda f: f["fold"])
    arch_net = build_segmenter(model, 1, num_classes, crop_size, unetr_kwargs=unetr_kwargs, unet_kwargs=unet_kwargs)
    results = {
        "task": "segment", "kind": "segmentation", "label": "label_path",
        "classes": list(range(num_classes)), "model": model_name, "encoder": str(encoder) if encoder else None,
        "architecture": segmenter_architecture(arch_net, model, encoder, num_classes, crop_size, unetr_kwargs),
        "test": test_set or test_record(None), "flip_label_pairs": [list(p) for p in label_pairs],
        "seed": seed, "primary_metric": "dice", "config": config or {}, "splits": splits,
        "folds": [{k2: v for k2, v in f.items() if k2 != "predictions"} for f in folds],
        "aggregate": aggregate([f["metrics"] for f in folds]),
    }  # fmt: skip
    preds = pd.DataFrame([r for f in folds for r in f["predictions"]])
    save_run(out_dir, results, preds)
    # folds finished by an earlier version of this code may lack their files: list only what exists
    pred_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r for r in index if (pred_dir / r["prediction"]).exists()],
                 columns=["subject_id", "fold", "image", "label", "prediction"]).to_csv(pred_dir / "index.csv", index=False)
    return results
