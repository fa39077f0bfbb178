"""MONAI ``ViT`` / ``ViTAutoEnc`` / ``UNETR.vit`` state dicts across MONAI versions, mapped to MONAI 1.6's keys.

What changed between versions (read from MONAI's ``networks/blocks`` history):

* ``patch_embedding.cls_token``: built by ``PatchEmbeddingBlock`` up to MONAI 0.8 and never used (the
  class token of ``ViT(classification=True)`` was ``ViT.cls_token``); dropped.
* ``patch_embedding.patch_embeddings.1.{weight,bias}``: the ``perceptron`` patch embedding (``pos_embed=
  "perceptron"`` before 1.4, ``proj_type`` after): a ``Rearrange`` to ``(p1 p2 p3 c)`` then ``Linear``.
  The same map as the ``conv`` embedding, so the weight is reshaped to the convolution's kernel.
* ``blocks.{i}.norm_cross_attn.*``: added in MONAI 1.4 and read only with ``with_cross_attention=True``,
  which ``ViT``, ``ViTAutoEnc`` and ``UNETR`` never set; an older checkpoint has none, and they keep
  LayerNorm's identity initialisation.
* ``blocks.{i}.cross_attn.*``: MONAI 1.4-1.5 built a ``CrossAttentionBlock`` in every block whether used
  or not (1.6 builds ``nn.Identity``): BrainIAC's checkpoint lacks them, newer ones carry them; dropped.
* ``blocks.{i}.attn.to_{q,k,v}.*``: ``SABlock(use_combined_linear=False)``; concatenated into ``qkv``
  in the order ``SABlock``'s ``Rearrange("b h (qkv l d) -> qkv b l h d")`` splits it.

A class token (``cls_token``, ``classification_head.*`` of ``ViT(classification=True)``) is refused:
VolTAEncoder, like ViTAutoEnc and UNETR, has no class token, and without it every patch token changes.
"""

from __future__ import annotations

import re

import torch

from volta3d.models.imports.mapping import KeyMapping, fill_norm_cross_attn

MONAI_ANCHOR = "patch_embedding.position_embeddings"
PERCEPTRON = "patch_embedding.patch_embeddings.1."
TOP_KEYS = (
    MONAI_ANCHOR, "patch_embedding.patch_embeddings.weight", "patch_embedding.patch_embeddings.bias",
    "norm.weight", "norm.bias", "conv3d_transpose.weight", "conv3d_transpose.bias",
    "conv3d_transpose_1.weight", "conv3d_transpose_1.bias",
)  # fmt: skip
BLOCK_KEYS = tuple(
    f"{module}.{param}"
    for module in (
        "norm1",
        "norm2",
        "attn.qkv",
        "attn.out_proj",
        "mlp.linear1",
        "mlp.linear2",
        "norm_cross_attn",
    )
    for param in ("weight", "bias")
)
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_SPLIT_QKV = re.compile(r"^attn\.to_([qkv])\.(weight|bias)$")
OLD_CLS = "PatchEmbeddingBlock built it up to MONAI 0.8 and never used it"
CROSS_ATTN = "MONAI 1.4-1.5 built a cross-attention in every block; ViT, ViTAutoEnc and UNETR never call it"
CLASS_TOKEN = (
    "a class token (ViT classification=True): VolTAEncoder, like ViTAutoEnc and UNETR, has none, so every "
    "patch token would change"
)
NORM_CROSS_ATTN = "MONAI < 1.4 had no norm_cross_attn; LayerNorm's identity, as MONAI builds it; never read"


def _top_level(m: KeyMapping, key: str, tensor: torch.Tensor, perceptron: dict[str, torch.Tensor]) -> None:
    if key in TOP_KEYS:
        m.take(key, tensor, key)
    elif key.startswith(PERCEPTRON):
        perceptron[key[len(PERCEPTRON) :]] = tensor
    elif key == "patch_embedding.cls_token":
        m.dropped[key] = OLD_CLS
    elif key == "cls_token" or key.startswith("classification_head."):
        m.refused[key] = CLASS_TOKEN
    else:
        m.unknown.append(key)


def _block_key(m: KeyMapping, key: str, tensor: torch.Tensor, split: dict[tuple[int, str], dict]) -> None:
    index, rest = _BLOCK.match(key).groups()  # type: ignore[union-attr]
    qkv = _SPLIT_QKV.match(rest)
    if rest in BLOCK_KEYS:
        m.take(key, tensor, key)
    elif rest.startswith("cross_attn."):
        m.dropped[key] = CROSS_ATTN
    elif qkv:
        split.setdefault((int(index), qkv.group(2)), {})[qkv.group(1)] = (key, tensor)
    else:
        m.unknown.append(key)


def _merge_split_qkv(m: KeyMapping, split: dict[tuple[int, str], dict]) -> None:
    for (index, param), parts in sorted(split.items()):
        if set(parts) != {"q", "k", "v"}:
            m.unknown.extend(key for key, _ in parts.values())
            continue
        m.take(f"blocks.{index}.attn.qkv.{param}", torch.cat([parts[c][1] for c in "qkv"]), parts["q"][0])
        m.note("attn.to_q/to_k/to_v concatenated into attn.qkv (SABlock use_combined_linear=False)")


def _perceptron_to_conv(m: KeyMapping, parts: dict[str, torch.Tensor], in_channels: int) -> None:
    """``Linear`` over ``(p1 p2 p3 c)``-ordered patches -> the ``Conv3d`` kernel ``(E, C, p, p, p)``."""
    for param, tensor in sorted(parts.items()):
        key, target = PERCEPTRON + param, f"patch_embedding.patch_embeddings.{param}"
        if param == "bias":
            m.take(target, tensor, key)
            continue
        side = round((tensor.shape[1] / in_channels) ** (1 / 3)) if tensor.ndim == 2 else 0
        if param != "weight" or side**3 * in_channels != tensor.shape[1]:
            m.unknown.append(key)
            continue
        # (E, p1*p2*p3*C) -> (E, p1, p2, p3, C) -> (E, C, p1, p2, p3)
        kernel = tensor.reshape(tensor.shape[0], side, side, side, in_channels).permute(0, 4, 1, 2, 3)
        m.take(target, kernel.contiguous(), key)
        m.note(
            f"perceptron patch embedding (Linear over {side}^3 x {in_channels} voxels) reshaped to the conv kernel"
        )


def map_monai(sub: dict[str, torch.Tensor], in_channels: int = 1) -> KeyMapping:
    """Map a MONAI ViT's keys (relative to its root) to MONAI 1.6's; ``in_channels`` reshapes a
    perceptron patch embedding (its ``Linear`` does not say how many channels it flattened)."""
    m = KeyMapping("monai")
    perceptron: dict[str, torch.Tensor] = {}
    split: dict[tuple[int, str], dict] = {}
    for key, tensor in sub.items():
        if _BLOCK.match(key):
            _block_key(m, key, tensor, split)
        else:
            _top_level(m, key, tensor, perceptron)
    _merge_split_qkv(m, split)
    _perceptron_to_conv(m, perceptron, in_channels)
    fill_norm_cross_attn(m, NORM_CROSS_ATTN)
    return m
