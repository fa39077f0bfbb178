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

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from volta3d import layout
from volta3d.errors import InputError, InputFileNotFound
from volta3d.protocol.results import write_json

MODEL_FORMAT = "volta3d-model"
MODEL_FORMAT_VERSION = 1


def save_fold_model(run_dir: str | Path, key: str, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write the fold's weights and rebuild record under ``run_dir/models/<key>``; return the folder."""
    folder = Path(run_dir) / layout.MODELS / key
    folder.mkdir(parents=True, exist_ok=True)
    save_model(net.cpu(), str(folder / layout.MODEL_WEIGHTS), metadata={"format": MODEL_FORMAT})
    write_json(
        folder / layout.MODEL_META,
        {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "key": key, **meta},
    )
    return folder


def read_model_meta(folder: Path) -> dict[str, Any]:
    path = folder / layout.MODEL_META
    if not path.is_file() or not (folder / layout.MODEL_WEIGHTS).is_file():
        raise InputFileNotFound(f"saved model incomplete: {path} or {folder / layout.MODEL_WEIGHTS} missing")
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
        from volta3d.downstream.segmenter import UNRECORDED_UNETR_SIZES, build_segmenter

        return build_segmenter(
            b["model"],
            b["in_channels"],
            b["out_channels"],
            b["img_size"],
            unetr_kwargs={**UNRECORDED_UNETR_SIZES, **(b["unetr_kwargs"] or {})},
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
        sfcn_kwargs=b.get("sfcn_kwargs"),  # absent from records written before SFCN existed
    )


def _missing_folds(run_dir: Path, present: set[int], wanted: list[int] | None) -> list[int]:
    """The folds asked for (by default every fold of the run's splits.json) that have no saved model."""
    if wanted is None:
        try:
            wanted = list(range(len(json.loads((run_dir / layout.SPLITS).read_text())["folds"])))
        except (OSError, ValueError, KeyError, TypeError):  # no readable splits: the folders are all there is
            wanted = []
    return sorted(set(wanted) - present)


def load_fold_models(
    run_dir: str | Path, folds: list[int] | None = None
) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Every saved fold model of a run (the largest training fraction only), in eval mode."""
    root = Path(run_dir) / layout.MODELS
    # every fold folder: one without its model.json is refused (read_model_meta), not left out of the ensemble
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
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
    missing = _missing_folds(Path(run_dir), {m["fold"] for _, m in metas}, folds)
    if missing:
        raise InputError(f"{root} holds no model for fold {missing[0]} (an unfinished finetune run? run it "
                         "again, or name the folds to use with --folds)")  # fmt: skip
    out = []
    for folder, meta in metas:
        check_record_fits_weights(folder, meta)  # before anything of the record's size is allocated
        net = build_saved(meta)
        try:
            load_model(net, str(folder / layout.MODEL_WEIGHTS), strict=True)
        except (RuntimeError, OSError) as err:
            raise InputError(
                f"{folder / layout.MODEL_WEIGHTS} does not fit {folder / layout.MODEL_META}: {' '.join(str(err).split())}"
            ) from None
        out.append((net.eval(), meta))
    return out


def _stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from a safetensors header (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - not iterable
    except (SafetensorError, OSError) as err:
        raise InputError(f"cannot read {path}: {' '.join(str(err).split())}") from None


def _some(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _shape_problem(stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What differs between the weights and the network a record describes: shapes, then keys."""
    shared = sorted(set(stored) & set(expected))
    differ = [
        f"{k} {stored[k]} in the weights, {expected[k]} in the record"
        for k in shared
        if stored[k] != expected[k]
    ]
    problems = {
        "shape mismatch": differ,
        "missing from the weights": sorted(set(expected) - set(stored)),
        "not in the network": sorted(set(stored) - set(expected)),
    }
    return "; ".join(f"{what}: {_some(keys)}" for what, keys in problems.items() if keys) or None


def _declared_depth(build: dict[str, Any]) -> Any:
    """``num_layers`` of the record's ViT (classifier encoder or UNETR), or None when it has none."""
    for section in (build.get("encoder_kwargs"), build.get("unetr_kwargs")):
        if isinstance(section, dict) and "num_layers" in section:
            return section["num_layers"]
    return None


def check_record_fits_weights(folder: Path, meta: dict[str, Any]) -> None:
    """The network a ``model.json`` describes against its weights' shapes, before it is built: a record
    edited to width 2048 fails in milliseconds, not after gigabytes. A ViT's depth is compared with the
    weights' blocks first (a build on torch's meta device, shapes only, still costs time per layer); then
    the network is built there and every key and shape compared."""
    weights, record = folder / layout.MODEL_WEIGHTS, folder / layout.MODEL_META
    stored = _stored_shapes(weights)
    depth = _declared_depth(meta.get("build") or {})
    blocks = len({k.split(".blocks.")[1].split(".")[0] for k in stored if ".blocks." in k})
    if depth is not None and depth != blocks:
        raise InputError(
            f"{record} declares num_layers={depth!r} but {weights} holds {blocks} transformer blocks"
        )
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_saved(meta).state_dict().items()}
    except RuntimeError:  # MONAI's Swin reads values while it is built (drop-path rates): checked on loading
        return
    problem = _shape_problem(stored, expected)
    if problem:
        raise InputError(f"{weights} does not fit {record}: {problem}")
