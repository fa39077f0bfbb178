"""Where in a checkpoint the encoder sits: the key prefix ("root") under which a ViT's keys live.

A root is found by an anchor key only a ViT has: MONAI's ``patch_embedding.position_embeddings`` or
timm / DINO's ``patch_embed.proj.weight``. ``vit.`` (UNETR), ``backbone.`` (BrainIAC, DINO),
``module.backbone.`` (a DDP student), ``state_dict.`` (Lightning), ``teacher.`` (DINO) and the like are
all just roots; everything outside the chosen root (heads, decoders, optimiser state) is not the encoder.
"""

from __future__ import annotations

from collections.abc import Iterable

from volta3d.errors import InputError
from volta3d.models.imports.monai_keys import MONAI_ANCHOR
from volta3d.models.imports.timm_keys import TIMM_ANCHOR

ANCHORS = {MONAI_ANCHOR: "monai", TIMM_ANCHOR: "timm"}


def encoder_roots(keys: Iterable[str]) -> dict[str, str]:
    """``{root: layout}`` for every anchor key, e.g. ``{"teacher.backbone.": "timm", "student.module.backbone.": "timm"}``."""
    roots = {}
    for key in keys:
        for anchor, layout in ANCHORS.items():
            if key == anchor or key.endswith("." + anchor):
                roots[key[: len(key) - len(anchor)]] = layout
    return roots


def normalise_prefix(prefix: str) -> str:
    """``backbone`` -> ``backbone.``; ``""`` stays the top level."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def choose_root(roots: dict[str, str], prefix: str | None, where: str) -> str:
    """The root named by ``prefix``, else the only one, else the only teacher (DINO evaluates the EMA
    teacher, and so does volta3d's own export); otherwise ask the user to choose."""
    shown = ", ".join(repr(r) for r in sorted(roots))
    if not roots:
        raise InputError(
            f"{where} holds no ViT encoder: no key ends with {MONAI_ANCHOR} (MONAI ViT / ViTAutoEnc / UNETR) "
            f"or {TIMM_ANCHOR} (timm / DINO ViT)"
        )
    if prefix is not None:
        if normalise_prefix(prefix) not in roots:
            raise InputError(
                f"{where} has no encoder under --prefix {prefix!r}; it has encoders under {shown}"
            )
        return normalise_prefix(prefix)
    if len(roots) == 1:
        return next(iter(roots))
    teachers = [r for r in roots if "teacher" in r.split(".")]
    if len(teachers) == 1:
        return teachers[0]
    raise InputError(f"{where} holds {len(roots)} encoders, under {shown}; choose one with --prefix")
