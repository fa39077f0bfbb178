"""``volta3d import-encoder``: a public 3D ViT checkpoint -> volta3d's own encoder export.

The checkpoint is read without running it (``reader``), its encoder found by an anchor key (``locate``),
its keys mapped to MONAI's (``monai_keys``, ``timm_keys``) and its architecture read from the weights
(``architecture``). Every key of the MONAI ViT must then come from the checkpoint with its shape, or
keep its initialisation for a stated reason (the GMML decoder a ViT lacks, MONAI's unused
cross-attention norms); every encoder key of the checkpoint must be used, or dropped for a stated reason.
One error names whatever does not fit. The result is written with ``save_encoder_export``, so every
command that takes ``--encoder`` (and ``pretrain --init``) reads it like an export of volta3d's own, and
``encoder.json``'s ``provenance.external`` says where the weights came from (pretraining data unknown).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder, encoder_from_architecture
from volta3d.models.export import (
    DECODER_PREFIX,
    EncoderLoadError,
    build_from_export,
    load_vit_weights,
    save_encoder_export,
)
from volta3d.models.imports.architecture import infer_architecture
from volta3d.models.imports.locate import choose_root, encoder_roots
from volta3d.models.imports.mapping import KeyMapping, by_pattern
from volta3d.models.imports.monai_keys import map_monai
from volta3d.models.imports.reader import read_checkpoint_tensors
from volta3d.models.imports.timm_keys import MONAI_LAYER_NORM_EPS, TIMM_LAYER_NORM_EPS, map_timm
from volta3d.runtime import file_sha256

FRESH_DECODER = (
    "the GMML reconstruction decoder (ViTAutoEnc's), which the checkpoint lacks: seeded initialisation"
)
UNKNOWN_DATA = "unknown to volta3d"


@dataclass(frozen=True)
class ImportOptions:
    """What the weights cannot say (heads, input normalisation, the source's LayerNorm epsilon, the
    channels a perceptron embedding flattened), the export's image edge, and what the record keeps."""

    num_heads: int | None = None
    img_size: int | None = (
        None  # the export's cube edge; None: the checkpoint's (position embedding resampled)
    )
    input_norm: str = "zscore"
    prefix: str | None = None  # the encoder's key prefix when the checkpoint holds several
    layer_norm_eps: float | None = None  # the source's LayerNorm epsilon: timm / DINO layouts (default 1e-6)
    in_channels: int = 1  # MONAI perceptron patch embedding only
    source: str | None = None
    licence: str | None = None
    note: str | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=dict)  # the preprocessing the encoder expects
    seed: int = 0


