"""``volta3d import-encoder``: a public 3D ViT checkpoint -> volta3d's encoder export (``--encoder`` everywhere)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from volta3d import layout
from volta3d.errors import InputError

LAYOUTS = (
    "MONAI ViT / ViTAutoEnc / UNETR (its vit.) state dicts of any MONAI version, BrainIAC's Lightning checkpoint "
    "(backbone. under state_dict), DINO / DINOv2-style checkpoints (teacher / student, module. and backbone. "
    "prefixes; MONAI or timm key names, without class or register tokens)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-encoder",
        help="import a public 3D ViT encoder (MONAI, BrainIAC, DINO-style) as a volta3d encoder export",
        description=f"Write OUTPUT/encoder.safetensors + encoder.json from a checkpoint on disk: {LAYOUTS}. "
        ".pt / .pth / .ckpt files are read with torch.load(weights_only=True) (a pickle that needs more than "
        "tensors is refused, never run); .safetensors as is. Width, depth, patch, image size, MLP width, "
        "qkv bias and input channels are read from the weights; every key must map or be dropped for a "
        "stated reason, and one error names all that do not fit. The export works with every --encoder "
        "option (embed, probe, finetune, predict) and with `pretrain --init`; encoder.json records where "
        "the weights came from and that their pretraining data is unknown to volta3d.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help=".pt / .pth / .ckpt / .bin / .safetensors file")
    p.add_argument(
        "--output", required=True, help="export folder to write (encoder.safetensors + encoder.json)"
    )
    p.add_argument(
        "--num-heads", type=int, default=None, help="attention heads (no shape records them; ViT-B: 12)"
    )
    p.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="the export's cube edge; default the checkpoint's (position embedding resampled)")  # fmt: skip
    p.add_argument("--input-norm", choices=("zscore", "none"), default="zscore",
                   help="what the encoder does to each input volume first: zscore (per-volume standardisation, "
                   "volta3d's default) or none (volumes as cached, on [0, 1])")  # fmt: skip
    p.add_argument("--prefix", default=None, help="key prefix of the encoder when the checkpoint holds several "
                   "(e.g. student.module.backbone.); default the only one, else the teacher's")  # fmt: skip
    p.add_argument("--layer-norm-eps", type=float, default=None,
                   help="epsilon of the source's LayerNorms, timm / DINO layouts (default 1e-6, as they build them)")  # fmt: skip
    p.add_argument("--in-channels", type=int, default=1,
                   help="input channels, read for a MONAI perceptron patch embedding only (default 1)")  # fmt: skip
    p.add_argument(
        "--source", default=None, help="where the weights came from (URL, paper), kept in encoder.json"
    )
    p.add_argument(
        "--licence", default=None, help="the weights' licence as their authors state it, kept in encoder.json"
    )
    p.add_argument(
        "--note", default=None, help="free text kept in encoder.json (e.g. 'skull-stripped, MNI-registered')"
    )
    p.add_argument("--preprocessing", action="append", default=[], metavar="KEY=VALUE",
                   help="the preprocessing the encoder expects, as `volta3d preprocess` settings (e.g. spacing=1.0, "
                   "orientation=RAS); repeatable. Downstream commands warn when their data differs; size defaults "
                   "to the export's cube")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the weights a ViT lacks (the GMML decoder)")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in OUTPUT")
    p.set_defaults(func=run, claims="folder")


def parse_preprocessing(items: list[str]) -> dict[str, Any]:
    """``["spacing=1.0", "size=96"]`` -> ``{"spacing": 1.0, "size": 96}`` for the settings downstream compares."""
    import yaml

    from volta3d.models.provenance import COMPARED_SETTINGS

    declared: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in COMPARED_SETTINGS:
            raise InputError(
                f"--preprocessing {item!r}: expected KEY=VALUE with KEY one of {', '.join(COMPARED_SETTINGS)}"
            )
        declared[key] = yaml.safe_load(value)
    return declared


def _summary(record: dict[str, Any], meta: dict[str, Any], output: str) -> list[str]:
    """What was imported and how: the architecture, then every conversion, dropped and initialised key."""
    ext = record["external"]
    lines = [
        f"imported a {ext['layout']} ViT (encoder under {ext['prefix']!r}) from {ext['checkpoint']} to {output}",
        f"  {meta['num_layers']} blocks of width {meta['hidden_size']} (MLP {meta['mlp_dim']}, {meta['num_heads']} "
        f"heads, qkv bias {meta['qkv_bias']}), patch {meta['patch_size']}, {meta['img_size']}^3 (checkpoint "
        f"{ext['img_size']['checkpoint']}^3), {meta['in_channels']} channel(s), input_norm {meta['input_norm']}",
    ]
    lines += [f"  converted: {note}" for note in ext["converted"]]
    lines += [f"  dropped {key}: {why}" for key, why in ext["dropped"].items()]
    lines += [f"  initialised {key}: {why}" for key, why in ext["initialised"].items()]
    outside = ext["outside_encoder"]
    if outside["tensors"]:
        lines.append(
            f"  not the encoder: {outside['tensors']} other tensors, e.g. {', '.join(outside['examples'][:3])}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from volta3d.models.imports import ImportOptions, import_encoder

    if (Path(args.output) / layout.ENCODER_META).exists() and not args.overwrite:
        raise InputError(f"{args.output} already holds an encoder export; pass --overwrite to replace it")
    options = ImportOptions(
        num_heads=args.num_heads, img_size=args.img_size, input_norm=args.input_norm, prefix=args.prefix,
        layer_norm_eps=args.layer_norm_eps, in_channels=args.in_channels, source=args.source, licence=args.licence, note=args.note,
        preprocessing=parse_preprocessing(args.preprocessing), seed=args.seed,
    )  # fmt: skip
    record = import_encoder(args.checkpoint, args.output, options)
    meta = json.loads((Path(args.output) / layout.ENCODER_META).read_text())
    print("\n".join(_summary(record, meta, args.output)))
    return 0
