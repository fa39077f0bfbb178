"""``volta3d finetune classify|segment`` as a library call: from a merged configuration and the
command's files to a finished run folder (docs/evaluation.md, "Downstream transfer and evaluation").

This module holds what the command decides beyond parsing: which folds a run uses (an explicit
``--splits`` file, else the folds of an interrupted run in the same folder, else new ones; an
external ``--test-data`` set is one fold), how the config sections map onto the models (``model:``
and its ``summariser:`` for the ViT, optionally sized like another export with ``--like``;
``classify.swin`` for the Swin baseline; ``segment:`` widths for UNETR / U-Net) and how the test
subjects relate to the encoder's pretraining data.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volta3d import layout
from volta3d.config import save_config, to_kwargs
from volta3d.data.dataset import read_manifest, read_preprocessing
from volta3d.downstream.external import check_external_classes, combine_external, test_record
from volta3d.downstream.fingerprint import check_fingerprint, run_fingerprint
from volta3d.downstream.train_classify import run_classification
from volta3d.downstream.train_segment import run_segmentation
from volta3d.errors import InputError
from volta3d.models.encoder import split_model_section
from volta3d.models.export import encoder_kwargs_from_meta, read_encoder_meta
from volta3d.models.provenance import relate_to_pretraining
from volta3d.models.summariser import summariser_kwargs
from volta3d.protocol.labels import label_kfold_splits, prepare_labels
from volta3d.protocol.leakage import check_run_rows
from volta3d.protocol.results import write_json
from volta3d.protocol.splits import load_splits, make_holdout_split, make_kfold_splits, save_splits
from volta3d.runtime import get_logger, resolve_device, seed_everything, setup_logging


@dataclass(frozen=True)
class FinetuneInputs:
    """The files and choices of one ``volta3d finetune`` command (its flags, by the same names)."""

    task: str
    data: str
    output: str
    encoder: str | None
    like: str | None
    test_data: str | None
    splits: str | None
    model: str | None
    progress: bool
    label: str | None = None
    fractions: str | None = None

    @property
    def section(self) -> str:
        """The config section the task reads: ``regress`` is classification's code and keys."""
        return "segment" if self.task == "segment" else "classify"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FinetuneInputs:
        """The inputs of a parsed ``finetune`` command line."""
        return cls(
            task=args.task,
            data=args.data,
            output=args.output,
            encoder=args.encoder,
            like=args.like,
            test_data=args.test_data,
            splits=args.splits,
            model=args.model,
            progress=not args.no_progress,
            label=getattr(args, "label", None),
            fractions=getattr(args, "fractions", None),
        )


def finetune(cfg: Any, run: FinetuneInputs) -> dict[str, Any]:
    """Run ``run.task`` (classify; regress: classify with the task fixed to regression; segment) into
    ``run.output``; return the results dictionary."""
    device = _prepare_output(cfg, run)
    results, provenance = (segment if run.task == "segment" else classify)(cfg, run, device)
    if provenance is not None:
        path = Path(run.output) / layout.RESULTS
        write_json(path, {**json.loads(path.read_text()), "encoder_provenance": provenance})
        results = {**results, "encoder_provenance": provenance}
    return results


def _prepare_output(cfg: Any, run: FinetuneInputs) -> Any:
    """Refuse a folder holding another run's folds, start the log, save the config, seed; return the device."""
    out = Path(run.output)
    check_fingerprint(out, run_fingerprint(run, cfg))  # before anything in the folder is overwritten
    setup_logging(out)
    save_config(cfg, out)
    seed_everything(cfg.seed)
    return resolve_device(cfg.device)


def run_splits(run: FinetuneInputs, make: Callable[[], dict]) -> dict:
    """The folds: ``--splits`` if given, else those of the interrupted run in the output folder
    (resuming), else ``make()``; saved as the run's splits.json."""
    own = Path(run.output) / layout.SPLITS
    if run.splits:
        splits = load_splits(run.splits)
    elif own.exists():  # resuming: the folds of the interrupted run
        splits = load_splits(own)
    else:
        splits = make()
    save_splits(splits, own)
    return splits


