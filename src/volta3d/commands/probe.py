"""``volta3d probe``: linear and kNN probes on frozen embeddings, on the same folds as fine-tuning."""

from __future__ import annotations

import argparse

from volta3d.commands.common import add_config_arguments


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
    add_config_arguments(p, "probe.knn_k=10")
    p.add_argument("--embeddings", required=True, help=".npz file written by `volta3d embed`")
    p.add_argument("--data", required=True, help="the preprocessed folder the embeddings came from (labels)")
    p.add_argument("--label", required=True, help="manifest column to predict")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--splits", default=None, help="splits.json of a fine-tuning run (recommended)")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.config import load_config
    from volta3d.protocol.probes import probe_folder

    probe_folder(
        load_config(args.config, args.overrides),
        args.embeddings,
        args.data,
        args.label,
        args.output,
        args.splits,
    )
    return 0
