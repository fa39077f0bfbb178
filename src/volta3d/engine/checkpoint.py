"""Self-describing, atomically written training checkpoints that load without executing code.

A checkpoint holds everything exact resume needs (student, teacher, centers, optimiser, step,
position in the epoch, torch RNG state) plus the resolved config; it is read back with
``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from volta3d.errors import InputError
from volta3d.runtime import atomic_write

CHECKPOINT_FORMAT = "volta3d-pretrain-checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomic (temp file + rename): a crash mid-write leaves the previous checkpoint intact."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda f: torch.save(payload, f))


def _refusal_reason(path: Path, err: Exception) -> str:
    """One line for a checkpoint torch refused or could not read. A file that asks to run code is
    called untrusted outright: torch's own message advises retrying with ``weights_only=False``,
    which would run it."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"unsupported GLOBAL ([\w.]+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"checkpoint {path} is not trusted: it holds pickled Python objects{what} that a volta3d "
            "checkpoint never contains; it was refused without running them. Do not load it"
        )
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (
        f"cannot read checkpoint {path} (truncated or corrupt?): {lines[0] if lines else type(err).__name__}"
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(_refusal_reason(path, err)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a volta3d pretraining checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise InputError(
            f"{path} has checkpoint version {state.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    return state
