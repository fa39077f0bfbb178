"""The VolTA-3D encoder: MONAI's ViTAutoEnc, able to take crops of any size (paper II-B).

VolTA-3D is built on ``monai.networks.nets.ViTAutoEnc``. Subclassing it (rather than re-writing
a ViT) keeps the state-dict keys exactly MONAI's, so the pretrained weights load unchanged into
``ViTAutoEnc`` and into ``UNETR.vit``. What the subclass adds:

* any patch size that divides the crop: ViTAutoEnc refuses a patch that is not a square number
  (its decoder upsamples by sqrt(p) twice); for those (8, 12, ...) the same modules are built
  under the same names with decoder strides whose product is the patch (``decoder_strides``).
  The ViT part then loads into MONAI's ``ViT``; only the decoder's kernel shapes differ from MONAI's;
* ``forward_features``: named token groups (patch tokens after the final norm, per-block hidden
  states for UNETR-style decoders, the token grid) without running the decoder;
* crops of any box whose sides are multiples of the patch size, by trilinear interpolation of
  the learned position embedding to the crop's token grid (local 48^3 crops through a 96^3 model);
* ``decode``: the GMML reconstruction decoder (MONAI's two transposed convolutions) on any grid;
* fused attention (``torch.nn.functional.scaled_dot_product_attention``) in every MONAI SABlock.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from monai.networks.blocks import SABlock, TransformerBlock
from monai.networks.layers import DropPath
from monai.networks.nets import ViT, ViTAutoEnc
from torch import nn
from torch.utils.checkpoint import checkpoint

from volta3d.errors import InputError
from volta3d.models.input_norm import apply_input_norm

Grid = tuple[int, int, int]


def interpolate_pos_embed(
    pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]
) -> torch.Tensor:
    """Resample a learned 3D position embedding to another token grid.

    ``(1, d0*h0*w0, E) -> (1, d*h*w, E)``. Tokens are ordered as MONAI's patch embedding flattens
    its conv output (depth-major: index = (i*h + j)*w + k). Trilinear with ``align_corners=False``
    keeps token centers at the same normalised position (i + 0.5) / d, as DINO does in 2D with
    bicubic; centers outside the old outermost centers take the edge value.
    Returns the input unchanged when the grids are equal.
    """
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if len(old_grid) != 3 or len(new_grid) != 3:
        raise ValueError(f"grids must be 3D (d, h, w), got {old_grid} and {new_grid}")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[1] != math.prod(old_grid):
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed.shape)} does not match the grid {old_grid} "
            f"(expected (1, {math.prod(old_grid)}, E))"
        )
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    # (1, N0, E) -> (1, E, d0, h0, w0)
    field = pos_embed.reshape(1, *old_grid, dim).permute(0, 4, 1, 2, 3)
    field = F.interpolate(field.float(), size=new_grid, mode="trilinear", align_corners=False)
    # (1, E, d, h, w) -> (1, N, E)
    return field.flatten(2).transpose(1, 2).to(pos_embed.dtype)


def decoder_strides(patch_size: int) -> tuple[int, int]:
    """Strides (= kernels) of the decoder's two transposed convolutions; their product is ``patch_size``.

    The first is the largest divisor of ``patch_size`` not above its square root, the second the rest:
    MONAI's ``(sqrt(p), sqrt(p))`` for a square patch, ``(2, 4)`` for 8, ``(3, 4)`` for 12, ``(1, p)`` for
    a prime. The smaller stride goes first, where the input is ``hidden_size`` wide: that convolution's
    weights and FLOPs grow with its stride cubed (8x fewer at patch 8 than with 4 first). The decoder is
    linear (no activation between the convolutions), so each token's p^3 voxels come from
    ``s1^3 * deconv_chns`` values: at patch 8, 2^3 * 16 = 128 per 512 voxels, the same quarter as MONAI's
    4^3 * 16 = 1024 per 4096 at patch 16; the light decoder leaves the detail to the encoder, as tuned.
    """
    first = max(d for d in range(1, math.isqrt(patch_size) + 1) if patch_size % d == 0)
    return first, patch_size // first


def check_patch_size(img_size: int, patch_size: int) -> None:
    """InputError unless both are integers >= 1 and the patch tiles the ``img_size`` cube."""
    for name, value in (("img_size", img_size), ("patch_size", patch_size)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if img_size % patch_size:
        raise InputError(
            f"patch_size {patch_size} does not divide img_size {img_size} (the encoder's cube edge)"
        )


def _sync_fused_attention_dropout(attn: SABlock, _args: Any) -> None:
    """MONAI's fused SABlock path passes ``dropout_p=self.dropout_rate`` even in eval mode;
    tie it to the module's training flag so evaluation (and the teacher) is deterministic."""
    attn.dropout_rate = attn.drop_weights.p if attn.training else 0.0


def _transformer_blocks(encoder: ViTAutoEnc) -> list[TransformerBlock]:
    """``encoder.blocks`` with their type: ViTAutoEnc builds TransformerBlocks, but a ModuleList's items
    are plain ``nn.Module`` s to a type checker."""
    return cast("list[TransformerBlock]", list(encoder.blocks))


