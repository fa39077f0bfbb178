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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.data import list_data_collate
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import Compose, Lambdad, RandCropByPosNegLabeld, SpatialPadd
from torch.utils.data import DataLoader, Subset

from volta3d import layout
from volta3d.data.cache import volume_spacing
from volta3d.data.dataset import VolumeDataset, load_volume
from volta3d.downstream.external import test_record
from volta3d.downstream.flip import RandLeftRightFlipd, check_label_pairs
from volta3d.downstream.loop import train_model
from volta3d.downstream.recipe import FinetuneRecipe
from volta3d.downstream.saved import save_fold_model
from volta3d.downstream.segmenter import AnyPatchUNETR, build_segmenter
from volta3d.errors import InputError
from volta3d.models.export import encoder_kwargs_from_meta, read_encoder_meta
from volta3d.protocol.cv import Fold, RunResults, plan_folds, run_folds
from volta3d.protocol.metrics import segmentation_metrics
from volta3d.protocol.splits import make_holdout_split
from volta3d.runtime import get_logger


def _with_channel(mask: torch.Tensor) -> torch.Tensor:
    """Masks may be cached as (D, H, W) or (1, D, H, W); the models want (1, D, H, W)."""
    return mask if mask.ndim == 4 else mask[None]


def check_mask_classes(label_paths: Sequence[str], num_classes: int | None) -> int:
    """Number of classes (incl. background) the masks use; an error names a mask whose labels do
    not fit the declared ``num_classes``, or that skips a label (0 / 3: classes 1 and 2 would never be seen)."""
    seen: dict[int, str] = {}  # label -> the first mask holding it
    for p in label_paths:
        values = np.unique(load_volume(p))  # a truncated mask: one line naming it
        if values.min() < 0:
            raise InputError(f"mask {p} has negative label {int(values.min())}")
        if num_classes is not None and values.max() >= num_classes:
            raise InputError(
                f"mask {p} has label {int(values.max())} but segment.num_classes={num_classes} (labels 0..{num_classes - 1})"
            )
        seen.update({int(v): str(p) for v in values if int(v) not in seen})
    highest = max(seen, default=0)
    gap = sorted(set(range(highest)) - set(seen))
    if gap:
        raise InputError(f"mask {seen[highest]} has label {highest} but no mask has label {gap[0]}: labels must "
                         "be contiguous 0..K; relabel the masks and re-run volta3d preprocess")  # fmt: skip
    if num_classes is None:
        num_classes = highest + 1
    if num_classes < 2:
        raise InputError("the masks hold no foreground label (only 0); nothing to segment")
    return num_classes


def _infer(
    model: nn.Module, image: torch.Tensor, crop: int, sw_batch_size: int, overlap: float
) -> torch.Tensor:
    """Whole-volume labels by sliding-window inference: (1, C, D, H, W) -> (1, 1, D, H, W)."""
    # declared Tensor | tuple | dict (for models with several outputs); a segmenter returns one tensor
    logits = cast(
        torch.Tensor, sliding_window_inference(image, (crop,) * 3, sw_batch_size, model, overlap=overlap)
    )
    return logits.argmax(1, keepdim=True)