def _format(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _refuse(m: KeyMapping, root: str, where: str) -> None:
    """One error for a network that is not a plain ViT (class or register tokens, 2D)."""
    if not m.refused:
        return
    reasons: dict[str, list[str]] = {}
    for key, reason in sorted(m.refused.items()):
        reasons.setdefault(reason, []).append(root + key)
    raise EncoderLoadError(
        f"{where} does not fit volta3d's encoder: "
        + "; ".join(f"{_format(k)}: {r}" for r, k in reasons.items())
    )


def _check_fit(m: KeyMapping, expected: Mapping[str, torch.Tensor], root: str, where: str) -> None:
    """One error naming every missing (MONAI names), unmapped and mis-shaped key (checkpoint names)."""
    missing = sorted(k for k in expected if k not in m.state and k not in m.from_init)
    unmapped = sorted(root + k for k in m.unknown) + sorted(
        root + m.sources[k] for k in m.state if k not in expected
    )
    mis_shaped = [
        f"{root}{m.sources[k]} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in sorted(m.state.items())
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{what}: {_format(keys)}"
        for what, keys in (
            ("missing (MONAI names)", missing),
            ("not mapped", unmapped),
            ("shape mismatch", mis_shaped),
        )
        if keys
    ]
    if problems:
        raise EncoderLoadError(
            f"{where} does not fit the MONAI ViT its weights describe: " + "; ".join(problems)
        )


def _mapping(sub: dict[str, torch.Tensor], layout: str, options: ImportOptions) -> KeyMapping:
    if layout == "timm":
        return map_timm(sub, options.layer_norm_eps or TIMM_LAYER_NORM_EPS)
    if options.layer_norm_eps not in (None, MONAI_LAYER_NORM_EPS):
        raise InputError(
            f"--layer-norm-eps applies to timm / DINO layouts; MONAI's LayerNorms use {MONAI_LAYER_NORM_EPS:g}"
        )
    return map_monai(sub, options.in_channels)


def _build(m: KeyMapping, root: str, options: ImportOptions, where: str) -> VolTAEncoder:
    """The encoder at the checkpoint's image edge, every key from the checkpoint or its stated initialisation."""
    arch = infer_architecture(
        m.state, num_heads=options.num_heads, input_norm=options.input_norm, where=where
    )
    torch.manual_seed(options.seed)  # the initialised keys (a decoder a ViT lacks) are reproducible
    encoder = encoder_from_architecture(arch)
    fresh = encoder.state_dict()
    if not any(k.startswith(DECODER_PREFIX) for k in m.state):
        m.from_init.update({k: FRESH_DECODER for k in fresh if k.startswith(DECODER_PREFIX)})
    _check_fit(m, fresh, root, where)
    encoder.load_state_dict({**fresh, **m.state}, strict=True)
    return encoder


def cube_edge(encoder: VolTAEncoder) -> int:
    """The cube edge the encoder's position embedding is built for (``img_size``)."""
    return int(encoder.native_grid[0]) * int(encoder.patch_size[0])


def resized(encoder: VolTAEncoder, img_size: int) -> VolTAEncoder:
    """The same encoder for another cube edge: the position embedding resampled trilinearly to the new
    token grid (``interpolate_pos_embed``); every other weight is unchanged."""
    if img_size == cube_edge(encoder):
        return encoder
    arch: dict[str, Any] = {**encoder.architecture, "img_size": img_size}
    target = encoder_from_architecture(arch)
    load_vit_weights(target, encoder.state_dict(), drop_decoder=False, source_grid=encoder.native_grid,
                     target_grid=target.native_grid)  # fmt: skip
    return target


def _declared_preprocessing(options: ImportOptions, img_size: int) -> dict[str, Any]:
    """The preprocessing the encoder expects, as ``volta3d preprocess`` settings: what the user declared,
    and the cube its position embedding is built for (``size``) unless declared."""
    declared = dict(options.preprocessing)
    size = declared.get("size", img_size)
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size] * 3
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise InputError(f"preprocessing size must be an edge or [D, H, W] in voxels, got {size!r}")
    return {**declared, "size": size}


def _record(
    path: Path, root: str, roots: Mapping[str, str], m: KeyMapping, outside: list[str], options: ImportOptions,
    source_img_size: int, encoder: VolTAEncoder,
) -> dict[str, Any]:  # fmt: skip
    """``encoder.json``'s ``provenance``: an external encoder whose pretraining data volta3d does not know."""
    given: dict[str, Any] = {"num_heads": options.num_heads, "input_norm": options.input_norm}
    if m.layout == "timm":
        given["layer_norm_eps"] = options.layer_norm_eps or TIMM_LAYER_NORM_EPS
    external = {
        "checkpoint": str(path.resolve()), "sha256": file_sha256(path), "source": options.source,
        "licence": options.licence, "note": options.note, "pretraining_data": UNKNOWN_DATA,
        "layout": m.layout, "prefix": root, "other_encoders": sorted(r for r in roots if r != root),
        "given": given, "img_size": {"checkpoint": source_img_size, "export": cube_edge(encoder)},
        "converted": m.notes, "dropped": by_pattern(m.dropped), "initialised": by_pattern(m.from_init),
        "outside_encoder": {"tensors": len(outside), "examples": outside[:5]}, "seed": options.seed,
    }  # fmt: skip
    return {
        "external": external,
        "preprocessing": [_declared_preprocessing(options, cube_edge(encoder))],
    }


def import_encoder(
    checkpoint: str | Path, output: str | Path, options: ImportOptions | None = None
) -> dict[str, Any]:
    """Write ``output/encoder.safetensors`` + ``encoder.json`` from ``checkpoint``; return the provenance
    record. Raises ``InputError`` (one line) for a file that is unsafe, unreadable or does not fit."""
    options = options or ImportOptions()
    path = Path(checkpoint)
    tensors = read_checkpoint_tensors(path)
    roots = encoder_roots(tensors)
    root = choose_root(roots, options.prefix, str(path))
    where = f"{path} (encoder under {root!r})" if root else str(path)
    m = _mapping({k[len(root) :]: v for k, v in tensors.items() if k.startswith(root)}, roots[root], options)
    _refuse(m, root, where)
    encoder = _build(m, root, options, where)
    source_img_size = cube_edge(encoder)
    encoder = resized(encoder, options.img_size or source_img_size)
    outside = sorted(k for k in tensors if not k.startswith(root))
    record = _record(path, root, roots, m, outside, options, source_img_size, encoder)
    save_encoder_export(output, encoder.eval(), None, provenance=record)
    build_from_export(output)  # the written export rebuilds strictly, as every --encoder command will
    return record
