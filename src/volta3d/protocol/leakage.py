"""Leakage a cross-validated run would not notice, checked once its rows and folds are known.

Folds are grouped by subject id, so they keep a subject's scans on one side; they cannot see that two
ids name one scan. What is checked (the folds themselves in ``volta3d.protocol.splits``):

- the same volume (identical content hash, ``volta3d.data.content``) under two subject ids: refused
  when a fold trains on one and tests on the other (the test scan was seen in training, e.g. AUROC
  1.000 on it), warned when no fold separates them;
- subjects that no fold of a k-fold split tests: warned;
- one subject with different class labels on its scans: warned (a data error unless the label changes
  between visits, as a diagnosis may); regression targets such as the age at each visit are not.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from volta3d.data.content import content_hashes
from volta3d.errors import InputError
from volta3d.protocol.labels import LabelSet
from volta3d.runtime import get_logger


def _same_volume_groups(table: pd.DataFrame) -> list[dict[str, str]]:
    """``{subject id: path}`` for each volume listed under more than one subject id."""
    hashes = content_hashes(table["path"])
    groups: dict[str, dict[str, str]] = {}
    for subject, path in zip(table["subject_id"].astype(str), table["path"].astype(str), strict=True):
        groups.setdefault(hashes[path], {}).setdefault(subject, path)
    return [g for g in groups.values() if len(g) > 1]


def _separating_fold(subjects: dict[str, str], splits: dict[str, Any]) -> tuple[int, str, str] | None:
    """The first fold that trains on one of ``subjects`` and tests on another: (fold, train id, test id)."""
    for k, fold in enumerate(splits["folds"]):
        sides = set(map(str, fold["train"])), set(map(str, fold["test"]))
        train, test = ([s for s in subjects if s in side] for side in sides)
        if train and test:
            return k, train[0], test[0]
    return None


def check_same_volumes(table: pd.DataFrame, splits: dict[str, Any]) -> None:
    """Refuse a volume listed under two subject ids that a fold puts on both sides; warn otherwise."""
    for subjects in _same_volume_groups(table):
        a, b = sorted(subjects)[:2]
        pair = (
            f"{subjects[a]} (subject {a}) and {subjects[b]} (subject {b}) are the same volume (content hash)"
        )
        split = _separating_fold(subjects, splits)
        if split is not None:
            raise InputError(
                f"{pair}, and fold {split[0]} trains on subject {split[1]} and tests on {split[2]}: the test scan "
                "leaks into training; give both rows one subject id, or drop one"
            )
        get_logger().warning("warning: %s; no fold separates them, but one scan is counted twice", pair)


def warn_conflicting_labels(labels: LabelSet) -> None:
    """One line when subjects carry different class labels on their scans (regression targets may differ)."""
    if labels.kind == "regression":
        return
    values = labels.table[labels.column].astype(str).str.strip()
    per_subject = values.groupby(labels.table["subject_id"].astype(str)).agg(lambda v: sorted(set(v)))
    conflicting = per_subject[per_subject.map(len) > 1]
    if len(conflicting):
        get_logger().warning(
            "warning: %d subject(s) have different '%s' labels on their scans (e.g. %s: %s): a data error unless "
            "the label changes between visits",
            len(conflicting), labels.column, conflicting.index[0], ", ".join(conflicting.iloc[0]),
        )  # fmt: skip


def warn_untested(table: pd.DataFrame, splits: dict[str, Any]) -> None:
    """One line when a split of several folds never tests some subjects of the run (a hold-out or an
    external set, one fold, tests only some by design)."""
    folds = splits["folds"]
    if len(folds) < 2:
        return
    tested = {str(s) for f in folds for s in f["test"]}
    known = tested | {str(s) for f in folds for s in f["train"]}
    subjects = set(table["subject_id"].astype(str)) & known
    never = sorted(subjects - tested)
    if never:
        get_logger().warning(
            "warning: %d of %d subjects are never tested by the %d folds of the split (e.g. %s): the results "
            "describe only the others", len(never), len(subjects), len(folds), never[0],
        )  # fmt: skip


def check_run_rows(table: pd.DataFrame, splits: dict[str, Any], labels: LabelSet | None = None) -> None:
    """The checks of this module on a run's rows (``labels.table`` when a label is predicted) and folds."""
    check_same_volumes(table, splits)
    warn_untested(table, splits)
    if labels is not None:
        warn_conflicting_labels(labels)


__all__ = ["check_run_rows", "check_same_volumes", "warn_conflicting_labels", "warn_untested"]
