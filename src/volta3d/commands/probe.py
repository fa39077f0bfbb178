"""``volta3d probe``: linear and kNN probes on frozen embeddings, on the same folds as fine-tuning."""

from __future__ import annotations

import argparse
from pathlib import Path

from volta3d.config import bundled_configs, load_config, save_config, to_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="fit linear / kNN probes on embeddings from `volta3d embed`",
        description="Logistic regression (standardised features) and cosine kNN probes for class labels, "
        "ridge and kNN regression for numeric labels, on frozen embeddings, cross-validated on the same "
        "subject-grouped folds as `finetune classify` (pass its splits.json). Writes one run folder per "
        "probe and feature (results.json, predictions.csv) and summary.json into OUTPUT. Embeddings from "
        "`embed --raw-volume` are probed on their one feature, 'raw', whatever probe.features says.",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"override file(s); bundled: {', '.join(bundled_configs())}")
    p.add_argument("--embeddings", required=True, help=".npz file written by `volta3d embed`")
    p.add_argument("--data", required=True, help="the preprocessed folder the embeddings came from (labels)")
    p.add_argument("--label", required=True, help="manifest column to predict")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--splits", default=None, help="splits.json of a fine-tuning run (recommended)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. probe.knn_k=10")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from volta3d.data.dataset import read_manifest
    from volta3d.downstream.embeddings import embedding_rows, load_embeddings
    from volta3d.downstream.labels import prepare_labels
    from volta3d.downstream.probes import run_probe
    from volta3d.evaluation.results import save_run, write_json
    from volta3d.evaluation.splits import load_splits, make_kfold_splits, save_splits
    from volta3d.runtime import get_logger, setup_logging

    cfg = load_config(args.config, args.overrides)
    out = Path(args.output)
    setup_logging(out)
    save_config(cfg, out)
    pc = to_kwargs(cfg.probe)
    emb, meta = load_embeddings(args.embeddings)
    bad = [k for k in ("cls", "mean", "tokens", "raw") if k in emb and not np.isfinite(emb[k]).all()]
    if bad:
        raise ValueError(f"{args.embeddings} holds non-finite '{bad[0]}' features (NaN/Inf); re-embed with a finite encoder")
    labels = prepare_labels(read_manifest(args.data), args.label, cfg.classify.task)
    rows = embedding_rows(emb["path"].tolist(), labels.table["path"].tolist(), f"{args.embeddings} ({args.data})")
    splits = load_splits(args.splits) if args.splits else make_kfold_splits(
        labels.table["subject_id"], labels.strata, n_splits=pc["n_splits"], seed=cfg.seed)
    save_splits(splits, out)
    provenance = _provenance(meta, args.data, labels.table)
    summary = {}
    # raw-volume embeddings hold one feature, 'raw'; probe.features names the encoder's (cls / mean)
    for feat in ["raw"] if "raw" in emb else pc["features"]:
        if feat not in emb:
            get_logger().warning(f"embeddings have no '{feat}' feature (encoder without a summariser?); skipped")
            continue
        for probe in ("linear", "knn"):
            results, preds = run_probe(
                emb[feat][rows], labels, splits, probe, feature_name=feat, encoder=meta.get("encoder"),
                seed=cfg.seed, config=to_kwargs(cfg), logreg_c=pc["logreg_c"], knn_k=pc["knn_k"],
                ridge_alpha=pc["ridge_alpha"], fractions=pc["fractions"],
            )  # fmt: skip
            results["embedding_init"] = meta.get("init")
            if provenance is not None:
                results["encoder_provenance"] = provenance
            if meta.get("grid") is not None:
                results["embedding_grid"] = meta["grid"]  # the report names the baseline by it
            save_run(out / f"{probe}_{feat}", results, preds)
            primary = results["primary_metric"]
            agg = results["aggregate"][primary]
            summary[f"{probe}_{feat}"] = {primary: agg}
            print(f"{probe:>6} probe on {feat:<4} ({meta.get('init')}): {primary} {agg['mean']:.3f} +- {agg['sd']:.3f}")
    write_json(out / "summary.json", summary)
    return 0


def _provenance(meta: dict, data: str, table) -> dict | None:
    """For embeddings of a pretrained export: how many probed subjects its pretraining saw."""
    from volta3d.downstream.provenance import relate_to_pretraining
    from volta3d.models.export import read_encoder_export
    from volta3d.runtime import get_logger

    if meta.get("init") != "pretrained" or not meta.get("encoder"):
        return None
    summary, warning = relate_to_pretraining(read_encoder_export(meta["encoder"])[1], data, table)
    if warning:
        get_logger().warning("warning: %s", warning)
    return {**summary, "preprocessing_warning": warning}
