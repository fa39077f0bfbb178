"""Segmentation models compared in paper II-C: UNETR (Hatamizadeh et al., WACV 2022) with its ViT
initialised from a VolTA-3D export ('VolTA-3D'), the same UNETR from scratch ('UNETR-Scratch'), and
MONAI's 3D ``UNet`` with channels (16, 32, 64, 128, 256) and strides (2, 2, 2, 2) ('3D U-Net-Scratch').

MONAI's ``UNETR`` hard-codes patch 16 and 12 layers, so an encoder pretrained with finer tokens could
not segment, and a 32^3 crop gave its encoder a 2 x 2 x 2 grid. ``AnyPatchUNETR`` composes the same
MONAI blocks for any patch p = 2^n (n >= 2) and has n up-sampling stages. Its modules are named by
resolution level j (the input's grid is level 0, the tokens' level n):

* ``encoder1``: ``UnetrBasicBlock`` on the input (level 0);
* ``encoder{j+1}``, j = 1..n-1: ``UnetrPrUpBlock`` from hidden state ``L*j//n`` up to level j;
* ``decoder{j+2}``, j = n-1..0: ``UnetrUpBlock`` from level j+1 (the final tokens for j = n-1) to j;
* ``out``: ``UnetOutBlock``; ``vit``: MONAI ``ViT`` as UNETR builds it.

For p = 16 (n = 4) these are MONAI UNETR's modules, keys and shapes (``encoder1..4``,
``decoder5..2``, hidden states 3, 6, 9 of 12), so saved UNETR weights load unchanged; for p = 8
(n = 3) they are ``encoder1..3`` and ``decoder4..2``, each at the resolution its p = 16 namesake has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from monai.networks.nets import UNet, ViT

from volta3d.downstream.networks import network_builder
from volta3d.errors import InputError
from volta3d.models.export import (
    EncoderLoadError,
    encoder_kwargs_from_meta,
    load_vit_weights,
    read_encoder_export,
)
from volta3d.models.input_norm import StandardisedInput


def unetr_stages(patch_size: int, num_layers: int) -> int:
    """n for patch 2^n: the decoder's up-sampling stages. Each of the n - 1 skip levels reads its own
    hidden state, so the ViT needs at least n layers."""
    if patch_size < 4 or patch_size & (patch_size - 1):
        raise InputError(
            f"UNETR needs a patch size that is a power of two >= 4 (8, 16, ...), got {patch_size}"
        )
    stages = patch_size.bit_length() - 1
    if num_layers < stages:
        raise InputError(
            f"UNETR with patch {patch_size} up-samples in {stages} stages and needs num_layers >= {stages}, "
            f"got {num_layers}"
        )
    return stages


class AnyPatchUNETR(nn.Module):
    """UNETR (Hatamizadeh et al., WACV 2022) for patch 2^n, composed of MONAI's UNETR blocks (module
    names in the module docstring). ``(B, C, D, H, W) -> (B, out_channels, D, H, W)`` logits for
    ``img_size``^3 inputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        img_size: int,
        *,
        patch_size: int,
        num_layers: int,
        feature_size: int,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        qkv_bias: bool,
        norm_name: str = "instance",
        dropout_rate: float = 0.0,
    ) -> None:
        super().__init__()
        stages = unetr_stages(patch_size, num_layers)
        self.patch_size, self.num_layers = patch_size, num_layers
        self.grid = (img_size // patch_size,) * 3
        # hidden state per skip level j = 1..n-1 (MONAI's 3, 6, 9 for 12 layers at patch 16)
        self.taps = tuple(num_layers * j // stages for j in range(1, stages))
        self.vit = ViT(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type="conv",
            classification=False, dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=qkv_bias,
        )  # fmt: skip
        block: dict[str, Any] = dict(spatial_dims=3, kernel_size=3, norm_name=norm_name, res_block=True)
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size, stride=1, **block)
        # level j sits 2^(n-j) above the tokens: the block's first up-sampling and n-j-1 more
        for j in range(1, stages):
            self.add_module(f"encoder{j + 1}", UnetrPrUpBlock(
                in_channels=hidden_size, out_channels=feature_size * 2**j, num_layer=stages - j - 1, stride=1,
                upsample_kernel_size=2, conv_block=True, **block,
            ))  # fmt: skip
        for j in reversed(range(stages)):
            width_in = hidden_size if j == stages - 1 else feature_size * 2 ** (j + 1)
            self.add_module(f"decoder{j + 2}", UnetrUpBlock(
                in_channels=width_in, out_channels=feature_size * 2**j, upsample_kernel_size=2, **block,
            ))  # fmt: skip
        self.out = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)

    def _volume(self, tokens: torch.Tensor) -> torch.Tensor:
        volume = tokens.reshape(tokens.shape[0], *self.grid, tokens.shape[-1])  # (B, N, E) -> (B, d, h, w, E)
        return volume.permute(0, 4, 1, 2, 3).contiguous()  # (B, d, h, w, E) -> (B, E, d, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, hidden_states = self.vit(x)  # (B, N, E) after the final norm; num_layers x (B, N, E)
        skips = [self.encoder1(x)]  # level j: (B, feature_size * 2^j, D / 2^j, H / 2^j, W / 2^j)
        for j, tap in enumerate(self.taps, start=1):
            skips.append(self.get_submodule(f"encoder{j + 1}")(self._volume(hidden_states[tap])))
        y = self._volume(tokens)
        for j in reversed(range(len(skips))):
            y = self.get_submodule(f"decoder{j + 2}")(y, skips[j])
        return self.out(y)


