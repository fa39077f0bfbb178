"""Read a checkpoint a user has on disk into one flat ``{dotted key: tensor}`` dictionary, without running it.

``.safetensors`` files hold tensors only. Everything else (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) is a
pickle, and unpickling can run any code the file names (the reason torch 2.6 made ``weights_only=True``
the default of ``torch.load``: https://pytorch.org/docs/stable/notes/serialization.html#weights-only).
It is loaded with ``weights_only=True`` only: a file that needs anything beyond tensors and plain
containers is refused, naming what it asked for, and never unpickled another way.

Checkpoints nest their weights (Lightning's ``state_dict``, DINO's ``teacher`` / ``student``, a
trainer's ``model`` / ``optimizer``); nested mappings are flattened into dotted keys, so
``{"teacher": {"backbone.norm.weight": t}}`` becomes ``teacher.backbone.norm.weight``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from volta3d.errors import InputError, InputFileNotFound

_GLOBAL = re.compile(r"GLOBAL (\S+)")
_REASON = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


class UnsafeCheckpointError(InputError):
    """A pickle checkpoint that needs more than tensors and plain containers: refused, never unpickled."""


def _refusal(path: Path, err: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """One line naming what the pickle asked for (e.g. ``builtins.exec``, a training class)."""
    text = str(err)
    named = _GLOBAL.search(text)
    reason = _REASON.search(text)
    what = (
        f"the global {named.group(1)}"
        if named
        else (reason.group(1).strip() if reason else "unknown objects")
    )
    return UnsafeCheckpointError(
        f"{path}: refused: unpickling it needs {what}, which torch.load(weights_only=True) does not allow because "
        "a pickle can run code; if you trust the file, re-save its state dict (tensors only) as .safetensors or "
        "with torch.save(model.state_dict(), ...) and import that"
    )


def _load_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except (RuntimeError, KeyError, EOFError, OSError, ValueError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot read {path} as a PyTorch checkpoint: {reason}") from None


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested mappings and sequences, under its dotted path (``a.b.0.c``)."""
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    items: Sequence[tuple[Any, Any]]
    if isinstance(obj, Mapping):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple)):
        items = list(enumerate(obj))
    else:
        return {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(flatten_tensors(value, f"{prefix}{key}."))
    return flat


def read_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """``{dotted key: tensor}`` of a ``.safetensors`` file or a weights-only pickle (``.pt`` / ``.pth`` / ...)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFound(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            tensors: dict[str, torch.Tensor] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"cannot read {path} as safetensors: {reason}") from None
    else:
        tensors = flatten_tensors(_load_pickle(path))
    if not tensors:
        raise InputError(f"{path} holds no tensors")
    return tensors
