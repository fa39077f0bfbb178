"""What a layout makes of a checkpoint's encoder keys: MONAI ``ViTAutoEnc`` keys with their tensors, and
for every other key the reason it is not used. Nothing is dropped without a reason that ends up in
``encoder.json``; a key no rule knows stays ``unknown`` and fails the import."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_PARAM = re.compile(r"\.(weight|bias)$")


def key_pattern(key: str) -> str:
    """``blocks.3.cross_attn.to_q.weight -> blocks.*.cross_attn.to_q.*``: one line per repeated module."""
    return _PARAM.sub(".*", _INDEX.sub("*", key))


def by_pattern(reasons: dict[str, str]) -> dict[str, str]:
    """``{key: reason}`` folded to ``{pattern: reason}`` (the record lists 12 blocks' keys once)."""
    return {key_pattern(k): v for k, v in sorted(reasons.items())}


@dataclass
class KeyMapping:
    """The result of mapping one layout's keys (relative to the encoder's root) to MONAI's.

    ``state``: MONAI key -> tensor; ``sources``: MONAI key -> the checkpoint key it came from;
    ``dropped``: checkpoint key -> why it plays no part in the network's forward pass; ``refused``:
    checkpoint key -> why the network does not fit a MONAI ViT; ``unknown``: keys no rule maps;
    ``from_init``: MONAI key -> why it keeps its fresh initialisation; ``notes``: conversions applied.
    """

    layout: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    from_init: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def take(self, key: str, tensor: torch.Tensor, source: str) -> None:
        self.state[key] = tensor
        self.sources[key] = source

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


def fill_norm_cross_attn(m: KeyMapping, reason: str) -> None:
    """MONAI >= 1.4 builds ``blocks.{i}.norm_cross_attn`` (read only with cross-attention, which a ViT never
    uses); a checkpoint without any keeps LayerNorm's identity. One that has some must have all."""
    if any(".norm_cross_attn." in k for k in m.state):
        return
    blocks = sorted({int(k.split(".")[1]) for k in m.state if k.startswith("blocks.")})
    for index in blocks:
        for param in ("weight", "bias"):
            m.from_init[f"blocks.{index}.norm_cross_attn.{param}"] = reason
