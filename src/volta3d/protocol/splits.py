"""Subject-grouped, seeded cross-validation splits saved to JSON, so every model is compared on the
same folds (nnU-Net ``crossval_split.py`` habit). Splits hold subject ids, never row numbers: a
manifest may be re-ordered or hold several scans per subject and the split still means the same."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from volta3d import layout
from volta3d.errors import InputError
from volta3d.runtime import atomic_write, read_json_file


def regression_strata(values: Sequence[float] | np.ndarray, n_bins: int = 5) -> np.ndarray:
    """Quantile bins of a numeric label, so regression folds are balanced in range (e.g. age)."""
    v = pd.Series(np.asarray(values, dtype=float))
    bins = min(n_bins, max(1, v.nunique()))
    return pd.qcut(v, q=bins, labels=False, duplicates="drop").to_numpy()


def _subject_strata(subject_ids: Sequence[str], strata: Sequence | None) -> pd.Series:
    """One stratum per subject (its first row's), as StratifiedGroupKFold sees groups."""
    s = pd.Series(np.zeros(len(subject_ids)) if strata is None else list(strata), index=list(subject_ids))
    return s[~s.index.duplicated(keep="first")]


def make_kfold_splits(
    subject_ids: Sequence[str], strata: Sequence | np.ndarray | None = None, *, n_splits: int, seed: int = 0
) -> dict[str, Any]:
    """Stratified, subject-grouped k-fold: a subject's scans all fall in one test fold.

    ``subject_ids`` and ``strata`` are per row (scan). Returns the JSON-ready split dictionary.
    """
    groups = np.asarray([str(s) for s in subject_ids])
    n_subjects = len(set(groups))
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2 (got {n_splits})")
    if n_subjects < n_splits:
        raise InputError(f"only {n_subjects} subjects for {n_splits} folds")
    y = np.zeros(len(groups)) if strata is None else np.asarray([str(s) for s in strata])
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = []
    for train_idx, test_idx in cv.split(np.zeros(len(groups)), y, groups):
        folds.append({"train": sorted(set(groups[train_idx])), "test": sorted(set(groups[test_idx]))})
    return {"method": "stratified_group_kfold", "n_splits": n_splits, "seed": seed, "folds": folds}


def make_holdout_split(
    subject_ids: Sequence[str], strata: Sequence | None = None, fraction: float = 0.2, seed: int = 0
) -> dict[str, Any]:
    """One stratified, subject-grouped hold-out (paper II-C: 20 %): the first fold of a
    ``round(1 / fraction)``-fold split (at least one subject held out when there are few)."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"hold-out fraction must be in (0, 1) (got {fraction})")
    n_subjects = len({str(s) for s in subject_ids})
    n_splits = max(2, min(round(1.0 / fraction), n_subjects))
    split = make_kfold_splits(subject_ids, strata, n_splits=n_splits, seed=seed)
    return {
        "method": "holdout",
        "fraction": fraction,
        "seed": seed,
        "n_splits": 1,
        "folds": split["folds"][:1],
    }


def nested_subsets(
    subject_ids: Sequence[str], strata: Sequence | None, fractions: Sequence[float], seed: int = 0
) -> dict[float, list[str]]:
    """Stratified, nested subsets of a training fold: each stratum is shuffled once and every
    fraction takes a prefix of it, so the 20 % subset lies inside the 40 % one (reduced-data curve)."""
    per_subject = _subject_strata([str(s) for s in subject_ids], strata)
    rng = np.random.default_rng(seed)
    orders = {}
    for stratum in sorted(per_subject.unique(), key=str):
        members = sorted(per_subject.index[per_subject == stratum])
        orders[stratum] = [members[i] for i in rng.permutation(len(members))]
    out: dict[float, list[str]] = {}
    for f in sorted(fractions):
        if not 0.0 < f <= 1.0:
            raise InputError(f"training fraction must be in (0, 1] (got {f})")
        chosen: list[str] = []
        for members in orders.values():
            chosen += members[: max(1, int(round(f * len(members))))]
        out[float(f)] = sorted(chosen)
    return out


def fold_row_indices(
    splits: dict[str, Any], subject_ids: Sequence[str]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Map each fold's subject lists onto row indices of a manifest. Rows whose subject the split
    does not know are an error (the split was made for other data); subjects of the split missing
    from the rows (e.g. dropped for a missing label) are simply absent."""
    ids = np.asarray([str(s) for s in subject_ids])
    known = {s for fold in splits["folds"] for part in ("train", "test") for s in fold[part]}
    unknown = sorted(set(ids) - known)
    if unknown:
        raise InputError(
            f"{len(unknown)} subjects are not in the splits file (e.g. {unknown[0]}); it was made for other data"
        )
    out = []
    for fold in splits["folds"]:
        train, test = set(fold["train"]), set(fold["test"])
        if train & test:
            raise InputError(f"splits file puts subject {sorted(train & test)[0]} in both train and test")
        out.append((np.flatnonzero(np.isin(ids, list(train))), np.flatnonzero(np.isin(ids, list(test)))))
    return out


def save_splits(splits: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    if p.suffix != ".json":
        p = p / layout.SPLITS
    text = json.dumps(splits, indent=1)
    return atomic_write(p, lambda f: f.write(text.encode()))


def load_splits(path: str | Path) -> dict[str, Any]:
    p, splits = read_json_file(path, layout.SPLITS, "splits")
    if not isinstance(splits, dict) or not isinstance(splits.get("folds"), list) or not splits["folds"]:
        raise InputError(f"splits file {p} has no 'folds' list")
    for k, fold in enumerate(splits["folds"]):
        if not isinstance(fold, dict) or not all(
            isinstance(fold.get(side), list) for side in ("train", "test")
        ):
            raise InputError(
                f"splits file {p}: fold {k} must be an object with 'train' and 'test' lists of subject ids"
            )
        if not fold["test"] or not all(isinstance(s, (str, int)) for s in fold["train"] + fold["test"]):
            raise InputError(f"splits file {p}: fold {k} needs a non-empty 'test' list of subject ids")
    _refuse_retested(splits["folds"], p)
    return splits


def _refuse_retested(folds: list[dict[str, Any]], path: Path) -> None:
    """Each subject in at most one test fold: two identical folds would report one fold twice as 2-fold
    CV (and leave the others untested), a subject tested twice would be counted twice."""
    tested: dict[str, int] = {}
    for k, fold in enumerate(folds):
        test = sorted(set(map(str, fold["test"])))
        same = [j for j in range(k) if sorted(set(map(str, folds[j]["test"]))) == test]
        again = [s for s in test if s in tested]
        if same or again:
            what = (f"folds {same[0]} and {k} test the same subjects" if same
                    else f"subject {again[0]} is tested in folds {tested[again[0]]} and {k}")  # fmt: skip
            raise InputError(f"splits file {path}: {what}; each subject belongs to one test fold")
        tested.update(dict.fromkeys(test, k))


def same_folds(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two splits assign the same subjects to the same test folds, in the same order."""
    fa, fb = a.get("folds", []), b.get("folds", [])
    return len(fa) == len(fb) and all(
        sorted(x["test"]) == sorted(y["test"]) and sorted(x["train"]) == sorted(y["train"])
        for x, y in zip(fa, fb, strict=True)
    )
