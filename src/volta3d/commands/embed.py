"""``volta3d embed``: one frozen-encoder embedding per scan (CLS-style summary + mean patch token),
or, with ``--raw-volume``, the z-scored volume average-pooled to a small grid (the probes' floor)."""

from __future__ import annotations

import argparse

from volta3d.commands.common import add_config_arguments
from volta3d.errors import InputError

RAW_GRID = 16  # 16^3 = 4096 features: as many as a few ViT embeddings, coarse enough for a linear probe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="extract one embedding per scan from a frozen encoder (for probes)",
        description="Run a frozen encoder over every scan of a preprocessed folder and save, per scan, the "
        "CLS-style summary (when the export has a summariser) and the mean patch token (and the flattened "
        "patch-token grid when probe.features lists 'tokens'), with subject ids, to an .npz file. --random-init gives the honest baseline: the same architecture, untrained. "
        "--raw-volume gives the floor: no network, each volume z-scored and average-pooled to a "
        "--raw-grid^3 grid.",
    )
    add_config_arguments(p, "probe.batch_size=4")
    p.add_argument(
        "--encoder",
        default=None,
        help="encoder export folder; omit to embed with a random-init encoder built from `model:`",
    )
    p.add_argument(
        "--random-init",
        action="store_true",
        help="with --encoder: same architecture as the export, random weights (seeded)",
    )
    p.add_argument(
        "--raw-volume",
        action="store_true",
        help="no encoder: features are the z-scored volume average-pooled to a grid (feature 'raw')",
    )
    p.add_argument(
        "--raw-grid",
        type=int,
        default=None,
        metavar="N",
        help=f"with --raw-volume: cells per axis, N^3 features per channel (default {RAW_GRID})",
    )
    p.add_argument(
        "--data", required=True, help="folder written by `volta3d preprocess` (holds manifest.csv)"
    )
    p.add_argument("--output", required=True, help="output .npz file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, claims="file")


def _check_source(args: argparse.Namespace) -> None:
    """Exactly one feature source: a one-line error for contradictory flags."""
    if args.raw_volume and (args.encoder or args.random_init):
        flag = "--encoder" if args.encoder else "--random-init"
        raise InputError(f"--raw-volume embeds the volumes themselves and takes no {flag}")
    if args.raw_grid is not None and not args.raw_volume:
        raise InputError("--raw-grid applies only with --raw-volume")


def run(args: argparse.Namespace) -> int:
    from volta3d.config import load_config
    from volta3d.protocol.embeddings import embed_folder

    _check_source(args)
    raw_grid = (args.raw_grid if args.raw_grid is not None else RAW_GRID) if args.raw_volume else None
    embed_folder(
        load_config(args.config, args.overrides),
        args.data,
        args.output,
        encoder=args.encoder,
        random_init=args.random_init,
        raw_grid=raw_grid,
        progress=not args.no_progress,
    )
    return 0