class VolTAEncoder(ViTAutoEnc):
    """ViTAutoEnc with named outputs, any-size crops, any patch size and fused attention; same keys
    as ViTAutoEnc (same shapes too for a square patch).

    ``img_size`` is the edge of the cube the position embedding is learnt for (the global crop);
    ``patch_size`` must divide it. Inputs may be any box whose sides are multiples of ``patch_size``.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        *,
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        in_channels: int,
        dropout: float,
        qkv_bias: bool,
        deconv_chns: int,
        fused_attention: bool,
        activation_checkpointing: bool,
        input_norm: str,
    ) -> None:
        if hidden_size % num_heads != 0:
            raise InputError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        check_patch_size(img_size, patch_size)
        trunk: dict[str, Any] = dict(
            in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
            mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type="conv", dropout_rate=dropout,
            spatial_dims=3, qkv_bias=qkv_bias,
        )  # fmt: skip
        if math.isqrt(patch_size) ** 2 == patch_size:
            # MONAI's own build (its keys, shapes, initialisation); GMML reconstructs every input channel
            super().__init__(**trunk, out_channels=in_channels, deconv_chns=deconv_chns)
        else:
            self._build_any_patch(trunk, deconv_chns)
        self.decoder_strides = decoder_strides(patch_size)
        self.in_channels = in_channels
        self.embed_dim = hidden_size
        self.num_layers = num_layers
        self.native_grid: Grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))  # type: ignore[assignment]
        self.architecture = {
            "img_size": int(img_size),
            "patch_size": int(patch_size),
            "hidden_size": int(hidden_size),
            "mlp_dim": int(mlp_dim),
            "num_layers": int(num_layers),
            "num_heads": int(num_heads),
            "in_channels": int(in_channels),
            "qkv_bias": bool(qkv_bias),
            "deconv_chns": int(deconv_chns),
            "dropout": float(dropout),
            "input_norm": str(input_norm),
        }
        apply_input_norm(torch.zeros(1, 1, 1, 1, 1), input_norm)  # validates the name
        self.input_norm = input_norm
        # MONAI 1.6.1 builds a LayerNorm for cross-attention in every block even when cross-attention
        # is off; it never sees a gradient. Freezing it keeps the keys and lets DDP / optimisers skip it.
        for name in self.unused_parameter_names():
            self.get_parameter(name).requires_grad_(False)
        for blk in _transformer_blocks(self):
            blk.attn.register_forward_pre_hook(_sync_fused_attention_dropout)
        self.set_fused_attention(fused_attention)
        # Recompute each block's activations in the backward pass: ~1/3 more compute for a much
        # smaller activation memory, which is what lets true batches of 96^3 ViT-B fit one GPU.
        self.activation_checkpointing = activation_checkpointing
        self.set_drop_path(0.0)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for fine-tuning (Huang et al., ECCV 2016; BEiT / MAE fine-tune with it): while
        training, block ``i`` of ``L`` skips its whole residual update for a sample with probability
        ``rate * i / (L - 1)`` (the first block never, the last at ``rate``), the kept updates scaled by
        1 / keep. A training setting, not architecture: no weights, not exported; 0 (the default) is exact."""
        if not 0.0 <= rate < 1.0:
            raise InputError(f"drop_path must be in [0, 1) (got {rate})")
        depth = len(self.blocks)
        rates = [rate * i / max(depth - 1, 1) for i in range(depth)]
        self.block_drop_paths = nn.ModuleList(DropPath(r) for r in rates)

    def _build_any_patch(self, trunk: dict[str, Any], deconv_chns: int) -> None:
        """What ``ViTAutoEnc.__init__`` builds, for a patch it refuses (not a square number): the patch
        embedding, blocks and norm from MONAI's ``ViT`` (the same classes, built in the same order), then
        the two transposed convolutions with ``decoder_strides`` under MONAI's names."""
        nn.Module.__init__(self)
        vit = ViT(**trunk)
        self.patch_size = (int(trunk["patch_size"]),) * 3
        self.img_size = (int(trunk["img_size"]),) * 3
        self.spatial_dims = 3
        self.patch_embedding, self.blocks, self.norm = vit.patch_embedding, vit.blocks, vit.norm
        first, second = decoder_strides(trunk["patch_size"])
        self.conv3d_transpose = nn.ConvTranspose3d(trunk["hidden_size"], deconv_chns, first, stride=first)
        self.conv3d_transpose_1 = nn.ConvTranspose3d(deconv_chns, trunk["in_channels"], second, stride=second)

    def unused_parameter_names(self) -> list[str]:
        """Parameters MONAI builds but never uses (``blocks.{i}.norm_cross_attn.{weight,bias}``)."""
        return [
            f"blocks.{i}.norm_cross_attn.{name}"
            for i, blk in enumerate(_transformer_blocks(self))
            if not blk.with_cross_attention
            for name, _ in blk.norm_cross_attn.named_parameters()
        ]

    def set_fused_attention(self, enabled: bool) -> None:
        """Switch every SABlock between torch SDPA (flash / memory-efficient kernels) and MONAI's einsum."""
        self.fused_attention = bool(enabled)
        for blk in _transformer_blocks(self):
            attn = blk.attn
            if enabled and attn.save_attn:
                raise ValueError("fused attention cannot save attention maps (save_attn=True)")
            attn.use_flash_attention = self.fused_attention

    def token_grid(self, spatial_shape: Sequence[int]) -> Grid:
        """Token grid ``(d, h, w)`` of an input of spatial shape ``(D, H, W)``; ValueError if it does not tile."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) != 3:
            raise ValueError(f"expected a 3D volume (D, H, W), got spatial shape {spatial_shape}")
        bad = [s for s, p in zip(spatial_shape, self.patch_size, strict=True) if s % p != 0 or s < p]
        if bad:
            raise ValueError(
                f"input spatial shape {spatial_shape} is not a multiple of patch_size {self.patch_size[0]}"
            )
        return tuple(s // p for s, p in zip(spatial_shape, self.patch_size, strict=True))  # type: ignore[return-value]

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """The learned position embedding resampled to ``grid``: ``(1, d*h*w, E)``."""
        return interpolate_pos_embed(self.patch_embedding.position_embeddings, self.native_grid, grid)

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """Encode a batch of volumes.

        ``(B, C, D, H, W) -> {"patch_tokens": (B, N, E) after the final norm,
        "hidden_states": list of num_layers (B, N, E), each block's output before the final norm
        (UNETR reads indices 3, 6, 9), "grid": (d, h, w) with N = d*h*w}``.
        """
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, D, H, W), got shape {tuple(x.shape)}")
        grid = self.token_grid(x.shape[2:])
        x = apply_input_norm(x, self.input_norm)  # see volta3d.models.input_norm for why
        embed = self.patch_embedding
        tokens = embed.patch_embeddings(x)  # (B, C, D, H, W) -> (B, E, d, h, w)
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, E, d, h, w) -> (B, N, E)
        tokens = embed.dropout(tokens + self.position_embedding(grid))
        hidden_states = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for blk, drop in zip(self.blocks, cast("list[DropPath]", list(self.block_drop_paths)), strict=True):
            out = checkpoint(blk, tokens, use_reentrant=False) if recompute else blk(tokens)
            tokens = tokens + drop(out - tokens) if self.training and float(drop.drop_prob) > 0 else out
            hidden_states.append(tokens)
        return {"patch_tokens": self.norm(tokens), "hidden_states": hidden_states, "grid": grid}

    def decode(self, patch_tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """GMML reconstruction: ``(B, N, E) -> (B, in_channels, D, H, W)`` via the two transposed convs."""
        grid = tuple(int(g) for g in grid)
        if patch_tokens.ndim != 3 or patch_tokens.shape[1] != math.prod(grid):
            raise ValueError(f"patch tokens of shape {tuple(patch_tokens.shape)} do not fill the grid {grid}")
        volume = patch_tokens.transpose(1, 2).reshape(patch_tokens.shape[0], patch_tokens.shape[2], *grid)
        # (B, E, d, h, w) -> (B, deconv_chns, d*s1, h*s1, w*s1) -> (B, C, D, H, W), s1*s2 = patch_size
        return self.conv3d_transpose_1(self.conv3d_transpose(volume))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ViTAutoEnc's contract on any grid: ``(B, C, D, H, W) -> (reconstruction, hidden_states)``."""
        feats = self.forward_features(x)
        return self.decode(feats["patch_tokens"], feats["grid"]), feats["hidden_states"]


