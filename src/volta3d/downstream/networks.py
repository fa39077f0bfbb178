"""The downstream networks by name, in one table: the builders, saved-model loading, the config's allowed
``classify.model`` / ``segment.model`` values and the command line's ``--model`` choices all read it.

Pure Python (each builder is imported when a network is built), so ``volta3d --help`` and the config
checks stay free of torch. A new network is its module with a builder taking the task's spec
(``ClassifierSpec`` / ``SegmenterSpec``) plus one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from volta3d.errors import InputError

Task = Literal["classify", "segment"]


@dataclass(frozen=True)
class Network:
    task: Task
    builder: str  # "module:function", called with the task's spec
    title: str  # how messages name it
    takes_encoder: bool  # starts from a VolTA-3D export (--encoder); the others train from scratch


NETWORKS: dict[str, Network] = {
    "vit": Network("classify", "volta3d.downstream.classifier:vit_classifier", "the ViT classifier", True),
    "swin": Network("classify", "volta3d.downstream.classifier:swin_classifier", "the Swin baseline", False),
    "sfcn": Network("classify", "volta3d.downstream.classifier:sfcn_classifier", "the SFCN baseline", False),
    "unetr": Network("segment", "volta3d.downstream.segmenter:unetr_segmenter", "UNETR", True),
    "unet": Network("segment", "volta3d.downstream.segmenter:unet_segmenter", "the 3D U-Net baseline", False),
}


def network_names(task: Task) -> tuple[str, ...]:
    return tuple(name for name, n in NETWORKS.items() if n.task == task)


def network_builder(task: Task, name: str, encoder: str | Path | None) -> Callable[[Any], Any]:
    """The builder of ``name``, after refusing an unknown name or an ``--encoder`` it cannot start from."""
    entry = NETWORKS.get(name)
    if entry is None or entry.task != task:
        raise InputError(f"unknown {task} model '{name}' (choose {', '.join(network_names(task))})")
    if encoder is not None and not entry.takes_encoder:
        takes = " or ".join(n.title for n in NETWORKS.values() if n.task == task and n.takes_encoder)
        raise InputError(f"--encoder applies to {takes}; {entry.title} is trained from scratch")
    module, function = entry.builder.split(":")
    return getattr(importlib.import_module(module), function)