class ZScoreUNETR(StandardisedInput, AnyPatchUNETR):
    """UNETR behind the project's input standardisation (same state-dict keys as ``AnyPatchUNETR``)."""


class ZScoreUNet(StandardisedInput, UNet):
    """MONAI UNet behind the project's input standardisation (same state-dict keys as UNet)."""


def _export_sizes(encoder: str | Path, in_channels: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The export's weights and the ``AnyPatchUNETR`` sizes it fixes (ViT widths, depth, patch, input
    normalisation); EncoderLoadError names the export when it cannot feed a UNETR."""
    state, meta = read_encoder_export(encoder)
    arch = encoder_kwargs_from_meta(meta)
    if arch["in_channels"] != in_channels:
        raise EncoderLoadError(
            f"encoder export {encoder} takes {arch['in_channels']} channels, data has {in_channels}"
        )
    try:
        unetr_stages(arch["patch_size"], arch["num_layers"])
    except InputError as err:
        raise EncoderLoadError(f"encoder export {encoder}: {err}") from None
    names = ("patch_size", "num_layers", "hidden_size", "mlp_dim", "num_heads", "qkv_bias", "input_norm")
    return state, {k: arch[k] for k in names}


# A model.json v1 record written before build_unetr took patch_size and num_layers omits them: that UNETR
# had MONAI UNETR's fixed patch 16 and 12 layers (volta3d.downstream.saved rebuilds it with these).
UNRECORDED_UNETR_SIZES: dict[str, Any] = {"patch_size": 16, "num_layers": 12}


def build_unetr(
    in_channels: int,
    out_channels: int,
    img_size: int,
    *,
    encoder: str | Path | None = None,
    patch_size: int,
    num_layers: int,
    hidden_size: int,
    mlp_dim: int,
    num_heads: int,
    qkv_bias: bool,
    feature_size: int,
    input_norm: str,
    dropout: float = 0.0,
) -> AnyPatchUNETR:
    """UNETR for ``img_size``^3 crops: the ViT's sizes are the ``model:`` keys of the same names, the
    decoder width ``segment.feature_size``. With ``encoder``, the ViT's patch, depth, width / heads / MLP /
    qkv bias and the input normalisation come from the export (those arguments are ignored). ``dropout``
    is UNETR's own (0: not ``model.dropout``, which is the pretraining encoder's); a saved model's record
    omits it."""
    sizes: dict[str, Any] = dict(
        patch_size=patch_size, num_layers=num_layers, hidden_size=hidden_size, mlp_dim=mlp_dim,
        num_heads=num_heads, qkv_bias=qkv_bias, input_norm=input_norm,
    )  # fmt: skip
    state = None
    if encoder is not None:
        state, exported = _export_sizes(encoder, in_channels)
        sizes.update(exported)
    unetr_stages(sizes["patch_size"], sizes["num_layers"])  # a bad patch or depth before the crop it sets
    if img_size % sizes["patch_size"]:
        raise InputError(
            f"segment.crop_size ({img_size}) must be a multiple of the UNETR patch size {sizes['patch_size']}"
        )
    net = (ZScoreUNETR if sizes.pop("input_norm") == "zscore" else AnyPatchUNETR)(
        in_channels, out_channels, img_size, feature_size=feature_size,
        norm_name="instance", dropout_rate=dropout, **sizes,  # paper II-C: instance normalisation
    )  # fmt: skip
    if state is not None:
        load_vit_weights(net, state, prefix="vit.")
    return net


def build_unet(
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    *,
    num_res_units: int,
    dropout: float = 0.0,
) -> UNet:
    """3D U-Net from scratch (paper II-C channels and strides; MONAI's residual units, as in its
    spleen / BTCV tutorials: ``num_res_units`` is ``segment.unet_res_units``)."""
    return ZScoreUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=tuple(strides),
        num_res_units=num_res_units,
        norm="instance",
        dropout=dropout,
    )


@dataclass(frozen=True)
class SegmenterSpec:
    """What any segmenter is built from; each network reads its own keyword arguments."""

    in_channels: int
    out_channels: int
    img_size: int  # the crop edge
    encoder: str | Path | None = None  # a VolTA-3D export to start from
    unetr_kwargs: dict[str, Any] | None = None
    unet_kwargs: dict[str, Any] | None = None


def unetr_segmenter(spec: SegmenterSpec) -> AnyPatchUNETR:
    return build_unetr(
        spec.in_channels, spec.out_channels, spec.img_size, encoder=spec.encoder, **(spec.unetr_kwargs or {})
    )


def unet_segmenter(spec: SegmenterSpec) -> UNet:
    unet = build_unet(spec.in_channels, spec.out_channels, **(spec.unet_kwargs or {}))
    stride = math.prod(unet.strides)  # each level halves the crop; its skip must match on the way up
    if spec.img_size % stride:
        raise InputError(
            f"segment.crop_size ({spec.img_size}) must be a multiple of the 3D U-Net's total stride {stride} "
            f"(strides {list(unet.strides)})"
        )
    return unet


def build_segmenter(
    model: str,
    in_channels: int,
    out_channels: int,
    img_size: int,
    *,
    encoder: str | Path | None = None,
    unetr_kwargs: dict[str, Any] | None = None,
    unet_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The segmenter ``model`` names (``volta3d.downstream.networks``), built from a ``SegmenterSpec``."""
    spec = SegmenterSpec(in_channels, out_channels, img_size, encoder, unetr_kwargs, unet_kwargs)
    return network_builder("segment", model, encoder)(spec)
