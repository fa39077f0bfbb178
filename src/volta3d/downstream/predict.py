"""Apply a finetune run's saved fold models to new scans (``volta3d predict``).

Each scan goes through the preprocessing its models were trained on (the pipeline of
``volta3d.data.pipeline``, so a scan is seen exactly as the training cache saw it), the fold
ensemble averages probabilities (classification) or softmax maps (segmentation), and segmentation
maps are taken back to the scan's own grid with MONAI's ``Invertd`` (orientation, spacing, crop /
pad undone) before the arg-max, so the written mask lies on the input's voxels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd, Resized
from tqdm.auto import tqdm

from volta3d import layout
from volta3d.config import load_config, to_kwargs
from volta3d.data.io import ScanError, is_nifti, read_volume
from volta3d.data.pipeline import PreprocessSettings, build_transform, preprocess_scan
from volta3d.data.sources import ScanRecord, find_scans
from volta3d.errors import InputError
from volta3d.runtime import get_logger

REJECTED_COLUMNS = ["source", "reason"]


def collect_scans(
    inputs: Sequence[str | Path], preprocess: Mapping[str, Any]
) -> tuple[list[ScanRecord], list[dict[str, str]]]:
    """NIfTI files, DICOM series folders, NIfTI / DICOM / BIDS folders or CSV manifests (columns named by
    the ``preprocess:`` section) -> scans; an input that cannot be listed becomes a rejected row instead
    of stopping the others."""
    columns = {k: preprocess[k] for k in ("image_column", "label_path_column", "subject_column")}
    scans, rejected = [], []
    for item in inputs:
        p = Path(item)
        try:
            if p.is_file() and is_nifti(p):
                name = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
                scans.append(ScanRecord(str(p), name))
            else:
                scans.extend(find_scans(p, **columns))
        except (FileNotFoundError, ValueError, ScanError) as err:
            rejected.append({"source": str(item), "reason": str(err).splitlines()[0]})
    return scans, rejected


def preprocess_for_model(
    scan: ScanRecord, settings: PreprocessSettings, max_voxels: int
) -> tuple[dict[str, Any], Compose, dict]:
    """Read and preprocess one scan exactly as ``volta3d preprocess`` does (``preprocess_scan``: the
    same checks and output, rounded to the cache's dtype), and replay the pipeline on a MetaTensor to
    keep the transform trace that ``Invertd`` needs; the scan is read under ``max_voxels``. Returns
    ``(data, transform, input meta)``; raises ScanError."""
    image, meta = read_volume(scan.source, max_voxels)
    prepared = preprocess_scan(image, meta, settings, name=Path(scan.source).name)
    transform = build_transform(settings, with_mask=False)
    data = transform({"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(meta["affine"]))})
    stored = prepared.image.astype(settings.dtype).astype(np.float32)  # the training cache's rounding
    data["model_input"] = torch.from_numpy(stored)[None]  # (1, 1, D, H, W)
    return data, transform, meta


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def ensemble_probabilities(models: list[tuple[nn.Module, dict]], x: torch.Tensor) -> np.ndarray:
    """Mean over folds of softmax probabilities (K,), or of de-standardised outputs (regression)."""
    outs = []
    for net, meta in models:
        img = meta["build"]["img_size"]
        xi = (
            Resized("image", spatial_size=(img,) * 3, mode="trilinear")({"image": x[0]})["image"][None]
            if img
            else x
        )
        out = net(torch.as_tensor(xi).to(_device(net))).float().cpu()[0]
        if meta["kind"] == "regression":
            std = meta["standardisation"]
            outs.append(out[:1].numpy() * std["sd"] + std["mean"])
        else:
            outs.append(torch.softmax(out, 0).numpy())
    return np.mean(outs, axis=0)


@torch.no_grad()
def ensemble_segmentation(models: list[tuple[nn.Module, dict]], x: torch.Tensor) -> torch.Tensor:
    """Mean over folds of sliding-window softmax maps: (1, 1, D, H, W) -> (K, D, H, W)."""
    maps = []
    for net, meta in models:
        inf = meta["inference"]
        logits = sliding_window_inference(
            x.to(_device(net)), (inf["crop_size"],) * 3, inf["sw_batch_size"], net, overlap=inf["sw_overlap"]
        )
        maps.append(torch.softmax(torch.as_tensor(logits).float(), 1)[0].cpu())
    return torch.stack(maps).mean(0)


def to_input_grid(probs: torch.Tensor, data: dict[str, Any], transform: Compose) -> np.ndarray:
    """Undo the preprocessing on the probability maps (trilinear, then arg-max): (K, D, H, W) ->
    labels (X, Y, Z) on the scan's own voxel grid."""
    pred = MetaTensor(probs, affine=data["image"].affine, meta=dict(data["image"].meta))
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=False)(
        {"image": data["image"], "pred": pred}
    )["pred"]
    return torch.as_tensor(inverted).argmax(0).numpy().astype(np.uint8)


