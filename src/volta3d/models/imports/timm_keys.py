"""timm / DINO / DINOv2-style 3D ViT keys (``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``, ``ls1.gamma``), mapped to MONAI's where the network is the same.

The same network means: a pre-norm block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with one fused
``qkv`` split as ``(3, heads, head_dim)`` (timm ``Attention``; MONAI ``SABlock``'s ``Rearrange``), a GELU
MLP, a final LayerNorm, a convolutional patch embedding flattened depth-major, and no extra tokens.
DINOv2's LayerScale ``x + gamma * f(x)`` is folded into the last linear layer of ``f``
(``gamma * (W h + b) = (gamma W) h + gamma b``), and DINOv2's chunked blocks ``blocks.{chunk}.{i}``
are unchunked. Refused: a class token or register tokens (VolTAEncoder has none, so every patch token
would change) and a 2D patch embedding. Dropped: ``mask_token`` (iBOT / DINOv2 put it in place of
masked patches in training only) and a classifier ``head``.

LayerNorm's epsilon: timm and DINO build their norms with 1e-6, MONAI with torch's default 1e-5.
LayerNorm is scale-free but for epsilon: ``LN_eps(s x) = LN_{eps / s^2}(x)``. Multiplying the residual
stream by ``s = sqrt(1e-5 / eps)`` (the patch embedding, the position embedding and the output
layer of every attention and MLP) makes each MONAI norm compute exactly the source network's, so the
normalised outputs are unchanged; the per-block hidden states (read by UNETR) are ``s`` times the source's.
"""

from __future__ import annotations

import math
import re

import torch

from volta3d.models.imports.mapping import KeyMapping, fill_norm_cross_attn

TIMM_ANCHOR = "patch_embed.proj.weight"
MONAI_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which MONAI's blocks use
TIMM_LAYER_NORM_EPS = 1e-6  # timm VisionTransformer, DINO and DINOv2 vision_transformer.py
TOP = {
    "patch_embed.proj.weight": "patch_embedding.patch_embeddings.weight",
    "patch_embed.proj.bias": "patch_embedding.patch_embeddings.bias",
    "pos_embed": "patch_embedding.position_embeddings",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
BLOCK = {
    "norm1": "norm1", "norm2": "norm2", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj",
    "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2",
}  # fmt: skip
LAYER_SCALE = {"ls1.gamma": "attn.out_proj", "ls2.gamma": "mlp.linear2"}
EXTRA_TOKEN = "extra tokens (class / register): VolTAEncoder has none, so every patch token would change"
REFUSED = {"cls_token": EXTRA_TOKEN, "register_tokens": EXTRA_TOKEN, "reg_token": EXTRA_TOKEN}
NORM_CROSS_ATTN = (
    "MONAI's unused cross-attention norm, which a timm ViT lacks; LayerNorm's identity; never read"
)
DROPPED = {
    "mask_token": "replaces masked patches in iBOT / DINOv2 training only",
    "head.": "a classifier head",
}
_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")
# the layers whose output joins the residual stream, and so are scaled with it
RESIDUAL_WRITERS = re.compile(
    r"^(patch_embedding\.(patch_embeddings\.(weight|bias)|position_embeddings)"
    r"|blocks\.\d+\.(attn\.out_proj|mlp\.linear2)\.(weight|bias))$"
)


def _map_key(
    m: KeyMapping, key: str, tensor: torch.Tensor, gammas: dict[str, tuple[str, torch.Tensor]]
) -> None:
    block = _BLOCK.match(key)
    module, _, param = (block.group(2) if block else key).rpartition(".")
    if block and module in BLOCK:
        m.take(f"blocks.{block.group(1)}.{BLOCK[module]}.{param}", tensor, key)
    elif block and block.group(2) in LAYER_SCALE:
        gammas[f"blocks.{block.group(1)}.{LAYER_SCALE[block.group(2)]}"] = (key, tensor)
    elif key == TIMM_ANCHOR and tensor.ndim != 5:
        m.refused[key] = f"a {tensor.ndim - 2}D patch embedding: volta3d's encoder takes 3D volumes"
    elif key in TOP:
        m.take(TOP[key], tensor, key)
    elif key in REFUSED:
        m.refused[key] = REFUSED[key]
    elif key in DROPPED or key.startswith("head."):
        m.dropped[key] = DROPPED["mask_token" if key == "mask_token" else "head."]
    else:
        m.unknown.append(key)


def _fold_layer_scale(m: KeyMapping, gammas: dict[str, tuple[str, torch.Tensor]]) -> None:
    """``gamma * (W h + b)`` -> ``(gamma W) h + gamma b`` in the layer each LayerScale follows."""
    for layer, (key, gamma) in sorted(gammas.items()):
        weight, bias = f"{layer}.weight", f"{layer}.bias"
        if weight not in m.state or gamma.shape != m.state[weight].shape[:1]:
            m.unknown.append(key)
            continue
        m.state[weight] = m.state[weight] * gamma[:, None]  # (E_out, E_in) * (E_out, 1)
        if bias in m.state:
            m.state[bias] = m.state[bias] * gamma
        m.note("LayerScale (ls1 / ls2 gamma) folded into attn.out_proj / mlp.linear2")


def _rescale_residual_stream(m: KeyMapping, layer_norm_eps: float) -> None:
    scale = math.sqrt(MONAI_LAYER_NORM_EPS / layer_norm_eps)
    if scale == 1.0:
        return
    for key in m.state:
        if RESIDUAL_WRITERS.match(key):
            m.state[key] = m.state[key] * scale
    m.note(
        f"residual stream scaled by sqrt(1e-5 / {layer_norm_eps:g}) = {scale:.4g} so MONAI's LayerNorm (eps 1e-5) "
        f"computes the source's (eps {layer_norm_eps:g}); hidden states are {scale:.4g} x the source's"
    )


def map_timm(sub: dict[str, torch.Tensor], layer_norm_eps: float = TIMM_LAYER_NORM_EPS) -> KeyMapping:
    """Map a timm / DINO-style ViT's keys (relative to its root) to MONAI's; ``layer_norm_eps`` is the
    epsilon of the source network's LayerNorms."""
    if layer_norm_eps <= 0:
        raise ValueError(f"layer_norm_eps must be > 0, got {layer_norm_eps}")
    m = KeyMapping("timm")
    gammas: dict[str, tuple[str, torch.Tensor]] = {}
    for key, tensor in sub.items():
        _map_key(m, key, tensor, gammas)
    _fold_layer_scale(m, gammas)
    _rescale_residual_stream(m, layer_norm_eps)
    fill_norm_cross_attn(m, NORM_CROSS_ATTN)
    return m
