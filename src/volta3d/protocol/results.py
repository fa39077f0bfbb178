"""The files every downstream run writes, and reads back on resume or for comparison.

``results.json`` and ``predictions.csv``: the layout is documented once, in ``volta3d.protocol.cv``
(``RunResults``), which writes them.
``models/<key>/model.safetensors`` + ``model.json``: each fold's network, for ``volta3d predict``.
``folds/<key>.json``: one finished fold each, so an interrupted run resumes without redoing it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from volta3d import layout
from volta3d.errors import InputError
from volta3d.runtime import atomic_write, read_json_file


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NumPy scalars to Python, NaN / inf to null (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic write: a crash never leaves half a results file behind."""
    text = json.dumps(_clean(obj), indent=1)
    return atomic_write(path, lambda f: f.write(text.encode()))


def save_run(out_dir: str | Path, results: dict[str, Any], predictions: pd.DataFrame) -> tuple[Path, Path]:
    out = Path(out_dir)
    pred_path = out / layout.PREDICTIONS
    out.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(pred_path, index=False)
    return write_json(out / layout.RESULTS, results), pred_path


def load_run(path: str | Path) -> dict[str, Any]:
    """Read ``results.json`` (a file or its run folder) and attach ``predictions`` (a DataFrame,
    or None when predictions.csv is absent) and ``dir``."""
    p, results = read_json_file(path, layout.RESULTS, "results")
    if not isinstance(results, dict):
        raise InputError(f"results file {p} must hold a JSON object, not {type(results).__name__}")
    for key, kind in (("folds", list), ("aggregate", dict)):
        if not isinstance(results.get(key), kind):
            raise InputError(f"results file {p} has no '{key}' {kind.__name__}")
    pred = p.parent / layout.PREDICTIONS
    results["predictions"] = pd.read_csv(pred, dtype={"subject_id": str}) if pred.exists() else None
    results["dir"] = str(p.parent)
    return results


class FoldStore:
    """Per-fold result files under ``run_dir/folds``: a finished fold is recorded once and skipped
    when the same command runs again."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / layout.FOLDS

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def load(self, key: str) -> dict[str, Any]:
        return json.loads(self.path(key).read_text())

    def save(self, key: str, payload: dict[str, Any]) -> Path:
        return write_json(self.path(key), payload)
