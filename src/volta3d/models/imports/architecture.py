"""The architecture of an imported ViT, read from its (MONAI-keyed) weights where the weights say it.

Width, input channels and patch size come from the patch-embedding kernel ``(E, C, p, p, p)``; the
image edge from the number of position embeddings (a cube of ``(edge / p)^3``); depth from the block
indices; the MLP width from ``mlp.linear1``; ``qkv_bias`` from whether ``attn.qkv.bias`` exists; the
decoder width from a ViTAutoEnc decoder when there is one. The number of attention heads changes no
shape, so it cannot be read: the user gives it. Neither can the input normalisation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from volta3d.models.export import EncoderLoadError

PATCH_KERNEL = "patch_embedding.patch_embeddings.weight"
POSITIONS = "patch_embedding.position_embeddings"
DEFAULT_DECONV_CHNS = 16  # ViTAutoEnc's default, as configs/default.yaml model.deconv_chns
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def _required(state: Mapping[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Tensor:
    tensor = state.get(key)
    if tensor is None or tensor.ndim != ndim:
        found = "missing" if tensor is None else f"of shape {tuple(tensor.shape)}"
        raise EncoderLoadError(
            f"cannot read the architecture from {where}: {key} is {found} (expected {ndim}-D)"
        )
    return tensor


def _patch(kernel: torch.Tensor, where: str) -> int:
    sides = set(kernel.shape[2:])
    if len(sides) != 1:
        raise EncoderLoadError(
            f"{where}: patch {tuple(kernel.shape[2:])} is not a cube; volta3d's encoder takes cubic patches"
        )
    return int(kernel.shape[2])


def _grid_side(positions: torch.Tensor, where: str) -> int:
    n_tokens = positions.shape[1]
    side = round(n_tokens ** (1 / 3))
    if side**3 != n_tokens:
        raise EncoderLoadError(
            f"{where}: {n_tokens} position embeddings are not a cube of tokens (an image that is not a cube, or "
            "a class token); volta3d's encoder takes cubes"
        )
    return side


def _mlp_dim(state: Mapping[str, torch.Tensor], where: str) -> int:
    widths = [v.shape[0] for k, v in state.items() if k.endswith(".mlp.linear1.weight") and v.ndim == 2]
    if not widths:
        raise EncoderLoadError(f"cannot read the architecture from {where}: no blocks.*.mlp.linear1.weight")
    return int(widths[0])


def infer_architecture(
    state: Mapping[str, torch.Tensor], *, num_heads: int | None, input_norm: str, where: str
) -> dict[str, Any]:
    """``VolTAEncoder`` keyword arguments for MONAI-keyed ``state`` at the checkpoint's own image size."""
    kernel = _required(state, PATCH_KERNEL, 5, where)
    positions = _required(state, POSITIONS, 3, where)
    hidden, patch = int(kernel.shape[0]), _patch(kernel, where)
    if num_heads is None:
        raise EncoderLoadError(
            f"{where}: the number of attention heads cannot be read from the weights; pass --num-heads "
            f"(hidden size {hidden}; ViT-B/16 has 12)"
        )
    if num_heads < 1 or hidden % num_heads:
        raise EncoderLoadError(f"--num-heads {num_heads} does not divide the hidden size {hidden}")
    decoder = state.get("conv3d_transpose.weight")
    return {
        "img_size": _grid_side(positions, where) * patch,
        "patch_size": patch,
        "hidden_size": hidden,
        "mlp_dim": _mlp_dim(state, where),
        "num_layers": 1 + max((int(m.group(1)) for k in state if (m := _BLOCK_INDEX.match(k))), default=-1),
        "num_heads": int(num_heads),
        "in_channels": int(kernel.shape[1]),
        "qkv_bias": any(k.endswith(".attn.qkv.bias") for k in state),
        "deconv_chns": int(decoder.shape[1])
        if decoder is not None and decoder.ndim == 5
        else DEFAULT_DECONV_CHNS,
        "dropout": 0.0,
        "input_norm": input_norm,
    }
