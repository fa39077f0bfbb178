"""The CLS-style summariser: a learned token that reads all patch tokens (paper II-B).

ViTAutoEnc returns patch tokens only. Rather than averaging them, VolTA-3D prepends a learned
token to the encoder's output and runs one pre-norm transformer block
(LayerNorm -> 8-head self-attention -> residual -> LayerNorm -> GELU MLP -> residual); the
token's output is the global representation for the CLS-level loss and for downstream probes.

Only the token's output is used, and within a single block the patch tokens' outputs never
reach it, so attention is computed for the token's query alone against all tokens' keys and
values: the same result as the full block at 1/(N+1) of the attention cost.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

from volta3d.errors import InputError
from volta3d.models.encoder import VolTAEncoder, split_model_section


class CLSSummariser(nn.Module):
    """``(B, N, E) patch tokens -> (B, E)`` global summary.

    A final LayerNorm follows the block: the pre-norm residual stream is un-normalised, and every
    ViT (DINO, MONAI ViT) normalises the token before the projection head; it also gives probes
    that read the exported summary features on a fixed scale.
    """

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise InputError(f"summariser dim {dim} must be divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.mlp_ratio = int(dim), int(num_heads), float(mlp_ratio)
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        # batch_first + need_weights=False runs torch's scaled_dot_product_attention kernels
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.token, std=0.02)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    @property
    def architecture(self) -> dict[str, Any]:
        return {"dim": self.dim, "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, E) -> (B, E)``: the learned token's output after one block and the final norm."""
        if patch_tokens.ndim != 3 or patch_tokens.shape[-1] != self.dim:
            raise ValueError(
                f"expected patch tokens (B, N, {self.dim}), got shape {tuple(patch_tokens.shape)}"
            )
        token = self.token.expand(patch_tokens.shape[0], -1, -1)  # (1, 1, E) -> (B, 1, E)
        sequence = torch.cat([token, patch_tokens], dim=1)  # (B, 1 + N, E)
        normed = self.norm1(sequence)
        # the token's query against every token's key / value: (B, 1, E)
        attended, _ = self.attn(normed[:, :1], normed, normed, need_weights=False)
        token = token + attended
        token = token + self.mlp(self.norm2(token))
        return self.norm(token[:, 0])  # (B, 1, E) -> (B, E)


def summariser_kwargs(*, heads: int, mlp_ratio: float) -> dict[str, Any]:
    """The ``model.summariser:`` config section as ``CLSSummariser`` keyword arguments (the names an
    encoder export's ``summariser`` record uses)."""
    return {"num_heads": heads, "mlp_ratio": mlp_ratio}


def build_summariser(**model_section: Any) -> CLSSummariser:
    """Build the summariser from the ``model:`` config section: ``hidden_size`` wide, with its
    ``summariser:`` subsection; a key the section does not have is an error that names it."""
    encoder_kwargs, section = split_model_section(**model_section)
    unknown = sorted(set(encoder_kwargs) - set(inspect.signature(VolTAEncoder).parameters))
    if unknown:
        raise TypeError(f"unknown model keys: {', '.join(unknown)}")
    return CLSSummariser(encoder_kwargs["hidden_size"], **summariser_kwargs(**section))
