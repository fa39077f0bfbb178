"""The slim encoder export every downstream task loads: ``encoder.safetensors`` + ``encoder.json``.

The weights keep MONAI ViTAutoEnc's keys unchanged (``patch_embedding.*``, ``blocks.{i}.*``,
``norm.*``, ``conv3d_transpose*``); the summariser sits under ``summariser.``. The JSON names the
architecture so the encoder can be rebuilt without the training config. ``load_vit_weights``
puts the ViT part into MONAI's ``ViTAutoEnc``, ``ViT`` or ``UNETR.vit``, checking every key and
shape and resampling the position embedding when the target's token grid differs.

ViTAutoEnc (and so the whole export, decoder included) takes only a square patch size, UNETR only
16. For any other patch (8, 12, ...) the decoder keys have the same names but the kernel shapes of
``decoder_strides`` (JSON ``decoder_strides``; ``architecture`` then reads ``monai.ViT``): the ViT
part loads into MONAI's ``ViT`` (the default ``drop_decoder``), the whole export into ``VolTAEncoder``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from volta3d import layout
from volta3d.errors import InputError, InputFileNotFound
from volta3d.models.encoder import VolTAEncoder, encoder_from_architecture, interpolate_pos_embed
from volta3d.models.summariser import CLSSummariser
from volta3d.runtime import atomic_write

EXPORT_FORMAT = "volta3d-encoder"
EXPORT_FORMAT_VERSION = 1
SUMMARISER_PREFIX = "summariser."
DECODER_PREFIX = "conv3d_transpose"
POS_EMBED_KEY = "patch_embedding.position_embeddings"
# keys a MONAI ViT target may own that the export never holds (ViT(classification=True) extras)
TARGET_ONLY_KEYS = ("cls_token", "classification_head.")
META_DESCRIBED = f"the architecture {layout.ENCODER_META} describes"


class EncoderLoadError(InputError):
    """Encoder weights that do not fit the target (names the keys) or an unreadable export."""


def _cpu_state(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def save_encoder_export(
    out_dir: str | Path,
    encoder: VolTAEncoder,
    summariser: CLSSummariser | None,
    provenance: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``encoder.safetensors`` and ``encoder.json`` into ``out_dir``; return both paths.

    ``provenance`` (what pretraining saw: subject ids, volume hashes, preprocessing) goes into the
    JSON so downstream runs can say whether their test subjects were in the pretraining set; ``training``
    (the optimiser step, the share of the initial weights still in the exported teacher) says how far
    pretraining got."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _cpu_state(encoder)
    if summariser is not None:
        state.update(_cpu_state(summariser, SUMMARISER_PREFIX))
    square = encoder.decoder_strides[0] == encoder.decoder_strides[1]  # MONAI's ViTAutoEnc decoder
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "architecture": "monai.ViTAutoEnc" if square else "monai.ViT",
        "decoder_strides": list(encoder.decoder_strides),
        **encoder.architecture,
        "summariser": summariser.architecture if summariser is not None else None,
        "monai_version": monai.__version__,
        "torch_version": torch.__version__,
        "provenance": provenance,
        "training": training,
    }
    weights_path, meta_path = out_dir / layout.ENCODER_WEIGHTS, out_dir / layout.ENCODER_META
    atomic_write(weights_path, lambda f: f.write(save(state, metadata={"format": EXPORT_FORMAT})))
    atomic_write(meta_path, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode()))
    return weights_path, meta_path


def export_paths(path_or_dir: str | Path) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths of an export given as its folder, its ``.safetensors`` or its ``.json``."""
    path = Path(path_or_dir)
    if path.is_dir():
        return path / layout.ENCODER_WEIGHTS, path / layout.ENCODER_META
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    return path, path.with_suffix(".json")


