"""A saved selection split: the labelled subjects that choose a recipe, kept apart from those reported on.

Choosing a pretraining recipe (or a checkpoint, or any hyperparameter) by a probe on the subjects that
the downstream evaluation then tests on reports a best-of-N as if it were one result. ``write_selection``
holds out a stratified, subject-grouped share of the labelled subjects once and saves it: the online
probe and the recipe study read ``selection.csv``; fine-tuning and probes for the report read
``evaluation.csv``, which never holds a selection subject. Both are ordinary manifests (absolute paths),
so every command takes them as ``--data``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d import layout
from volta3d.data.dataset import manifest_file, read_manifest
from volta3d.errors import InputError
from volta3d.protocol.labels import prepare_labels
from volta3d.protocol.splits import make_holdout_split
from volta3d.runtime import atomic_write


def write_selection(
    data: str | Path, label: str, fraction: float, seed: int, output: str | Path
) -> dict[str, Any]:
    """Split ``data``'s manifest into ``output/selection.csv`` (about ``fraction`` of the subjects with a
    ``label`` value, stratified by it) and ``output/evaluation.csv`` (every other row, labelled or not),
    with ``selection.json`` recording how. An existing split of the same request is kept (a re-run
    changes nothing); one made otherwise is refused, so a study never silently moves its subjects."""
    out = Path(output)
    table = read_manifest(data)
    request = {
        "source": str(Path(data).resolve()),
        "label": label,
        "fraction": float(fraction),
        "seed": int(seed),
    }
    existing = out / layout.SELECTION_META
    if existing.exists():
        record = json.loads(existing.read_text())
        if {k: record.get(k) for k in request} != request:
            raise InputError(
                f"{existing} holds a selection split made with other settings ({record.get('label')}, "
                f"fraction {record.get('fraction')}, seed {record.get('seed')}); use another --output"
            )
        return record
    labels = prepare_labels(table, label)
    split = make_holdout_split(
        labels.table["subject_id"].astype(str).tolist(), list(labels.strata), fraction, seed
    )
    chosen = set(split["folds"][0]["test"])
    chosen_subject = table["subject_id"].astype(str).isin(chosen)
    in_selection = chosen_subject & table["path"].isin(labels.table["path"])
    evaluation = table[~chosen_subject]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(table[in_selection], out / layout.SELECTION_CSV)
    _write_csv(evaluation, out / layout.EVALUATION_CSV)
    settings = manifest_file(data).parent / layout.CONFIG  # the preprocessing settings, which predict reads
    if settings.is_file():
        shutil.copyfile(settings, out / layout.CONFIG)
    record = {**request, "selection_subjects": sorted(chosen),
              "n_selection_rows": int(in_selection.sum()), "n_evaluation_rows": len(evaluation)}  # fmt: skip
    atomic_write(existing, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
    return record


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda f: f.write(table.to_csv(index=False).encode()))
