"""``volta3d finetune classify|regress|segment``: transfer an encoder export (or train a baseline from
scratch) on labelled, preprocessed volumes, with subject-grouped cross-validation / hold-out."""

from __future__ import annotations

import argparse

from volta3d.commands.common import add_config_arguments
from volta3d.downstream.networks import network_names


def _common(p: argparse.ArgumentParser) -> None:
    """The options every finetune task takes, and its handler (``run``, claiming ``--output``)."""
    add_config_arguments(p, "classify.epochs=5")
    p.add_argument(
        "--data", required=True, help="folder written by `volta3d preprocess` (holds manifest.csv)"
    )
    p.add_argument(
        "--output", required=True, help="run folder (created; finished folds there are not redone)"
    )
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder export folder (encoder.safetensors + encoder.json); "
        "omit to train the same architecture from scratch",
    )
    p.add_argument(
        "--like",
        default=None,
        metavar="ENCODER",
        help="without --encoder: build the scratch baseline with this export's architecture "
        "(sizes only, no weights), so it matches the pretrained model it is compared with",
    )
    p.add_argument(
        "--test-data",
        default=None,
        metavar="PREP",
        help="external test set (a `volta3d preprocess` folder): train on all of --data, report "
        "metrics on this set (one 'fold'; results.json marks the test as external)",
    )
    p.add_argument(
        "--splits", default=None, help="splits.json of an earlier run: evaluate on exactly those folds"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=run, claims="folder")


def _model_and_fractions(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", choices=network_names("classify"), default=None, help="network (default: classify.model)"
    )
    p.add_argument(
        "--fractions",
        default=None,
        help="reduced-data curve: comma-separated training fractions, e.g. 0.2,0.4,0.6,0.8,1.0",
    )


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
        "without), swin (Swin transformer from scratch) and sfcn (the SFCN brain-age CNN from scratch).",
    )
    _common(c)
    c.add_argument("--label", required=True, help="manifest column to predict (e.g. sex, diagnosis, age)")
    _model_and_fractions(c)
    r = tasks.add_parser(
        "regress",
        help="regress a numeric label, e.g. brain age: MAE, Pearson r and the brain-age gap's bias",
        description="Regression of a numeric label column (brain age by default) with k-fold CV grouped by "
        "subject, the classify settings (classify.*) with the task fixed to regression. Metrics per fold: MAE, "
        "R^2, Pearson r, and the brain-age gap (predicted - true) with its correlation with age (the "
        "regression-to-the-mean bias), before and after a bias correction fitted on the training subjects only. "
        "Models: vit (VolTA-3D with --encoder, ViT-Scratch without), swin and sfcn (SFCN, Peng et al. 2021) from scratch.",
    )
    _common(r)
    r.add_argument("--label", default="age", help="numeric manifest column to predict (default: age)")
    _model_and_fractions(r)
    s = tasks.add_parser(
        "segment",
        help="segment the manifest's label_path masks (UNETR / 3D U-Net), hold-out or k-fold",
        description="Segmentation of the masks in the manifest's label_path column: UNETR (ViT from --encoder, "
        "or from scratch) or a 3D U-Net from scratch; Dice + CE loss, foreground-sampled crops, "
        "sliding-window inference; Dice and HD95 (mm) per structure and subject.",
    )
    _common(s)
    s.add_argument(
        "--model", choices=network_names("segment"), default=None, help="segmenter (default: segment.model)"
    )


def run(args: argparse.Namespace) -> int:
    from volta3d.config import load_config
    from volta3d.downstream.finetune import FinetuneInputs, finetune, summary_line

    print(summary_line(finetune(load_config(args.config, args.overrides), FinetuneInputs.from_args(args))))
    return 0
