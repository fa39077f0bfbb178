"""External test sets (``finetune --test-data``): train on one preprocessed dataset, test on another.

The two manifests become one table and one 'fold' whose training side is every subject of
``--data`` and whose test side is every subject of ``--test-data``. External subject ids get the
prefix ``external:``, so two datasets that both name a subject 'sub-01' never collide (and the
predictions say which set each row came from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from volta3d.errors import InputError

EXTERNAL_PREFIX = "external:"


def combine_external(
    train: pd.DataFrame, test: pd.DataFrame, test_dir: str | Path
) -> tuple[pd.DataFrame, dict]:
    """``(combined table, splits)``: one fold, train = ``train``'s subjects, test = ``test``'s."""
    test = test.copy()
    test["subject_id"] = EXTERNAL_PREFIX + test["subject_id"].astype(str)
    combined = pd.concat([train, test], ignore_index=True)
    for col in combined.columns:  # a label column only one side has: missing text is "" as read_manifest does
        if not pd.api.types.is_numeric_dtype(combined[col]) and col not in ("path", "label_path"):
            combined[col] = combined[col].fillna("")
    splits = {
        "method": "external", "n_splits": 1, "test_data": str(test_dir),
        "folds": [{"train": sorted(set(train["subject_id"].astype(str))), "test": sorted(set(test["subject_id"]))}],
    }  # fmt: skip
    return combined, splits


def test_record(test_dir: str | Path | None) -> dict[str, Any]:
    """The results.json ``test`` entry: whether the reported metrics come from an external set."""
    return {"external": test_dir is not None, "data": str(test_dir) if test_dir is not None else None}


def check_external_classes(
    targets: np.ndarray, subjects: pd.Series, classes: list[Any], test_dir: str | Path
) -> None:
    """Every class of the external set must occur in training, and the set must keep some rows."""
    external = subjects.astype(str).str.startswith(EXTERNAL_PREFIX).to_numpy()
    if not external.any():
        raise InputError(f"external test set {test_dir} has no rows with a value for the label")
    unseen = sorted(set(targets[external]) - set(targets[~external]))
    if unseen:
        raise InputError(f"external test set {test_dir} has class '{classes[unseen[0]]}' that --data lacks")
