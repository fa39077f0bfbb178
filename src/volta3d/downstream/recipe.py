"""The fine-tuning recipe for pretrained ViTs: layer-wise learning-rate decay, a learning rate of the
head's own, linear warm-up then a per-step cosine, stochastic depth, and linear-probe-then-fine-tune.

These are the settings under which pretrained ViTs are fine-tuned in BEiT (Bao et al., ICLR 2022),
MAE (He et al., CVPR 2022) and iBOT / DINOv2's evaluations: block ``i`` of ``L`` learns at
``lr * layer_decay ** (L + 1 - layer)`` (the patch embedding is layer 0, the final norm and the
pretrained CLS-style summariser layer ``L + 1``), so the early, general layers move least; a new
head starts far from its optimum and may learn faster (``head_lr_scale``); LP-FT (Kumar et al., ICLR
2022) first trains the head alone so that a random head does not distort the pretrained features.
The layer-wise parts apply to a pretrained encoder only: a scratch network has no pretrained layers to
protect, so it trains every parameter at ``lr`` (``for_scratch``) with the same warm-up, schedule,
drop path and epochs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from volta3d.engine.schedules import cosine_schedule
from volta3d.errors import InputError

RECIPE_KEYS = (
    "lr",
    "weight_decay",
    "layer_decay",
    "head_lr_scale",
    "warmup_epochs",
    "lp_epochs",
    "drop_path",
)
# backbone prefixes: the classifier's encoder (+ its summariser on top), the segmenter's ViT
BACKBONES = ("encoder.", "vit.")
TOP_PREFIXES = ("summariser.",)  # pretrained parts above the last block: layer L + 1
NO_DECAY_NAMES = ("position_embeddings", "summariser.token")  # embeddings, as BEiT/MAE exclude pos_embed
# the recipe switched off: every parameter at lr from the first step, as a section without these keys trains
PLAIN: dict[str, Any] = {
    "layer_decay": 1.0,
    "head_lr_scale": 1.0,
    "warmup_epochs": 0.0,
    "lp_epochs": 0,
    "drop_path": 0.0,
}


@dataclass(frozen=True)
class FinetuneRecipe:
    """The optimiser and schedule settings of one fine-tuning run (the ``classify:`` keys of that name);
    ``plain`` is the recipe of a section that has only ``lr`` and ``weight_decay`` (``segment:``)."""

    lr: float
    weight_decay: float
    layer_decay: float
    head_lr_scale: float
    warmup_epochs: float
    lp_epochs: int
    drop_path: float

    def __post_init__(self) -> None:
        checks = {
            "layer_decay": 0.0 < self.layer_decay <= 1.0,
            "head_lr_scale": self.head_lr_scale > 0.0,
            "warmup_epochs": self.warmup_epochs >= 0.0,
            "lp_epochs": self.lp_epochs >= 0,
            "drop_path": 0.0 <= self.drop_path < 1.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise InputError(
                f"fine-tuning recipe: {bad[0]}={getattr(self, bad[0])!r} is out of range (layer_decay in (0, 1], "
                "head_lr_scale > 0, warmup_epochs >= 0, lp_epochs >= 0, drop_path in [0, 1))"
            )

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> FinetuneRecipe:
        """The recipe from a config section holding ``RECIPE_KEYS`` (``classify:``)."""
        return cls(**{k: section[k] for k in RECIPE_KEYS})

    @classmethod
    def plain(cls, lr: float, weight_decay: float, **settings: Any) -> FinetuneRecipe:
        """AdamW at ``lr`` for every parameter: no layer-wise decay, head scale, warm-up, drop path or
        linear-probe phase, except as ``settings`` give."""
        return cls(**{**PLAIN, "lr": lr, "weight_decay": weight_decay, **settings})

    def for_scratch(self) -> FinetuneRecipe:
        """A scratch network: no layer-wise decay, no head scale, no linear-probe phase."""
        return dataclasses.replace(
            self, **{k: PLAIN[k] for k in ("layer_decay", "head_lr_scale", "lp_epochs")}
        )


def backbone_layer(name: str, num_layers: int) -> int | None:
    """The layer index of parameter ``name`` for layer-wise decay: 0 for the patch embedding, ``i + 1`` for
    block ``i``, ``num_layers + 1`` for the final norm and the summariser; None for a head or decoder."""
    if name.startswith(TOP_PREFIXES):
        return num_layers + 1
    for prefix in BACKBONES:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        block = re.match(r"blocks\.(\d+)\.", rest)
        if block:
            return int(block.group(1)) + 1
        return 0 if rest.startswith("patch_embedding.") else num_layers + 1
    return None


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(NO_DECAY_NAMES)


def param_groups(model: nn.Module, recipe: FinetuneRecipe, num_layers: int) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters: one per (learning-rate scale, decay or not),
    each with ``lr`` (``recipe.lr`` x its scale), ``weight_decay`` (0 for biases, norms and embeddings)
    and ``lr_scale``; the ``head`` flag marks the groups a linear-probe phase trains."""
    groups: dict[tuple[float, bool, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = backbone_layer(name, num_layers)
        scale = recipe.head_lr_scale if layer is None else recipe.layer_decay ** (num_layers + 1 - layer)
        decay = not _no_decay(name, param)
        key = (scale, decay, layer is None)
        group = groups.setdefault(key, {
            "params": [], "names": [], "lr": recipe.lr * scale, "lr_scale": scale,
            "weight_decay": recipe.weight_decay if decay else 0.0, "head": layer is None,
        })  # fmt: skip
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return list(groups.values())


def lr_factors(recipe: FinetuneRecipe, epochs: int, steps_per_epoch: int) -> torch.Tensor:
    """Per-optimiser-step factor of every group's learning rate: linear warm-up from 0 over
    ``warmup_epochs``, then a half cosine to 0 (MAE / BEiT fine-tuning), ``epochs * steps_per_epoch`` long."""
    total = max(1, epochs * max(1, steps_per_epoch))
    warmup = min(total, round(recipe.warmup_epochs * max(1, steps_per_epoch)))
    return torch.from_numpy(cosine_schedule(1.0, 0.0, total, warmup_steps=warmup, warmup_start=0.0))
