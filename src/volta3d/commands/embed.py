"""``volta3d embed``: one frozen-encoder embedding per scan (CLS-style summary + mean patch token)."""

from __future__ import annotations

import argparse

from volta3d.config import bundled_configs, load_config, to_kwargs


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="extract one embedding per scan from a frozen encoder (for probes)",
        description="Run a frozen encoder over every scan of a preprocessed folder and save, per scan, the "
        "CLS-style summary (when the export has a summariser) and the mean patch token, with subject ids, "
        "to an .npz file. --random-init gives the honest baseline: the same architecture, untrained.",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help=f"override file(s); bundled: {', '.join(bundled_configs())}")
    p.add_argument("--encoder", default=None,
                   help="encoder export folder; omit to embed with a random-init encoder built from `model:`")
    p.add_argument("--random-init", action="store_true",
                   help="with --encoder: same architecture as the export, random weights (seeded)")
    p.add_argument("--data", required=True, help="folder written by `volta3d preprocess` (holds manifest.csv)")
    p.add_argument("--output", required=True, help="output .npz file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. probe.batch_size=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volta3d.data.dataset import VolumeDataset
    from volta3d.downstream.embeddings import extract_embeddings, save_embeddings
    from volta3d.models.encoder import VolTAEncoder, split_model_section
    from volta3d.models.export import build_from_export, encoder_kwargs_from_meta, read_encoder_export
    from volta3d.models.summariser import CLSSummariser
    from volta3d.runtime import get_logger, resolve_device, seed_everything, setup_logging

    cfg = load_config(args.config, args.overrides)
    setup_logging(None)
    seed_everything(cfg.seed)
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
    dataset = VolumeDataset(args.data)
    emb = extract_embeddings(encoder, summariser, dataset, batch_size=cfg.probe.batch_size,
                             device=resolve_device(cfg.device), progress=not args.no_progress)
    meta = {"encoder": args.encoder, "init": source, "seed": cfg.seed, "data": str(args.data),
            "architecture": encoder.architecture, "features": [k for k in ("cls", "mean") if k in emb]}
    path = save_embeddings(args.output, emb, meta)
    get_logger().info(f"wrote {len(emb['mean'])} embeddings ({', '.join(meta['features'])}) to {path}")
    return 0