def classify(cfg: Any, run: FinetuneInputs, device: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Cross-validated classification of ``run.label``; return the results and the encoder provenance."""
    c, log = to_kwargs(cfg.classify), get_logger()
    if run.label is None:
        raise InputError("finetune classify needs --label: the manifest column to predict")
    table, external = with_external(run, read_manifest(run.data))
    labels = prepare_labels(table, run.label, "regression" if run.task == "regress" else c["task"])
    if external is not None and run.test_data is not None and labels.kind != "regression":
        check_external_classes(labels.targets, labels.table["subject_id"], labels.classes, run.test_data)
    if labels.dropped:
        log.info(f"dropped {labels.dropped} rows with no '{run.label}' value")
    log.info(
        f"label '{run.label}': {labels.kind}, {len(labels.table)} scans"
        + (f", classes {labels.classes}" if labels.classes else "")
    )
    splits = run_splits(
        run,
        lambda: (
            external or {**label_kfold_splits(labels, c["n_splits"], cfg.seed), "stratified_by": run.label}
        ),
    )
    check_run_rows(labels.table, splits, labels)  # one scan under two subject ids, conflicting labels
    fractions = [float(f) for f in run.fractions.split(",")] if run.fractions else c["fractions"]
    encoder_kwargs, summariser_kwargs = vit_sizes(to_kwargs(cfg.model), like_meta(run))
    provenance = encoder_provenance(run, labels.table)
    results = run_classification(
        labels, run.output, splits, {**c, "model": run.model or c["model"], "fractions": fractions},
        encoder=run.encoder, encoder_kwargs=encoder_kwargs, summariser_kwargs=summariser_kwargs,
        preprocessing=read_preprocessing(run.data), test_set=test_record(run.test_data), seed=cfg.seed,
        device=device, progress=run.progress, config=to_kwargs(cfg),
    )  # fmt: skip
    return results, provenance


def segment(cfg: Any, run: FinetuneInputs, device: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Segmentation of the manifest's masks; return the results and the encoder provenance."""
    s = to_kwargs(cfg.segment)
    table, external = with_external(run, read_manifest(run.data))
    if "label_path" not in table.columns or table["label_path"].isna().any():
        raise InputError(f"manifest in {run.data} needs a 'label_path' (mask) for every scan to segment")
    subjects = table["subject_id"].astype(str)
    splits = run_splits(
        run,
        lambda: (
            external
            or (
                make_holdout_split(subjects, None, fraction=s["holdout_fraction"], seed=cfg.seed)
                if s["split"] == "holdout"
                else make_kfold_splits(subjects, None, n_splits=s["n_splits"], seed=cfg.seed)
            )
        ),
    )
    check_run_rows(table, splits)  # one scan under two subject ids
    provenance = encoder_provenance(run, table)
    results = run_segmentation(
        table, run.output, splits, {**s, "model": run.model or s["model"]}, encoder=run.encoder,
        unetr_kwargs=unetr_sizes(to_kwargs(cfg.model), s, like_meta(run)),
        preprocessing=read_preprocessing(run.data), test_set=test_record(run.test_data), seed=cfg.seed,
        device=device, progress=run.progress, config=to_kwargs(cfg),
    )  # fmt: skip
    return results, provenance


def vit_sizes(model: dict[str, Any], like: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder and summariser keyword arguments of the ViT classifier: the ``model:`` section (with
    its ``summariser:``), or, with ``--like``, that export's sizes over them."""
    encoder_kwargs, section = split_model_section(**model)
    summ = summariser_kwargs(**section)
    if like is None:
        return encoder_kwargs, summ
    recorded = like.get("summariser") or {}
    return (
        {**encoder_kwargs, **encoder_kwargs_from_meta(like)},
        {**summ, **{k: recorded[k] for k in ("num_heads", "mlp_ratio") if k in recorded}},
    )


def unetr_sizes(
    model: dict[str, Any], section: dict[str, Any], like: dict[str, Any] | None
) -> dict[str, Any]:
    """UNETR keyword arguments: the ViT's patch, depth and widths of ``model:`` (or of the ``--like``
    export) and the decoder width ``segment.feature_size``."""
    m, _ = vit_sizes(model, like)
    return {
        "patch_size": m["patch_size"],
        "num_layers": m["num_layers"],
        "hidden_size": m["hidden_size"],
        "mlp_dim": m["mlp_dim"],
        "num_heads": m["num_heads"],
        "qkv_bias": m["qkv_bias"],
        "feature_size": section["feature_size"],
        "input_norm": m["input_norm"],
    }


def with_external(run: FinetuneInputs, table: Any) -> tuple[Any, dict | None]:
    """With ``--test-data``: the training and external manifests as one table, and its one-fold
    splits; without: the table unchanged and None."""
    if not run.test_data:
        return table, None
    if run.splits:
        raise InputError("--test-data fixes the split (train on --data, test on it); drop --splits")

    return combine_external(table, read_manifest(run.test_data), run.test_data)


def like_meta(run: FinetuneInputs) -> dict[str, Any] | None:
    """The metadata of the ``--like`` export (architecture only), or None without ``--like``."""
    if not run.like:
        return None
    if run.encoder:
        raise InputError("--like builds a scratch baseline; it cannot be combined with --encoder")

    return read_encoder_meta(run.like)


def encoder_provenance(run: FinetuneInputs, tested: Any) -> dict[str, Any] | None:
    """How the test subjects (``tested``, or the external set's) relate to the encoder's pretraining data;
    logged now, recorded in results.json after the run."""
    if not run.encoder:
        return None

    test_dir = run.test_data or run.data
    test = read_manifest(run.test_data) if run.test_data else tested
    summary, warning = relate_to_pretraining(read_encoder_meta(run.encoder), test_dir, test)
    log = get_logger()
    if warning:
        log.warning("warning: %s", warning)
    if summary.get("known"):
        log.info("%d of %d test subjects were in the encoder's pretraining set (%s)", summary["test_subjects_in_pretraining"],
                 summary["n_test"], "transductive" if summary["transductive"] else "external")  # fmt: skip
    return {**summary, "preprocessing_warning": warning}


def summary_line(results: dict[str, Any]) -> str:
    """The line the command prints: the model, its folds and each metric's mean +- SD, the primary first."""
    parts = []
    primary = results.get("primary_metric")
    for name, agg in sorted(results["aggregate"].items(), key=lambda item: item[0] != primary):
        if agg["n"] and name != "youden_threshold":
            sd = f" +- {agg['sd']:.3f}" if agg["sd"] is not None and agg["n"] > 1 else ""
            parts.append(f"{name} {agg['mean']:.3f}{sd}")
    return f"{results['model']} on {len(results['folds'])} fold(s): " + ", ".join(parts)
