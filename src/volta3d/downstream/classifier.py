"""Classification / regression models compared in paper II-C.

* ``ViTClassifier``: the VolTA-3D encoder (pretrained export, or the same architecture from
  scratch: 'ViT-Scratch') pooled by the CLS-style summariser or the mean patch token, + linear head.
* ``SwinClassifier``: MONAI's 3D Swin transformer encoder from scratch ('SwinTransformer-Scratch'),
  global-average-pooled last stage + linear head.
* ``SFCN`` (``volta3d.downstream.sfcn``): the brain-age CNN of Peng et al. 2021 from scratch.

Training modes (``set_trainable``): ``frozen`` (encoder fixed; summariser and head learn),
``partial`` (also the last k blocks and the final norm), ``full``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets.swin_unetr import SwinTransformer

from volta3d.config_rules import CHOICES
from volta3d.downstream.networks import network_builder
from volta3d.downstream.sfcn import SFCN
from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder, encoder_from_architecture
from volta3d.models.export import build_from_export
from volta3d.models.input_norm import standardise
from volta3d.models.summariser import CLSSummariser

POOLINGS = CHOICES["classify.pooling"]
MODES = CHOICES["classify.mode"]


class ViTClassifier(nn.Module):
    """``(B, C, D, H, W) -> (B, num_outputs)`` logits (or regression outputs)."""

    def __init__(
        self, encoder: VolTAEncoder, summariser: CLSSummariser | None, num_outputs: int, *, pooling: str
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} (got '{pooling}')")
        if pooling == "cls" and summariser is None:
            raise ValueError("pooling 'cls' needs a CLS-style summariser")
        self.encoder = encoder
        self.summariser = summariser if pooling == "cls" else None
        self.pooling = pooling
        self.head = nn.Linear(encoder.embed_dim, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)["patch_tokens"]  # (B, C, D, H, W) -> (B, N, E)
        return self.summariser(tokens) if self.summariser is not None else tokens.mean(1)  # (B, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_trainable(self, mode: str, unfreeze_last: int = 0) -> None:
        """``frozen``: only the summariser and head learn; ``partial``: also the last
        ``unfreeze_last`` transformer blocks and the final norm; ``full``: everything."""
        if mode not in MODES:
            raise ValueError(f"training mode must be one of {MODES} (got '{mode}')")
        unused = set(self.encoder.unused_parameter_names())
        for name, p in self.encoder.named_parameters():
            p.requires_grad_(mode == "full" and name not in unused)
        if mode == "partial":
            if not 0 < unfreeze_last <= len(self.encoder.blocks):
                raise InputError(
                    f"unfreeze_last must be in 1..{len(self.encoder.blocks)} for mode 'partial' (got {unfreeze_last})"
                )
            start = len(self.encoder.blocks) - unfreeze_last
            for name, p in self.encoder.named_parameters():
                block = name.split(".")[1] if name.startswith("blocks.") else None
                if (
                    name.startswith("norm.") or (block is not None and int(block) >= start)
                ) and name not in unused:
                    p.requires_grad_(True)


class SwinClassifier(nn.Module):
    """MONAI 3D Swin transformer encoder, global average pool of the last stage, linear head.
    Input sides must be multiples of 16 x patch_size (the patch embedding and four 2x merges)."""

    def __init__(
        self,
        num_outputs: int,
        *,
        feature_size: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int,
        patch_size: int,
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.swin = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=(window_size,) * 3,
            patch_size=(patch_size,) * 3,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            drop_rate=dropout,
            spatial_dims=3,
        )
        # SwinTransformer returns the patch-embedding map and one map per stage; the last has
        # feature_size * 2^len(depths) channels.
        self.out_dim = feature_size * 2 ** len(depths)
        self.architecture = {
            "in_channels": in_channels,
            "feature_size": feature_size,
            "depths": list(depths),
            "num_heads": list(num_heads),
            "window_size": window_size,
            "patch_size": patch_size,
            "dropout": dropout,
        }
        self.head = nn.Linear(self.out_dim, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # the project's input standardisation, as every network gets (volta3d.models.input_norm)
        last = self.swin(standardise(x), normalize=True)[
            -1
        ]  # (B, C, D, H, W) -> (B, F, D/(16p), H/(16p), W/(16p))
        return last.mean(dim=(2, 3, 4))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_trainable(self, mode: str, unfreeze_last: int = 0) -> None:
        if mode != "full":
            raise InputError("the Swin baseline is trained from scratch: only mode 'full' applies")


Classifier = ViTClassifier | SwinClassifier | SFCN


def swin_kwargs(
    *, feature_size: int, depths: Sequence[int], heads: Sequence[int], window: int, patch_size: int
) -> dict[str, Any]:
    """The ``classify.swin:`` config section as ``SwinClassifier`` keyword arguments (MONAI SwinUNETR names)."""
    return {
        "feature_size": feature_size,
        "depths": list(depths),
        "num_heads": list(heads),
        "window_size": window,
        "patch_size": patch_size,
    }


@dataclass(frozen=True)
class ClassifierSpec:
    """What any classifier is built from: ``pooling`` and ``img_size`` (the cube edge it sees, None: the
    input's) are the ``classify:`` section's; each network reads its own keyword arguments."""

    num_outputs: int
    pooling: str
    img_size: int | None
    encoder: str | Path | None = None  # a VolTA-3D export to start from
    encoder_kwargs: dict[str, Any] | None = None  # the model: section, for a ViT from scratch
    summariser_kwargs: dict[str, Any] | None = None
    swin_kwargs: dict[str, Any] | None = None
    sfcn_kwargs: dict[str, Any] | None = None


def vit_classifier(spec: ClassifierSpec) -> ViTClassifier:
    """The VolTA-3D ViT from the export at ``spec.encoder`` (its position embedding resampled to
    ``img_size``), or from scratch with ``encoder_kwargs`` and ``summariser_kwargs``."""
    if spec.encoder is not None:
        enc, summ = build_from_export(spec.encoder, img_size=spec.img_size)
        if spec.pooling == "cls" and summ is None:
            raise InputError(f"encoder export {spec.encoder} has no summariser; use classify.pooling=mean")
    else:
        kwargs = dict(spec.encoder_kwargs or {})
        if spec.img_size is not None:
            kwargs["img_size"] = spec.img_size
        enc = encoder_from_architecture(kwargs)  # a saved model's record holds no run-time switches
        summ = (
            CLSSummariser(enc.embed_dim, **(spec.summariser_kwargs or {})) if spec.pooling == "cls" else None
        )
    return ViTClassifier(enc, summ, spec.num_outputs, pooling=spec.pooling)


def swin_classifier(spec: ClassifierSpec) -> SwinClassifier:
    return SwinClassifier(spec.num_outputs, **(spec.swin_kwargs or {}))


def sfcn_classifier(spec: ClassifierSpec) -> SFCN:
    return SFCN(spec.num_outputs, **(spec.sfcn_kwargs or {}))


def build_classifier(
    model: str,
    num_outputs: int,
    *,
    encoder: str | Path | None = None,
    encoder_kwargs: dict[str, Any] | None = None,
    summariser_kwargs: dict[str, Any] | None = None,
    pooling: str,
    img_size: int | None,
    swin_kwargs: dict[str, Any] | None = None,
    sfcn_kwargs: dict[str, Any] | None = None,
) -> Classifier:
    """The classifier ``model`` names (``volta3d.downstream.networks``), built from a ``ClassifierSpec``
    of the other arguments."""
    spec = ClassifierSpec(
        num_outputs, pooling, img_size, encoder, encoder_kwargs, summariser_kwargs, swin_kwargs, sfcn_kwargs
    )
    return classifier_from_spec(model, spec)


def classifier_from_spec(model: str, spec: ClassifierSpec) -> Classifier:
    """The classifier ``model`` names, built from ``spec`` (a fold's fresh network in a run)."""
    return network_builder("classify", model, spec.encoder)(spec)
