"""``volta3d predict``: apply a finetune run's saved fold models (their ensemble) to new scans."""

from __future__ import annotations

import argparse

from volta3d.errors import InputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a finetune run's fold-model ensemble to new scans (classification or segmentation)",
        description="Preprocess each scan as the models' training data was, average the fold models' "
        "probabilities and write into OUTPUT: predictions.csv (classification: probability per class, label "
        "at 0.5 and at the mean Youden threshold) or one <id>_seg.nii.gz per scan on the scan's own grid plus "
        "volumes.csv (segmentation: mm^3 per structure); rejected.csv lists scans that could not be used.",
    )
    p.add_argument(
        "run_dir", metavar="MODEL_RUN_DIR", help="output folder of `volta3d finetune` (holds models/)"
    )
    p.add_argument(
        "scans",
        nargs="+",
        metavar="SCANS",
        help="NIfTI files, DICOM series folders, NIfTI / DICOM / BIDS folders or CSV manifests",
    )
    p.add_argument(
        "--output", required=True, help="folder for predictions.csv / masks, volumes.csv, rejected.csv"
    )
    p.add_argument("--folds", default=None, help="comma-separated fold numbers to use (default: every fold)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.downstream.predict import predict_scans
    from volta3d.downstream.saved import load_fold_models
    from volta3d.runtime import resolve_device, setup_logging

    setup_logging()
    try:
        folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    except ValueError:
        raise InputError(f"--folds must be comma-separated integers (got '{args.folds}')") from None
    device = resolve_device(args.device)
    models = [(net.to(device), meta) for net, meta in load_fold_models(args.run_dir, folds)]
    predict_scans(models, args.scans, args.output, progress=not args.no_progress)
    return 0
