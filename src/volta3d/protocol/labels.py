"""Turn a manifest label column into training targets: classes (sorted) for classification,
floats for regression; rows with a missing label are dropped and counted.

The label is checked here, up front, for every task that reads one (``finetune``, ``probe`` and the
online probe of pretraining): a value that is not finite, and too few subjects for the folds (a class
of one member, a column mostly empty) are one-line errors naming the column before any training,
instead of a scikit-learn traceback after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from volta3d.config_rules import CHOICES
from volta3d.errors import InputError
from volta3d.protocol.splits import make_kfold_splits, regression_strata

TASKS = CHOICES["classify.task"]
# 'auto' treats a numeric column with more distinct values than this as a regression target (age)
MAX_AUTO_CLASSES = 10


@dataclass
class LabelSet:
    """Targets aligned to ``table`` rows. ``kind``: binary | multiclass | regression.
    ``targets``: class indices (int64) or values (float64); ``classes``: sorted class values."""

    table: pd.DataFrame
    column: str
    kind: str
    targets: np.ndarray
    classes: list[Any]
    dropped: int

    @property
    def strata(self) -> np.ndarray:
        """What folds are stratified by: the class, or the quantile bin of a numeric label."""
        return regression_strata(self.targets) if self.kind == "regression" else self.targets

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "regression" else len(self.classes)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or (isinstance(v, str) and v.strip() == "")


def prepare_labels(table: pd.DataFrame, column: str, task: str = "auto") -> LabelSet:
    """Validate ``column`` and encode it. Errors name the column and the problem."""
    if task not in TASKS:
        raise InputError(f"classify.task must be one of {TASKS} (got '{task}')")
    if column not in table.columns:
        raise InputError(
            f"label column '{column}' is not in the manifest (columns: {', '.join(map(str, table.columns))})"
        )
    keep = ~table[column].map(_is_missing)
    kept = table[keep].reset_index(drop=True)
    dropped = int((~keep).sum())
    if kept.empty:
        raise InputError(f"label column '{column}' has no values")
    values = kept[column]
    numeric = pd.to_numeric(values, errors="coerce")
    is_numeric = bool(numeric.notna().all())
    if is_numeric and not np.isfinite(numeric).all():
        row = int(np.flatnonzero(~np.isfinite(numeric))[0])
        who = f"subject {kept['subject_id'].iloc[row]}" if "subject_id" in kept else f"row {row + 1}"
        raise InputError(
            f"label column '{column}' has the value {numeric.iloc[row]} for {who}; give a finite number, or "
            "leave it empty to drop the row"
        )
    if task == "auto":
        task = "regression" if is_numeric and numeric.nunique() > MAX_AUTO_CLASSES else "classification"
    if task == "regression":
        if not is_numeric:
            bad = values[numeric.isna()].iloc[0]
            raise InputError(f"label column '{column}' is not numeric (value '{bad}'); cannot regress it")
        return LabelSet(kept, column, "regression", numeric.to_numpy(np.float64), [], dropped)
    # string labels and numeric codes alike: classes in sorted order (numeric codes numerically)
    raw = numeric if is_numeric else values.astype(str).str.strip()
    classes = sorted(raw.unique().tolist())
    if len(classes) < 2:
        raise InputError(f"label column '{column}' has only one class ({classes[0]!r}); nothing to classify")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.asarray([index[v] for v in raw], dtype=np.int64)
    classes = [c.item() if isinstance(c, np.generic) else c for c in classes]
    return LabelSet(kept, column, "binary" if len(classes) == 2 else "multiclass", targets, classes, dropped)


def check_fold_support(labels: LabelSet, n_splits: int) -> None:
    """Refuse a label that cannot fill ``n_splits`` subject-grouped folds: fewer subjects with a value
    than folds, a class with fewer subjects than folds (a fold would train or test without it: a
    probe cannot fit, an AUROC is undefined), or numeric values too few to stratify by."""
    subjects = labels.table["subject_id"].astype(str)
    count = subjects.nunique()
    total = labels.dropped + len(subjects)
    empty = f" ({labels.dropped} of {total} rows have no value)" if labels.dropped else ""
    where = f"label column '{labels.column}'"
    if count < n_splits:
        raise InputError(f"{where} has values for {count} subjects{empty}, fewer than the {n_splits} folds")
    if labels.kind != "regression":
        per_class = subjects.groupby(labels.targets).nunique()
        small = per_class[per_class < n_splits]
        if len(small):
            raise InputError(
                f"{where}: class {labels.classes[int(small.index[0])]!r} has {int(small.iloc[0])} subject(s), "
                f"fewer than the {n_splits} folds{empty}; each fold must train and test on every class: use "
                "fewer folds or drop the class"
            )
    elif (pd.Series(labels.strata).value_counts() < n_splits).all():  # scikit-learn's own condition
        raise InputError(
            f"{where} has values for {count} subjects{empty}: too few to stratify {n_splits} folds by value"
        )


def label_kfold_splits(labels: LabelSet, n_splits: int, seed: int) -> dict[str, Any]:
    """Subject-grouped k-fold splits stratified by the label, once it is known to fill them."""
    check_fold_support(labels, n_splits)
    return make_kfold_splits(labels.table["subject_id"], labels.strata, n_splits=n_splits, seed=seed)