def classification_row(
    scan: ScanRecord, probs: np.ndarray, meta: dict, threshold: float | None
) -> dict[str, Any]:
    """One predictions.csv row: probability per class and the label at 0.5 and at the Youden threshold."""
    row: dict[str, Any] = {"subject_id": scan.subject_id, "path": scan.source}
    if meta["kind"] == "regression":
        return row | {"prediction": float(probs[0])}
    classes = meta["classes"]
    row |= {f"p_{c}": float(p) for c, p in zip(classes, probs, strict=True)}
    if meta["kind"] != "binary":
        return row | {"label": classes[int(np.argmax(probs))]}
    pos = [str(c) for c in classes].index(str(meta["positive_class"]))
    other = classes[1 - pos]
    row["label_0.5"] = classes[pos] if probs[pos] >= 0.5 else other
    row["label_youden"] = None if threshold is None else (classes[pos] if probs[pos] >= threshold else other)
    row["youden_threshold"] = threshold
    return row


def predict_scans(
    models: list[tuple[nn.Module, dict]],
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, pd.DataFrame]:
    """Run the ensemble on every scan; write predictions.csv (classify) or one ``<id>_seg.nii.gz``
    per scan plus volumes.csv (segment), and rejected.csv. Returns the tables written."""
    log, out = get_logger(), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta0 = models[0][1]
    if not meta0.get("preprocessing"):
        raise InputError(
            f"saved model {meta0['key']} records no preprocessing settings (its --data folder had no "
            "config.yaml from `volta3d preprocess`); cannot prepare raw scans for it"
        )
    unknown = sorted(set(meta0["preprocessing"]) - {f.name for f in fields(PreprocessSettings)})
    if unknown:
        raise InputError(
            f"saved model {meta0['key']} has preprocessing setting '{unknown[0]}' unknown to this volta3d"
        )
    # default.yaml's preprocess: section gives the keys a record written before they existed lacks, the
    # manifest columns scans are listed with and the voxel limit they are read under
    defaults = to_kwargs(load_config().preprocess)
    settings = PreprocessSettings(**{**defaults, **meta0["preprocessing"]})
    thresholds = [m.get("youden_threshold") for _, m in models]
    known = [float(t) for t in thresholds if t is not None]
    threshold = float(np.mean(known)) if known and len(known) == len(thresholds) else None
    scans, rejected = collect_scans(inputs, defaults)
    rows: list[dict[str, Any]] = []
    for scan in tqdm(scans, desc="predict", unit="scan", disable=not progress):
        try:
            data, transform, meta = preprocess_for_model(scan, settings, defaults["max_voxels"])
        except ScanError as err:
            rejected.append({"source": scan.source, "reason": str(err).splitlines()[0]})
            log.warning("rejected %s: %s", scan.source, rejected[-1]["reason"])
            continue
        if meta0["task"] == "segment":
            stem = scan.subject_id.replace("/", "_")
            taken = {r["segmentation"] for r in rows}
            name = next(
                n
                for i in range(1, len(rows) + 2)
                if (n := f"{stem}_seg.nii.gz" if i == 1 else f"{stem}_{i}_seg.nii.gz") not in taken
            )
            rows.append(write_segmentation(scan, models, data, transform, meta, out / name))
        else:
            rows.append(
                classification_row(
                    scan, ensemble_probabilities(models, data["model_input"]), meta0, threshold
                )
            )
    tables = {layout.REJECTED: pd.DataFrame(rejected, columns=REJECTED_COLUMNS)}
    tables[layout.PREDICTED_VOLUMES if meta0["task"] == "segment" else layout.PREDICTIONS] = pd.DataFrame(
        rows
    )
    for name, table in tables.items():
        table.to_csv(out / name, index=False)
    log.info("predict: %d scans done, %d rejected -> %s", len(rows), len(rejected), out)
    return tables


def write_segmentation(
    scan: ScanRecord,
    models: list[tuple[nn.Module, dict]],
    data: dict[str, Any],
    transform: Compose,
    meta: dict[str, Any],
    path: Path,
) -> dict[str, Any]:
    """Segment one scan, save its label map to ``path`` (NIfTI on the input grid), return its
    volumes (mm^3) per structure."""
    labels = to_input_grid(ensemble_segmentation(models, data["model_input"]), data, transform)
    affine = np.asarray(meta["affine"], dtype=np.float64)
    nib.save(nib.Nifti1Image(labels, affine), str(path))
    name = path.name
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    row: dict[str, Any] = {"subject_id": scan.subject_id, "path": scan.source, "segmentation": name}
    for c in models[0][1]["classes"][1:]:
        row[f"volume_label{c}_mm3"] = float((labels == c).sum() * voxel_mm3)
    return row
