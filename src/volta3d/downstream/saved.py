"""Fold models saved by ``finetune`` so ``volta3d predict`` can rebuild and apply them.

Each fold writes ``models/<key>/model.safetensors`` (the whole network's weights) and
``models/<key>/model.json``: how to rebuild the network (``build``), the classes / label names, the
positive class and decision thresholds, the preprocessing settings of its training data and the
encoder export it started from. The JSON alone rebuilds the architecture; the weights then load
strictly, so a file that does not fit the network is refused with the keys named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.nn as nn
import yaml
from safetensors.torch import load_model, save_model

from volta3d.data.dataset import manifest_file
from volta3d.errors import InputError, InputFileNotFound
from volta3d.evaluation.results import write_json

MODELS_DIR = "models"
MODEL_WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
MODEL_FORMAT = "volta3d-model"
MODEL_FORMAT_VERSION = 1


def read_preprocessing(data_dir: str | Path) -> dict[str, Any] | None:
    """The ``preprocess:`` section of ``config.yaml`` that ``volta3d preprocess`` wrote into the data
    folder (beside a manifest CSV given as ``--data``: ``volta3d select`` copies it there), or None when
    the folder was made some other way (predict then refuses raw scans)."""
    path = manifest_file(data_dir).parent / "config.yaml"
    if not path.is_file():
        return None
    section = (yaml.safe_load(path.read_text()) or {}).get("preprocess")
    return dict(section) if isinstance(section, dict) else None


def save_fold_model(run_dir: str | Path, key: str, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the fold's weights and rebuild record under ``run_dir/models/<key>``; return the folder."""
    folder = Path(run_dir) / MODELS_DIR / key
    folder.mkdir(parents=True, exist_ok=True)
    save_model(net.cpu(), str(folder / MODEL_WEIGHTS), metadata={"format": MODEL_FORMAT})
    write_json(
        folder / MODEL_META,
        {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "key": key, **meta},
    )
    return folder


def read_model_meta(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_META
    if not path.is_file() or not (folder / MODEL_WEIGHTS).is_file():
        raise InputFileNotFound(f"saved model incomplete: {path} or {folder / MODEL_WEIGHTS} missing")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON: {err.msg}") from None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != MODEL_FORMAT
        or meta.get("format_version") != MODEL_FORMAT_VERSION
    ):
        raise InputError(f"{path} is not a {MODEL_FORMAT} v{MODEL_FORMAT_VERSION} record")
    return meta


def build_saved(meta: dict[str, Any]) -> nn.Module:
    """The untrained network a ``model.json`` describes (no encoder weights are read)."""
    b = meta["build"]
    if meta["task"] == "segment":
        from volta3d.downstream.segmenter import build_segmenter

        return build_segmenter(
            b["model"],
            b["in_channels"],
            b["out_channels"],
            b["img_size"],
            unetr_kwargs=b["unetr_kwargs"],
            unet_kwargs=b["unet_kwargs"],
        )
    from volta3d.downstream.classifier import build_classifier

    return build_classifier(
        b["model"],
        b["num_outputs"],
        encoder_kwargs=b["encoder_kwargs"],
        summariser_kwargs=b["summariser_kwargs"],
        pooling=b["pooling"],
        img_size=b["img_size"],
        swin_kwargs=b["swin_kwargs"],
    )


def load_fold_models(
    run_dir: str | Path, folds: list[int] | None = None
) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every saved fold model of a run (the largest training fraction only), in eval mode."""
    root = Path(run_dir) / MODELS_DIR
    folders = sorted(p for p in root.glob("*") if (p / MODEL_META).is_file()) if root.is_dir() else []
    if not folders:
        raise InputFileNotFound(
            f"no saved fold models in {root} (run `volta3d finetune` with this version first)"
        )
    metas = [(f, read_model_meta(f)) for f in folders]
    top = max(m.get("fraction", 1.0) for _, m in metas)
    metas = [
        (f, m) for f, m in metas if m.get("fraction", 1.0) == top and (folds is None or m["fold"] in folds)
    ]
    if not metas:
        raise InputError(f"{root} holds no saved model for fold(s) {folds}")
    out = []
    for folder, meta in metas:
        net = build_saved(meta)
        try:
            load_model(net, str(folder / MODEL_WEIGHTS), strict=True)
        except (RuntimeError, OSError) as err:
            raise InputError(
                f"{folder / MODEL_WEIGHTS} does not fit {folder / MODEL_META}: {str(err).splitlines()[0]}"
            ) from None
        out.append((net.eval(), meta))
    return out
