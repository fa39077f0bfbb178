"""``volta3d pretrain``: VolTA-3D self-supervised pretraining on a preprocessed folder."""

from __future__ import annotations

import argparse

from volta3d.commands.common import add_config_arguments
from volta3d.config import load_config
from volta3d.errors import InputError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a 3D ViT with VolTA-3D on unlabelled preprocessed volumes",
        description="Pretrain the VolTA-3D student/teacher 3D ViT (global CLS-style + patch-token "
        "distillation + GMML reconstruction). Re-running the same command resumes from "
        "OUTPUT/checkpoints/last.pt. Outputs: config.yaml, metrics.csv, log.txt, checkpoints/last.pt, "
        "encoder.safetensors + encoder.json, pretrain_data.json; with --eval-data also online_eval.csv (linear "
        "and kNN probes of the teacher, of the initial weights and of the raw volume on fixed folds).",
    )
    add_config_arguments(p, "optim.epochs=5 loss.rec_weight=0")
    p.add_argument("--data", required=True, action="append",
                   help="folder written by `volta3d preprocess` (holds manifest.csv); repeat to pretrain on "
                   "several (e.g. --data prep/ixi --data prep/msd); labels are never used")  # fmt: skip
    p.add_argument("--output", required=True, help="run folder (created; an existing run there is resumed)")
    p.add_argument(
        "--eval-data",
        default=None,
        metavar="PREP",
        help="preprocessed folder with labels for the online probe of the teacher (eval.data)",
    )
    p.add_argument(
        "--eval-label",
        action="append",
        default=[],
        metavar="COLUMN",
        help="manifest column to probe every eval.every steps, e.g. sex; repeat for several (eval.labels)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="ENCODER",
        help="encoder export (a run folder, or `volta3d import-encoder`'s) to start student and teacher from, "
        "heads fresh (train.init); model: sizes come from it, model.img_size from the config. A resume needs the same",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.engine.distributed import cleanup
    from volta3d.engine.trainer import (  # heavy imports only when the command runs
        NonFiniteLossError,
        pretrain,
    )

    overrides = list(args.overrides)
    if args.eval_data:
        overrides.append(f"eval.data={args.eval_data}")
    if args.eval_label:
        overrides.append(f"eval.labels=[{','.join(args.eval_label)}]")
    if args.init:  # last: the export's architecture wins over a config file's model sizes
        from volta3d.engine.init_weights import init_overrides

        overrides += init_overrides(args.init)
    cfg = load_config(args.config, overrides)
    try:
        pretrain(cfg, args.data, args.output, progress=not args.no_progress)
    except NonFiniteLossError as err:  # a diverged run is reported like bad input: one line, exit 2
        raise InputError(str(err)) from None
    finally:
        # under torchrun: destroy the process group before interpreter shutdown tears down its threads
        # (an alive gloo group at exit intermittently aborts with "terminate called without an active exception")
        cleanup()
    return 0