def effective_unetr_kwargs(encoder: str | Path | None, unetr_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``build_unetr`` keyword arguments as built: with an export, its ViT sizes replace the given ones."""
    arch = dict(unetr_kwargs or {})
    if encoder is not None:
        meta = encoder_kwargs_from_meta(read_encoder_meta(encoder))
        sizes = ("patch_size", "num_layers", "hidden_size", "mlp_dim", "num_heads", "qkv_bias", "input_norm")
        arch.update({k: meta[k] for k in sizes})
    return arch


def save_segmenter(
    out_dir: str | Path,
    key: str,
    net: nn.Module,
    fold: int,
    num_classes: int,
    *,
    model: str,
    encoder: str | Path | None,
    unetr_kwargs: dict | None,
    unet_kwargs: dict | None,
    crop_size: int,
    sw_batch_size: int,
    sw_overlap: float,
    preprocessing: dict[str, Any] | None,
) -> None:
    """The fold's model and what ``volta3d predict`` needs to segment new scans with it."""
    save_fold_model(out_dir, key, net, {
        "task": "segment", "kind": "segmentation", "classes": list(range(num_classes)), "fold": fold,
        "fraction": 1.0, "build": {"model": model, "in_channels": 1, "out_channels": num_classes,
                                   "img_size": crop_size, "unetr_kwargs": effective_unetr_kwargs(encoder, unetr_kwargs),
                                   "unet_kwargs": dict(unet_kwargs or {})},
        "inference": {"crop_size": crop_size, "sw_batch_size": sw_batch_size, "sw_overlap": sw_overlap},
        "preprocessing": preprocessing, "encoder": str(encoder) if encoder else None,
    })  # fmt: skip


def segmenter_architecture(
    net: nn.Module,
    model: str,
    encoder: str | Path | None,
    num_classes: int,
    crop_size: int,
    unetr_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """The sizes that must agree for two segmenters to be a fair comparison."""
    if model == "unet":
        unet = cast(UNet, net)
        return {
            "model": "unet",
            "channels": list(unet.channels),
            "strides": list(unet.strides),
            "num_res_units": int(unet.num_res_units),
            "out_channels": num_classes,
        }
    unetr = cast(AnyPatchUNETR, net)  # its patch and depth where neither an export nor the kwargs set them
    return {
        "model": "unetr",
        "patch_size": unetr.patch_size,
        "num_layers": unetr.num_layers,
        **effective_unetr_kwargs(encoder, unetr_kwargs),
        "img_size": crop_size,
        "out_channels": num_classes,
    }


PREDICTIONS_DIR = "predictions"


def prediction_file(subject_id: str, row: int, n_scans: int) -> str:
    """``<subject_id>.npy``; a subject with several scans gets the manifest row appended."""
    return f"{subject_id}.npy" if n_scans == 1 else f"{subject_id}_row{row}.npy"


def scan_spacings(table: pd.DataFrame, explicit: Sequence[float] | None) -> np.ndarray:
    """Voxel size (mm) per manifest row, ``(N, 3)``, for HD95 in mm: read from each scan's preprocessing
    record; ``explicit`` (``segment.spacing``) serves scans without one and must agree with those that
    have one. Without either, 1 mm voxels are assumed (with a warning)."""
    found = [volume_spacing(p) for p in table["path"]]
    fallback = tuple(float(v) for v in explicit) if explicit is not None else (1.0, 1.0, 1.0)
    for path, spacing in zip(table["path"], found, strict=True):
        if explicit is not None and spacing is not None and not np.allclose(spacing, fallback, rtol=1e-3):
            raise InputError(
                f"segment.spacing={list(fallback)} disagrees with the preprocessed spacing "
                f"{[round(v, 4) for v in spacing]} of {path}; drop segment.spacing (it is read "
                "from the preprocessing records)"
            )
    missing = sum(s is None for s in found)
    if missing and explicit is None:
        get_logger().warning(
            f"{missing} scan(s) have no preprocessing record: HD95 assumes 1 mm voxels (set segment.spacing)"
        )
    return np.array([s if s is not None else fallback for s in found], dtype=float)


@dataclass
class SegmentRun:
    """What every fold of a segmentation run shares: the data, the ``segment:`` section and the model."""

    table: pd.DataFrame
    section: Mapping[str, Any]
    num_classes: int
    label_pairs: list[tuple[int, int]]
    encoder: str | Path | None
    unetr_kwargs: dict[str, Any] | None
    unet_kwargs: dict[str, Any]
    spacing: np.ndarray
    device: torch.device
    progress: bool

    @property
    def subjects(self) -> np.ndarray:
        return self.table["subject_id"].astype(str).to_numpy()

    @property
    def model_name(self) -> str:
        return f"{self.section['model']}-{'pretrained' if self.encoder else 'scratch'}"

    def evaluate(
        self, model: nn.Module, rows: Sequence[int] | np.ndarray, save_as: dict[int, Path] | None = None
    ) -> list[dict]:
        """Per-subject Dice / HD95 for ``rows``; ``save_as`` maps a row to the .npy file for its prediction."""
        s = self.section
        # MONAI types a dictionary transform's input as Mapping[Hashable, ...], which a str-keyed dict does not match
        dataset = VolumeDataset(self.table, with_mask=True, transform=Lambdad("mask", _with_channel))  # type: ignore[arg-type]
        model.eval()
        out = []
        with torch.no_grad():
            for r in rows:
                item = dataset[int(r)]
                pred = _infer(
                    model,
                    item["image"][None].to(self.device),
                    s["crop_size"],
                    s["sw_batch_size"],
                    s["sw_overlap"],
                ).cpu()
                if save_as is not None:
                    save_as[int(r)].parent.mkdir(parents=True, exist_ok=True)
                    np.save(
                        save_as[int(r)], pred[0, 0].numpy().astype(np.uint8)
                    )  # (1, 1, D, H, W) -> (D, H, W)
                m = segmentation_metrics(
                    pred, item["mask"][None], self.num_classes, tuple(self.spacing[int(r)])
                )
                out.append(_subject_row(item["subject_id"], m, self.num_classes))
        return out

    def build(self, encoder: str | Path | None) -> nn.Module:
        """A fresh segmenter (from the export ``encoder``, or untrained with None)."""
        return build_segmenter(
            self.section["model"],
            1,
            self.num_classes,
            self.section["crop_size"],
            encoder=encoder,
            unetr_kwargs=self.unetr_kwargs,
            unet_kwargs=self.unet_kwargs,
        )


def _subject_row(subject_id: str, m: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """One ``predictions.csv`` row: Dice / HD95 per foreground label and their means."""
    row: dict[str, Any] = {"subject_id": subject_id}
    for c in range(1, num_classes):
        row[f"dice_label{c}"] = float(m["dice"][0, c - 1])
        row[f"hd95_label{c}"] = float(m["hd95"][0, c - 1])
    row["dice_mean"] = float(np.nanmean(m["dice"][0])) if np.isfinite(m["dice"][0]).any() else float("nan")
    row["hd95_mean"] = float(np.nanmean(m["hd95"][0])) if np.isfinite(m["hd95"][0]).any() else float("nan")
    return row


def _inner_split(run: SegmentRun, fold: Fold) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, val_rows)``: validation subjects for best-epoch selection come out of the
    TRAINING side, so the test subjects never choose the model."""
    subjects, train_all, val_fraction = run.subjects, fold.train, run.section["val_fraction"]
    if val_fraction > 0 and len(set(subjects[train_all])) >= 4:
        inner = make_holdout_split(subjects[train_all], None, fraction=val_fraction, seed=fold.seed)["folds"][
            0
        ]
        return (
            train_all[np.isin(subjects[train_all], inner["train"])],
            train_all[np.isin(subjects[train_all], inner["test"])],
        )
    return train_all, np.array([], dtype=int)


def _train_loader(run: SegmentRun, rows: np.ndarray, seed: int) -> DataLoader:
    """Foreground-sampled random crops (MONAI ``RandCropByPosNegLabeld``), flipped left-right with
    the label pairs swapped."""
    s, keys, crop = run.section, ["image", "mask"], (run.section["crop_size"],) * 3
    train_tf = Compose([
        Lambdad("mask", _with_channel),
        SpatialPadd(keys, crop),
        RandCropByPosNegLabeld(keys, label_key="mask", spatial_size=crop, pos=s["pos_fraction"],
                               neg=1.0 - s["pos_fraction"], num_samples=s["samples_per_volume"]),
        RandLeftRightFlipd(keys, "mask", run.label_pairs, prob=0.5),
    ])  # fmt: skip
    train_tf.set_random_state(seed)
    train_ds = VolumeDataset(run.table, with_mask=True, transform=train_tf)
    return DataLoader(
        Subset(train_ds, rows.tolist()),
        batch_size=s["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=list_data_collate,
        num_workers=s["num_workers"],
    )


def _train(
    run: SegmentRun, fold: Fold, train_rows: np.ndarray, val_rows: np.ndarray
) -> tuple[nn.Module, dict]:
    """Train one fold's segmenter with Dice + cross-entropy (background out of the Dice term); the
    weights of the best validation-Dice epoch are kept (MONAI UNETR BTCV tutorial)."""
    s, device = run.section, run.device
    loader = _train_loader(run, train_rows, fold.seed)
    net = run.build(run.encoder).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)

    def batch_loss(m: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        # (B * samples, 1, d, h, w) crops -> (B * samples, K, d, h, w) logits
        return loss_fn(m(batch["image"].to(device)), batch["mask"].to(device))

    def validate(m: nn.Module) -> float:
        return float(np.nanmean([r["dice_mean"] for r in run.evaluate(m, val_rows)]))

    get_logger().info(
        f"{fold.key}: training {run.model_name} on {len(train_rows)} scans (validation "
        f"{len(val_rows)}, test {len(fold.test)}), {run.num_classes} classes"
    )
    fit = train_model(
        net,
        loader,
        batch_loss,
        epochs=s["epochs"],
        recipe=FinetuneRecipe.plain(s["lr"], s["weight_decay"]),
        validate=validate if len(val_rows) else None,
        val_every=s["val_every"],
        desc=fold.key,
        progress=run.progress,
    )
    return net, fit


def _prediction_files(run: SegmentRun, fold: Fold, pred_dir: Path) -> dict[int, Path]:
    """Where each test row's predicted label map is saved."""
    subjects = run.subjects
    n_scans = pd.Series(subjects).value_counts()
    return {
        int(r): pred_dir / prediction_file(subjects[r], int(r), int(n_scans[subjects[r]])) for r in fold.test
    }


def _write_prediction_index(run: SegmentRun, plan: Sequence[Fold], pred_dir: Path) -> None:
    """``predictions/index.csv``: each test scan, its mask and its saved prediction; folds finished by
    an earlier version of this code may lack their files, so only what exists is listed."""
    subjects, table = run.subjects, run.table
    index = [{"subject_id": subjects[r], "fold": fold.index, "image": table.at[r, "path"],
              "label": table.at[r, "label_path"], "prediction": path.name}
             for fold in plan for r, path in _prediction_files(run, fold, pred_dir).items()]  # fmt: skip
    pred_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        [r for r in index if (pred_dir / r["prediction"]).exists()],
        columns=["subject_id", "fold", "image", "label", "prediction"],
    ).to_csv(pred_dir / layout.SEGMENT_INDEX, index=False)


def run_segmentation(
    table: pd.DataFrame,
    out_dir: str | Path,
    splits: dict[str, Any],
    section: Mapping[str, Any],
    *,
    seed: int,
    device: str | torch.device,
    progress: bool,
    encoder: str | Path | None = None,
    unetr_kwargs: dict[str, Any] | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    test_set: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every fold of ``splits`` with the ``segment:`` config ``section`` (keys as in
    default.yaml); write results.json / predictions.csv into ``out_dir``; return the results dictionary.
    ``unet_kwargs`` default to ``{"num_res_units": section["unet_res_units"]}``."""
    table = table.reset_index(drop=True)
    num_classes = check_mask_classes(table["label_path"].tolist(), section["num_classes"])
    run = SegmentRun(table=table, section=section, num_classes=num_classes,
                     label_pairs=check_label_pairs(section["flip_label_pairs"], num_classes), encoder=encoder,
                     unetr_kwargs=unetr_kwargs, spacing=scan_spacings(table, section["spacing"]),
                     unet_kwargs=dict(unet_kwargs or {"num_res_units": section["unet_res_units"]}),
                     device=torch.device(device), progress=progress)  # fmt: skip
    pred_dir = Path(out_dir) / PREDICTIONS_DIR

    def fit_fold(fold: Fold) -> dict[str, Any]:
        train_rows, val_rows = _inner_split(run, fold)
        net, fit = _train(run, fold, train_rows, val_rows)
        rows = run.evaluate(net, fold.test, save_as=_prediction_files(run, fold, pred_dir))
        _save_fold_model(Path(out_dir), run, fold, net, unetr_kwargs, preprocessing)
        return _fold_payload(fold, train_rows, val_rows, fit, rows)

    plan = plan_folds(splits, run.subjects, seed=seed)
    per_fraction = run_folds(plan, fit_fold, out_dir=out_dir)
    architecture = segmenter_architecture(
        run.build(None), section["model"], encoder, num_classes, section["crop_size"], unetr_kwargs
    )
    results = RunResults(
        task="segment", kind="segmentation", label="label_path", classes=list(range(num_classes)),
        model=run.model_name, encoder=encoder, seed=seed, primary_metric="dice", config=config, splits=splits,
        per_fraction=per_fraction, extra={"architecture": architecture, "test": test_set or test_record(None),
                                          "flip_label_pairs": [list(p) for p in run.label_pairs]},
    ).save(out_dir)  # fmt: skip
    _write_prediction_index(run, plan, pred_dir)
    return results


def _save_fold_model(
    out_dir: Path, run: SegmentRun, fold: Fold, net: torch.nn.Module, unetr_kwargs: dict[str, Any] | None,
    preprocessing: dict[str, Any] | None,
) -> None:  # fmt: skip
    """The fold's best weights (``<fold>_best.pt``) and its saved model for ``volta3d predict``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out_dir / f"{fold.key}_best.pt")
    s = run.section
    save_segmenter(
        out_dir, fold.key, net, fold.index, run.num_classes, model=s["model"], encoder=run.encoder,
        unetr_kwargs=unetr_kwargs, unet_kwargs=run.unet_kwargs, crop_size=s["crop_size"],
        sw_batch_size=s["sw_batch_size"], sw_overlap=s["sw_overlap"], preprocessing=preprocessing,
    )  # fmt: skip


def _fold_payload(
    fold: Fold, train_rows: np.ndarray, val_rows: np.ndarray, fit: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The fold's record (``folds/<key>.json``): counts, best epoch, mean metrics and per-subject rows."""
    for r in rows:
        r["fold"] = fold.index
    per_metric = pd.DataFrame(rows).drop(columns=["subject_id", "fold"]).mean(skipna=True).to_dict()
    metrics = {"dice": per_metric.pop("dice_mean"), "hd95": per_metric.pop("hd95_mean"), **per_metric}
    get_logger().info(
        f"{fold.key}: Dice {metrics['dice']:.3f}, HD95 {metrics['hd95']:.2f} mm "
        f"(best epoch {fit['best_epoch']})"
    )
    return {
        "fold": fold.index,
        "n_train": int(len(train_rows)),
        "n_val": int(len(val_rows)),
        "n_test": int(len(fold.test)),
        "best_epoch": fit["best_epoch"],
        "metrics": metrics,
        "predictions": rows,
    }
