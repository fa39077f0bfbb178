"""Projection heads for the CLS-level and patch-level distillation losses (paper II-B, eq. 2-5).

The design is DINO's: an MLP to a narrow bottleneck, L2 normalisation onto the unit sphere, then
a weight-normalised linear layer whose rows act as K prototypes; the losses take a softmax over
those K logits. With ``norm_last_layer`` the weight-norm magnitude is fixed to 1, so every logit is
a cosine similarity (DINO found this stabilises training).

How the CLS and patch branches share it differs between the relatives of VolTA-3D:
* iBOT (``shared_head=True``) and DINOv2 (default): one head for CLS and patch tokens.
* iBOT (default, ``shared_head=False``) and MC-SSL (``PROJHead``: ``last_layer`` / ``data_layer``):
  one shared MLP, separate weight-normalised last layers for CLS and patch tokens. DiCoM's code
  is not public; it descends from MC-SSL, so this is the volta3d default (``shared_patch_head: false``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm


def _mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Sequential:
    if nlayers < 1:
        raise ValueError(f"nlayers must be >= 1, got {nlayers}")
    if nlayers == 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
    else:
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def _prototype_layer(bottleneck_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Linear:
    """Weight-normalised ``Linear(bottleneck, K, bias=False)``: weight = g * v / ||v|| per prototype row.

    Uses the parametrizations API (``torch.nn.utils.weight_norm`` is deprecated): the magnitude g is
    ``parametrizations.weight.original0`` (K, 1), the direction v is ``original1`` (K, bottleneck).
    """
    layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
    magnitude = layer.parametrizations.weight.original0
    with torch.no_grad():
        magnitude.fill_(1.0)
    magnitude.requires_grad_(not norm_last_layer)
    return layer


class ProjectionHead(nn.Module):
    """``(B, E)`` or ``(B, N, E)`` -> ``(..., out_dim)`` prototype logits (DINO head design).

    ``mlp`` may be passed in to share one MLP between the CLS and patch heads (iBOT / MC-SSL).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        nlayers: int,
        norm_last_layer: bool,
        mlp: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        self.mlp = mlp if mlp is not None else _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        self.last_layer = _prototype_layer(bottleneck_dim, out_dim, norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., E) -> (..., bottleneck_dim)``, L2-normalised onto the unit sphere."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype layer's trainable parameters: DINO freezes them during the first epoch."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]


def build_heads(
    embed_dim: int,
    out_dim: int,
    hidden_dim: int,
    bottleneck_dim: int,
    nlayers: int,
    shared_patch_head: bool,
    norm_last_layer: bool,
) -> tuple[ProjectionHead, ProjectionHead]:
    """``(global_head, patch_head)`` from the ``head:`` config keys plus the encoder width.

    Shared: the same object for both (iBOT ``shared_head``). Otherwise the patch head reuses the
    global head's MLP module and owns a separate prototype layer (iBOT default, MC-SSL).
    """
    global_head = ProjectionHead(embed_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer)
    if shared_patch_head:
        return global_head, global_head
    patch_head = ProjectionHead(
        embed_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, mlp=global_head.mlp
    )
    return global_head, patch_head