def split_model_section(**model_section: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``model:`` config section as ``(VolTAEncoder keyword arguments, its summariser: subsection)``."""
    encoder_kwargs = dict(model_section)
    return encoder_kwargs, dict(encoder_kwargs.pop("summariser", None) or {})


# Run-time switches, not architecture: a record (an export's metadata, a saved model's build) holds the
# architecture only, and an encoder rebuilt from one runs with fused attention and without activation
# checkpointing, as it always has. An encoder built from the config takes model.fused_attention and
# model.activation_checkpointing instead.
REBUILT_SWITCHES: dict[str, bool] = {"fused_attention": True, "activation_checkpointing": False}


def encoder_from_architecture(architecture: Mapping[str, Any], **switches: bool) -> VolTAEncoder:
    """The encoder a recorded ``architecture`` describes (``VolTAEncoder.architecture``'s keys), with the
    switches ``architecture`` or ``switches`` set and ``REBUILT_SWITCHES`` for the others."""
    return VolTAEncoder(**{**REBUILT_SWITCHES, **architecture, **switches})


def build_encoder(**model_section: Any) -> VolTAEncoder:
    """Build the encoder from the ``model:`` config keys (the ``summariser:`` subsection is not its own)."""
    encoder_kwargs, _ = split_model_section(**model_section)
    return VolTAEncoder(**encoder_kwargs)
