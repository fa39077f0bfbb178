"""Segmentation models compared in paper II-C: MONAI ``UNETR`` with its ViT initialised from a
VolTA-3D export ('VolTA-3D'), the same UNETR from scratch ('UNETR-Scratch'), and MONAI's 3D
``UNet`` with channels (16, 32, 64, 128, 256) and strides (2, 2, 2, 2) ('3D U-Net-Scratch')."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
from monai.networks.nets import UNETR, UNet

from volta3d.errors import InputError
from volta3d.models.export import (
    EncoderLoadError,
    encoder_kwargs_from_meta,
    load_vit_weights,
    read_encoder_export,
)
from volta3d.models.input_norm import StandardisedInput


class ZScoreUNETR(StandardisedInput, UNETR):  # type: ignore[misc]  # UNETR names its input x_in
    """MONAI UNETR behind the project's input standardisation (same state-dict keys as UNETR)."""


class ZScoreUNet(StandardisedInput, UNet):
    """MONAI UNet behind the project's input standardisation (same state-dict keys as UNet)."""


UNETR_PATCH = 16  # MONAI's UNETR hard-codes patch 16 and 12 layers (reads hidden states 3, 6, 9)
UNETR_LAYERS = 12


def build_unetr(
    in_channels: int,
    out_channels: int,
    img_size: int,
    *,
    encoder: str | Path | None = None,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    qkv_bias: bool = False,
    feature_size: int = 16,
    dropout: float = 0.0,
    input_norm: str = "zscore",
) -> UNETR:
    """UNETR for ``img_size``^3 crops. With ``encoder``, the ViT width / heads / MLP / qkv bias and the
    input normalisation come from the export (the arguments are ignored), which must have patch 16
    and 12 layers."""
    state = None
    if encoder is not None:
        state, meta = read_encoder_export(encoder)
        arch = encoder_kwargs_from_meta(meta)
        if arch["patch_size"] != UNETR_PATCH or arch["num_layers"] != UNETR_LAYERS:
            raise EncoderLoadError(
                f"encoder export {encoder} has patch {arch['patch_size']} and {arch['num_layers']} layers; "
                f"MONAI's UNETR needs patch {UNETR_PATCH} and {UNETR_LAYERS} layers"
            )
        if arch["in_channels"] != in_channels:
            raise EncoderLoadError(
                f"encoder export {encoder} takes {arch['in_channels']} channels, data has {in_channels}"
            )
        hidden_size, mlp_dim, num_heads, qkv_bias = (
            arch["hidden_size"],
            arch["mlp_dim"],
            arch["num_heads"],
            arch["qkv_bias"],
        )
        input_norm = arch["input_norm"]
    if img_size % UNETR_PATCH:
        raise InputError(f"UNETR crop size must be a multiple of {UNETR_PATCH} (got {img_size})")
    model = (ZScoreUNETR if input_norm == "zscore" else UNETR)(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=(img_size,) * 3,
        feature_size=feature_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        proj_type="conv",
        norm_name="instance",  # paper II-C: instance normalisation
        dropout_rate=dropout,
        qkv_bias=qkv_bias,
    )
    if state is not None:
        load_vit_weights(model, state, prefix="vit.")
    return model


def build_unet(
    in_channels: int,
    out_channels: int,
    channels: Sequence[int] = (16, 32, 64, 128, 256),
    strides: Sequence[int] = (2, 2, 2, 2),
    num_res_units: int = 2,
    dropout: float = 0.0,
) -> UNet:
    """3D U-Net from scratch (paper II-C channels and strides; MONAI's residual units, as in its
    spleen / BTCV tutorials)."""
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
    if model == "unetr":
        return build_unetr(in_channels, out_channels, img_size, encoder=encoder, **(unetr_kwargs or {}))
    if model == "unet":
        if encoder is not None:
            raise InputError("--encoder applies to UNETR; the 3D U-Net baseline is trained from scratch")
        return build_unet(in_channels, out_channels, **(unet_kwargs or {}))
    raise InputError(f"unknown segmentation model '{model}' (choose unetr or unet)")