def read_encoder_meta(path_or_dir: str | Path) -> dict[str, Any]:
    """An export's metadata, checked, without loading its weights (the file must still be there)."""
    weights_path, meta_path = export_paths(path_or_dir)
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise InputFileNotFound(f"encoder export file not found: {p}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EncoderLoadError(f"cannot parse encoder metadata {meta_path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise EncoderLoadError(f"{meta_path} is not a {EXPORT_FORMAT} export (format: {found!r})")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise EncoderLoadError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this volta3d reads {EXPORT_FORMAT_VERSION}"
        )
    return meta


def read_encoder_export(path_or_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state, meta)`` from an export folder, its ``.safetensors`` or its ``.json``."""
    meta = read_encoder_meta(path_or_dir)
    weights_path = export_paths(path_or_dir)[0]
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EncoderLoadError(f"cannot read encoder weights {weights_path}: {reason}") from None
    return state, meta


def encoder_kwargs_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``VolTAEncoder`` keyword arguments recorded in an export's metadata."""
    names = (
        "img_size",
        "patch_size",
        "hidden_size",
        "mlp_dim",
        "num_layers",
        "num_heads",
        "in_channels",
        "qkv_bias",
        "deconv_chns",
        "dropout",
        "input_norm",
    )
    missing = [n for n in names if n not in meta]
    if missing:
        raise EncoderLoadError(f"encoder metadata lacks {', '.join(missing)}")
    return {n: meta[n] for n in names}


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    indices = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    return len(indices)


def check_meta_fits_weights(
    state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], kwargs: Mapping[str, Any]
) -> None:
    """Compare ``encoder.json`` with the safetensors shapes before anything is allocated: metadata
    claiming 100 layers of width 8192 must fail in milliseconds, not after gigabytes. The modules are
    built on torch's ``meta`` device (shapes only, no memory)."""
    for key in ("num_layers", "hidden_size", "mlp_dim", "img_size", "patch_size", "num_heads", "in_channels"):
        value = kwargs[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EncoderLoadError(f"encoder metadata: {key} must be a positive integer, got {value!r}")
    layers = _layer_count(state)
    if kwargs["num_layers"] != layers:
        raise EncoderLoadError(
            f"encoder metadata claims num_layers={kwargs['num_layers']} but the weights hold {layers} blocks"
        )
    width = state.get("norm.weight")
    if width is not None and tuple(width.shape) != (kwargs["hidden_size"],):
        raise EncoderLoadError(
            f"encoder metadata claims hidden_size={kwargs['hidden_size']} but the weights have width {width.shape[0]}"
        )
    try:
        with torch.device("meta"):
            expected = encoder_from_architecture(kwargs).state_dict()
            summariser = CLSSummariser(**meta["summariser"]) if meta.get("summariser") is not None else None
    except (TypeError, ValueError) as err:
        raise EncoderLoadError(f"encoder metadata does not describe a buildable encoder: {err}") from None
    vit_state = {k: v for k, v in state.items() if not k.startswith(SUMMARISER_PREFIX)}
    _raise_if_unfit("encoder", vit_state, expected, target=META_DESCRIBED)
    if summariser is not None:
        summariser_state = {
            k[len(SUMMARISER_PREFIX) :]: v for k, v in state.items() if k.startswith(SUMMARISER_PREFIX)
        }
        _raise_if_unfit("summariser", summariser_state, summariser.state_dict(), target=META_DESCRIBED)


def build_from_export(
    path_or_dir: str | Path, img_size: int | None = None, fused_attention: bool = True
) -> tuple[VolTAEncoder, CLSSummariser | None]:
    """Rebuild the encoder (and summariser) and load the weights strictly.

    ``img_size`` builds the position embedding for another cube edge (resampled from the export's).
    """
    state, meta = read_encoder_export(path_or_dir)
    kwargs = encoder_kwargs_from_meta(meta)
    check_meta_fits_weights(state, meta, kwargs)
    source_grid = (kwargs["img_size"] // kwargs["patch_size"],) * 3
    if img_size is not None:
        kwargs["img_size"] = int(img_size)
    encoder = encoder_from_architecture(kwargs, fused_attention=fused_attention)
    load_vit_weights(
        encoder, state, drop_decoder=False, source_grid=source_grid, target_grid=encoder.native_grid
    )

    summariser_state = {
        k[len(SUMMARISER_PREFIX) :]: v for k, v in state.items() if k.startswith(SUMMARISER_PREFIX)
    }
    summariser = None
    if meta.get("summariser") is not None:
        summariser = CLSSummariser(**meta["summariser"])
        _load_exact(summariser, summariser_state, what="summariser")
    elif summariser_state:
        raise EncoderLoadError("export holds summariser.* weights but its metadata has no summariser")
    return encoder, summariser


def _format_keys(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    _raise_if_unfit(what, state, module.state_dict())
    module.load_state_dict(state, strict=True)


def _raise_if_unfit(
    what: str,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    target: str = "the target",
) -> None:
    """Compare every key and shape of ``state`` (the export) with ``expected`` (the target's state
    dict) and raise one error naming what is missing, unexpected or of another shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} export {tuple(state[k].shape)} vs target {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the export: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"not in the target: {_format_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_format_keys(mismatched, limit=3)}")
    if problems:
        raise EncoderLoadError(f"{what} weights do not fit {target}: " + "; ".join(problems))


def _cube_grid(n_tokens: int, which: str) -> tuple[int, int, int]:
    side = round(n_tokens ** (1 / 3))
    if side**3 != n_tokens:
        raise EncoderLoadError(
            f"cannot infer the {which} token grid from {n_tokens} position embeddings (not a cube); pass {which}_grid"
        )
    return (side, side, side)


def load_vit_weights(
    target: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str = "",
    drop_decoder: bool = True,
    source_grid: Sequence[int] | None = None,
    target_grid: Sequence[int] | None = None,
) -> None:
    """Load an export's ViT weights into a MONAI ``ViTAutoEnc`` / ``ViT`` (prefix ``""``) or ``UNETR``
    (prefix ``"vit."``).

    Every ViT key of the target under ``prefix`` must come from the export with the same shape, and
    every export key must land in the target; ``summariser.*`` keys are never ViT keys, the decoder's
    ``conv3d_transpose*`` keys are left out when ``drop_decoder``, and a ``ViT``'s own ``cls_token`` /
    ``classification_head`` stay as initialised. The position embedding is resampled when the grids
    differ; grids default to a cube inferred from the token count. Raises ``EncoderLoadError`` naming
    the keys that do not fit.
    """
    vit_state = {k: v for k, v in state.items() if not k.startswith(SUMMARISER_PREFIX)}
    if drop_decoder:
        vit_state = {k: v for k, v in vit_state.items() if not k.startswith(DECODER_PREFIX)}
    target_full = target.state_dict()
    target_state = {
        k[len(prefix) :]: v
        for k, v in target_full.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(TARGET_ONLY_KEYS)
    }
    if not target_state:
        raise EncoderLoadError(f"target {type(target).__name__} has no parameters under prefix '{prefix}'")

    if POS_EMBED_KEY in vit_state and POS_EMBED_KEY in target_state:
        source_pos, target_pos = vit_state[POS_EMBED_KEY], target_state[POS_EMBED_KEY]
        if source_pos.shape[-1] == target_pos.shape[-1] and source_pos.shape[1] != target_pos.shape[1]:
            old = tuple(source_grid) if source_grid is not None else _cube_grid(source_pos.shape[1], "source")
            new = tuple(target_grid) if target_grid is not None else _cube_grid(target_pos.shape[1], "target")
            if math.prod(new) != target_pos.shape[1]:
                raise EncoderLoadError(f"target_grid {new} does not hold {target_pos.shape[1]} tokens")
            vit_state[POS_EMBED_KEY] = interpolate_pos_embed(source_pos, old, new)

    _raise_if_unfit("encoder", vit_state, target_state)

    target.load_state_dict({prefix + k: v for k, v in vit_state.items()}, strict=False)
