"""``volta3d finetune classify|segment``: transfer an encoder export (or train a baseline from
scratch) on labelled, preprocessed volumes, with subject-grouped cross-validation / hold-out."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from volta3d.config import bundled_configs, load_config, save_config, to_kwargs


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", action="append", default=[], metavar="FILE",
        help=f"override file(s) merged onto configs/default.yaml in order; bundled: {', '.join(bundled_configs())}",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="folder written by `volta3d preprocess` (holds manifest.csv)")
    p.add_argument("--output", required=True, help="run folder (created; finished folds there are not redone)")
    p.add_argument("--encoder", default=None, help="encoder export folder (encoder.safetensors + encoder.json); "
                   "omit to train the same architecture from scratch")
    p.add_argument("--like", default=None, metavar="ENCODER",
                   help="without --encoder: build the scratch baseline with this export's architecture "
                   "(sizes only, no weights), so it matches the pretrained model it is compared with")
    p.add_argument("--test-data", default=None, metavar="PREP",
                   help="external test set (a `volta3d preprocess` folder): train on all of --data, report "
                   "metrics on this set (one 'fold'; results.json marks the test as external)")
    p.add_argument("--splits", default=None, help="splits.json of an earlier run: evaluate on exactly those folds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. classify.epochs=5 (the key must exist in default.yaml)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune / train classifiers and segmenters with cross-validation",
        description="Train a downstream model from an encoder export or from scratch. Outputs in OUTPUT: "
        "config.yaml, splits.json, results.json (per-fold and mean +- SD metrics), predictions.csv, "
        "folds/*.json (one per finished fold), models/<fold>/ (model.safetensors + model.json, for "
        "`volta3d predict`), log.txt.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = tasks.add_parser(
        "classify",
        help="classify (or regress) a manifest label column with stratified, subject-grouped k-fold CV",
        description="Classification of any label column (binary / multi-class; a numeric column such as age "
        "is regressed) with k-fold CV grouped by subject. Models: vit (VolTA-3D with --encoder, ViT-Scratch "
        "without) and swin (Swin transformer from scratch).",
    )
    _common(c)
    c.add_argument("--label", required=True, help="manifest column to predict (e.g. sex, diagnosis, age)")
    c.add_argument("--model", choices=["vit", "swin"], default=None, help="classifier (default: classify.model)")
    c.add_argument("--fractions", default=None,
                   help="reduced-data curve: comma-separated training fractions, e.g. 0.2,0.4,0.6,0.8,1.0")
    c.set_defaults(func=run_classify)
    s = tasks.add_parser(
        "segment",
        help="segment the manifest's label_path masks (UNETR / 3D U-Net), hold-out or k-fold",
        description="Segmentation of the masks in the manifest's label_path column: UNETR (ViT from --encoder, "
        "or from scratch) or a 3D U-Net from scratch; Dice + CE loss, foreground-sampled crops, "
        "sliding-window inference; Dice and HD95 (mm) per structure and subject.",
    )
    _common(s)
    s.add_argument("--model", choices=["unetr", "unet"], default=None, help="segmenter (default: segment.model)")
    s.set_defaults(func=run_segment)


def _setup(args: argparse.Namespace) -> tuple[Any, Any]:
    from volta3d.downstream.fingerprint import check_fingerprint, run_fingerprint
    from volta3d.runtime import resolve_device, seed_everything, setup_logging

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output)
    check_fingerprint(out, run_fingerprint(args, cfg))  # before anything in the folder is overwritten
    setup_logging(out)
    save_config(cfg, out)
    seed_everything(cfg.seed)
    return cfg, resolve_device(cfg.device)


def _splits(args: argparse.Namespace, make) -> dict:
    from volta3d.evaluation.splits import SPLITS_NAME, load_splits, save_splits

    own = Path(args.output) / SPLITS_NAME
    if args.splits:
        splits = load_splits(args.splits)
    elif own.exists():  # resuming: the folds of the interrupted run
        splits = load_splits(own)
    else:
        splits = make()
    save_splits(splits, own)
    return splits


def run_classify(args: argparse.Namespace) -> int:
    from volta3d.data.dataset import read_manifest
    from volta3d.downstream.external import check_external_classes, test_record
    from volta3d.downstream.labels import prepare_labels
    from volta3d.downstream.saved import read_preprocessing
    from volta3d.downstream.train_classify import run_classification
    from volta3d.evaluation.splits import make_kfold_splits
    from volta3d.models.encoder import split_model_section
    from volta3d.runtime import get_logger

    cfg, device = _setup(args)
    c = to_kwargs(cfg.classify)
    log = get_logger()
    table, external = _with_external(args, read_manifest(args.data))
    labels = prepare_labels(table, args.label, c["task"])
    if external is not None and labels.kind != "regression":
        check_external_classes(labels.targets, labels.table["subject_id"], labels.classes, args.test_data)
    if labels.dropped:
        log.info(f"dropped {labels.dropped} rows with no '{args.label}' value")
    log.info(f"label '{args.label}': {labels.kind}, {len(labels.table)} scans"
             + (f", classes {labels.classes}" if labels.classes else ""))
    splits = _splits(args, lambda: external or {
        **make_kfold_splits(labels.table["subject_id"], labels.strata, n_splits=c["n_splits"], seed=cfg.seed),
        "stratified_by": args.label,
    })
    fractions = [float(f) for f in args.fractions.split(",")] if args.fractions else c["fractions"]
    encoder_kwargs, summ = split_model_section(**to_kwargs(cfg.model))
    summariser_kwargs = {"num_heads": summ["summariser_heads"], "mlp_ratio": summ["summariser_mlp_ratio"]}
    like = _like_meta(args)
    if like is not None:
        encoder_kwargs, summariser_kwargs = _vit_from_like(like, encoder_kwargs, summariser_kwargs)
    provenance = _encoder_provenance(args, labels.table)
    results = run_classification(
        labels, args.output, splits,
        model=args.model or c["model"], encoder=args.encoder,
        encoder_kwargs=encoder_kwargs, summariser_kwargs=summariser_kwargs,
        swin_kwargs={"feature_size": c["swin_feature_size"], "depths": c["swin_depths"],
                     "num_heads": c["swin_heads"], "window_size": c["swin_window"],
                     "patch_size": c["swin_patch_size"]},
        pooling=c["pooling"], mode=c["mode"], unfreeze_last=c["unfreeze_last"], img_size=c["img_size"],
        augment=c["augment"], epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"],
        weight_decay=c["weight_decay"], class_weighting=c["class_weighting"],
        regression_loss=c["regression_loss"], fractions=fractions, positive_class=c["positive_class"],
        youden_val_fraction=c["youden_val_fraction"], preprocessing=read_preprocessing(args.data),
        test_set=test_record(args.test_data),
        seed=cfg.seed, device=device,
        num_workers=c["num_workers"], progress=not args.no_progress, config=to_kwargs(cfg),
    )  # fmt: skip
    _record_provenance(args, provenance)
    _print_summary(results)
    return 0


def _encoder_provenance(args: argparse.Namespace, tested: Any) -> dict[str, Any] | None:
    """How the test subjects (``tested``, or the external set's) relate to the encoder's pretraining data;
    logged now, recorded in results.json after the run."""
    if not args.encoder:
        return None
    from volta3d.data.dataset import read_manifest
    from volta3d.downstream.provenance import relate_to_pretraining
    from volta3d.models.export import read_encoder_export
    from volta3d.runtime import get_logger

    test_dir = args.test_data or args.data
    test = read_manifest(args.test_data) if args.test_data else tested
    summary, warning = relate_to_pretraining(read_encoder_export(args.encoder)[1], test_dir, test)
    log = get_logger()
    if warning:
        log.warning("warning: %s", warning)
    if summary.get("known"):
        log.info("%d of %d test subjects were in the encoder's pretraining set (%s)", summary["test_subjects_in_pretraining"],
                 summary["n_test"], "transductive" if summary["transductive"] else "external")  # fmt: skip
    return {**summary, "preprocessing_warning": warning}


def _record_provenance(args: argparse.Namespace, provenance: dict[str, Any] | None) -> None:
    if provenance is None:
        return
    from volta3d.evaluation.results import RESULTS_NAME, write_json

    path = Path(args.output) / RESULTS_NAME
    write_json(path, {**json.loads(path.read_text()), "encoder_provenance": provenance})


def run_segment(args: argparse.Namespace) -> int:
    from volta3d.data.dataset import read_manifest
    from volta3d.downstream.external import test_record
    from volta3d.downstream.saved import read_preprocessing
    from volta3d.downstream.train_segment import run_segmentation
    from volta3d.evaluation.splits import make_holdout_split, make_kfold_splits

    cfg, device = _setup(args)
    s = to_kwargs(cfg.segment)
    table, external = _with_external(args, read_manifest(args.data))
    if "label_path" not in table.columns or table["label_path"].isna().any():
        raise ValueError(f"manifest in {args.data} needs a 'label_path' (mask) for every scan to segment")
    subjects = table["subject_id"].astype(str)
    if s["split"] not in ("holdout", "kfold"):
        raise ValueError(f"segment.split must be holdout or kfold (got '{s['split']}')")
    splits = _splits(args, lambda: external or (
        make_holdout_split(subjects, None, fraction=s["holdout_fraction"], seed=cfg.seed) if s["split"] == "holdout"
        else make_kfold_splits(subjects, None, n_splits=s["n_splits"], seed=cfg.seed)
    ))
    m = to_kwargs(cfg.model)
    like = _like_meta(args)
    if like is not None:
        m.update(_vit_from_like(like, m, {})[0])
    provenance = _encoder_provenance(args, table)
    results = run_segmentation(
        table, args.output, splits,
        model=args.model or s["model"], encoder=args.encoder, num_classes=s["num_classes"],
        unetr_kwargs={"hidden_size": m["hidden_size"], "mlp_dim": m["mlp_dim"], "num_heads": m["num_heads"],
                      "qkv_bias": m["qkv_bias"], "feature_size": s["feature_size"],
                      "input_norm": m["input_norm"]},
        unet_kwargs={"num_res_units": s["unet_res_units"]},
        crop_size=s["crop_size"], samples_per_volume=s["samples_per_volume"], pos_fraction=s["pos_fraction"],
        epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], weight_decay=s["weight_decay"],
        val_every=s["val_every"], val_fraction=s["val_fraction"], sw_batch_size=s["sw_batch_size"],
        sw_overlap=s["sw_overlap"], spacing=s["spacing"], flip_label_pairs=s["flip_label_pairs"],
        preprocessing=read_preprocessing(args.data), test_set=test_record(args.test_data), seed=cfg.seed, device=device,
        num_workers=s["num_workers"], progress=not args.no_progress, config=to_kwargs(cfg),
    )  # fmt: skip
    _record_provenance(args, provenance)
    _print_summary(results)
    return 0


def _with_external(args: argparse.Namespace, table: Any) -> tuple[Any, dict | None]:
    """With ``--test-data``: the training and external manifests as one table, and its one-fold
    splits; without: the table unchanged and None."""
    if not args.test_data:
        return table, None
    if args.splits:
        raise ValueError("--test-data fixes the split (train on --data, test on it); drop --splits")
    from volta3d.data.dataset import read_manifest
    from volta3d.downstream.external import combine_external

    return combine_external(table, read_manifest(args.test_data), args.test_data)


def _like_meta(args: argparse.Namespace) -> dict[str, Any] | None:
    """The metadata of the ``--like`` export (architecture only), or None without ``--like``."""
    if not getattr(args, "like", None):
        return None
    if args.encoder:
        raise ValueError("--like builds a scratch baseline; it cannot be combined with --encoder")
    from volta3d.models.export import read_encoder_export

    return read_encoder_export(args.like)[1]


def _vit_from_like(meta: dict[str, Any], encoder_kwargs: dict[str, Any],
                   summariser_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Encoder and summariser sizes taken from an export's metadata over the config's."""
    from volta3d.models.export import encoder_kwargs_from_meta

    enc = {**encoder_kwargs, **encoder_kwargs_from_meta(meta)}
    summ = meta.get("summariser") or {}
    return enc, {**summariser_kwargs, **{k: summ[k] for k in ("num_heads", "mlp_ratio") if k in summ}}


def _print_summary(results: dict) -> None:
    parts = []
    for name, agg in results["aggregate"].items():
        if agg["n"] and name != "youden_threshold":
            sd = f" +- {agg['sd']:.3f}" if agg["sd"] is not None and agg["n"] > 1 else ""
            parts.append(f"{name} {agg['mean']:.3f}{sd}")
    print(f"{results['model']} on {len(results['folds'])} fold(s): " + ", ".join(parts))
