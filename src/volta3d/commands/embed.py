"""``volta3d embed``: one frozen-encoder embedding per scan (CLS-style summary + mean patch token),
or, with ``--raw-volume``, the z-scored volume average-pooled to a small grid (the probes' floor)."""

from __future__ import annotations

import argparse
from typing import Any

from volta3d.config import bundled_configs, load_config, to_kwargs

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
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"override file(s); bundled: {', '.join(bundled_configs())}")
    p.add_argument("--encoder", default=None,
                   help="encoder export folder; omit to embed with a random-init encoder built from `model:`")
    p.add_argument("--random-init", action="store_true",
                   help="with --encoder: same architecture as the export, random weights (seeded)")
    p.add_argument("--raw-volume", action="store_true",
                   help="no encoder: features are the z-scored volume average-pooled to a grid (feature 'raw')")
    p.add_argument("--raw-grid", type=int, default=None, metavar="N",
                   help=f"with --raw-volume: cells per axis, N^3 features per channel (default {RAW_GRID})")
    p.add_argument("--data", required=True, help="folder written by `volta3d preprocess` (holds manifest.csv)")
    p.add_argument("--output", required=True, help="output .npz file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. probe.batch_size=4")
    p.set_defaults(func=run)


def _check_source(args: argparse.Namespace) -> None:
    """Exactly one feature source: a one-line error for contradictory flags."""
    if args.raw_volume and (args.encoder or args.random_init):
        flag = "--encoder" if args.encoder else "--random-init"
        raise ValueError(f"--raw-volume embeds the volumes themselves and takes no {flag}")
    if args.raw_grid is not None and not args.raw_volume:
        raise ValueError("--raw-grid applies only with --raw-volume")


def _encoder_embeddings(args: argparse.Namespace, cfg: Any, dataset: Any) -> tuple[dict, dict]:
    from volta3d.downstream.embeddings import extract_embeddings
    from volta3d.models.encoder import VolTAEncoder, split_model_section
    from volta3d.models.export import build_from_export, encoder_kwargs_from_meta, read_encoder_export
    from volta3d.models.summariser import CLSSummariser
    from volta3d.runtime import resolve_device

    if args.encoder and not args.random_init:
        encoder, summariser = build_from_export(args.encoder)
        source = "pretrained"
    else:
        if args.encoder:
            _, meta = read_encoder_export(args.encoder)
            kwargs = encoder_kwargs_from_meta(meta)
            summ_kwargs = meta.get("summariser")
        else:
            kwargs, s = split_model_section(**to_kwargs(cfg.model))
            summ_kwargs = {"dim": kwargs["hidden_size"], "num_heads": s["summariser_heads"],
                           "mlp_ratio": s["summariser_mlp_ratio"]}
        encoder = VolTAEncoder(**kwargs)
        summariser = CLSSummariser(**summ_kwargs) if summ_kwargs else None
        source = "random-init"
    emb = extract_embeddings(encoder, summariser, dataset, batch_size=cfg.probe.batch_size,
                             device=resolve_device(cfg.device), progress=not args.no_progress,
                             tokens="tokens" in cfg.probe.features)  # fmt: skip
    meta = {"encoder": args.encoder, "init": source, "architecture": encoder.architecture,
            "features": [k for k in ("cls", "mean", "tokens") if k in emb]}
    return emb, meta


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from volta3d.data.dataset import VolumeDataset
    from volta3d.downstream.embeddings import extract_raw_embeddings, save_embeddings
    from volta3d.runtime import get_logger, seed_everything, setup_logging

    _check_source(args)
    cfg = load_config(args.config, args.overrides)
    setup_logging(None)
    seed_everything(cfg.seed)
    dataset = VolumeDataset(args.data)
    if args.raw_volume:
        grid = args.raw_grid if args.raw_grid is not None else RAW_GRID
        emb = extract_raw_embeddings(dataset, grid, batch_size=cfg.probe.batch_size, progress=not args.no_progress)
        meta = {"encoder": None, "init": "raw-volume", "grid": grid, "features": ["raw"]}
    else:
        emb, meta = _encoder_embeddings(args, cfg, dataset)
    bad = [k for k in meta["features"] if not np.isfinite(emb[k]).all()]
    if bad:  # a broken encoder must not leave NaN features for a probe to choke on later
        raise ValueError(f"non-finite '{bad[0]}' embeddings from {args.encoder or 'the random-init encoder'} on {args.data}; "
                         "the encoder weights hold NaN/Inf or the volumes do")
    meta = {**meta, "seed": cfg.seed, "data": str(args.data)}
    path = save_embeddings(args.output, emb, meta)
    get_logger().info(f"wrote {len(emb['subject_id'])} embeddings ({', '.join(meta['features'])}) to {path}")
    return 0
