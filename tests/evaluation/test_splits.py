from __future__ import annotations

import numpy as np
import pytest

from volta3d.protocol.splits import (
    fold_row_indices,
    load_splits,
    make_holdout_split,
    make_kfold_splits,
    nested_subsets,
    regression_strata,
    same_folds,
    save_splits,
)

from ..config_kwargs import section


def _rows(n_subjects=30, scans=3):
    subjects = [f"s{i:02d}" for i in range(n_subjects) for _ in range(scans)]
    labels = [i % 2 for i in range(n_subjects) for _ in range(scans)]
    return subjects, labels


def test_kfold_is_subject_disjoint_complete_and_stratified():
    subjects, labels = _rows()
    splits = make_kfold_splits(subjects, labels, n_splits=5, seed=3)
    tests = [set(f["test"]) for f in splits["folds"]]
    assert set().union(*tests) == set(subjects)
    assert sum(len(t) for t in tests) == 30  # every subject tested exactly once
    for fold in splits["folds"]:
        assert not set(fold["train"]) & set(fold["test"])
        assert set(fold["train"]) | set(fold["test"]) == set(subjects)
        test_labels = [int(s[1:]) % 2 for s in fold["test"]]
        assert sum(test_labels) == 3  # 15 positives over 5 folds: 3 each
    for train_idx, test_idx in fold_row_indices(splits, subjects):
        assert not {subjects[i] for i in train_idx} & {subjects[i] for i in test_idx}
        assert len(train_idx) + len(test_idx) == len(subjects)


def test_kfold_is_reproducible_with_a_seed_and_changes_with_it():
    subjects, labels = _rows()
    a = make_kfold_splits(subjects, labels, n_splits=section("classify")["n_splits"], seed=1)
    assert same_folds(
        a, make_kfold_splits(subjects, labels, n_splits=section("classify")["n_splits"], seed=1)
    )
    assert not same_folds(
        a, make_kfold_splits(subjects, labels, n_splits=section("classify")["n_splits"], seed=2)
    )


def test_splits_roundtrip_and_unknown_subject(tmp_path):
    subjects, labels = _rows(10, 1)
    splits = make_kfold_splits(subjects, labels, n_splits=2)
    path = save_splits(splits, tmp_path)
    assert path.name == "splits.json"
    assert same_folds(load_splits(tmp_path), splits)
    with pytest.raises(ValueError, match="1 subjects are not in the splits file"):
        fold_row_indices(splits, subjects + ["stranger"])
    with pytest.raises(FileNotFoundError, match="splits file not found"):
        load_splits(tmp_path / "nope.json")


def test_holdout_fraction_and_grouping():
    subjects, labels = _rows(50, 2)
    split = make_holdout_split(subjects, labels, fraction=0.2, seed=0)
    assert len(split["folds"]) == 1
    assert len(split["folds"][0]["test"]) == 10


def test_nested_subsets_are_nested_stratified_and_seeded():
    subjects = [f"s{i:02d}" for i in range(40)]
    labels = [0] * 30 + [1] * 10
    subs = nested_subsets(subjects, labels, [0.2, 0.4, 1.0], seed=5)
    assert set(subs[0.2]) <= set(subs[0.4]) <= set(subs[1.0]) == set(subjects)
    assert sum(int(s[1:]) >= 30 for s in subs[0.2]) == 2  # 20 % of the 10 positives
    assert len(subs[0.4]) == 16
    assert subs == nested_subsets(subjects, labels, [0.2, 0.4, 1.0], seed=5)
    assert subs[0.2] != nested_subsets(subjects, labels, [0.2], seed=6)[0.2]


def test_regression_strata_bins_by_quantile():
    strata = regression_strata(np.arange(100.0), n_bins=4)
    assert list(np.bincount(strata)) == [25, 25, 25, 25]


@pytest.mark.parametrize("folds, message", [
    ([1, 2], "fold 0 must be an object with 'train' and 'test' lists"),
    ([{"train": ["a"], "test": []}], "fold 0 needs a non-empty 'test' list"),
    ([{"train": ["a"], "test": ["b"]}, {"train": "a", "test": ["b"]}], "fold 1 must be an object"),
    ([{"train": [{"id": 1}], "test": ["b"]}], "fold 0 needs a non-empty 'test' list of subject ids"),
])  # fmt: skip
def test_malformed_folds_are_one_line_errors(tmp_path, folds, message):
    import json

    from volta3d.protocol.splits import load_splits

    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"folds": folds}))
    with pytest.raises(ValueError, match=message):
        load_splits(path)


@pytest.mark.parametrize("content, message", [
    ("null", "must hold a JSON object, not NoneType"),
    ("[1, 2]", "must hold a JSON object, not list"),
    ('{"folds": 3, "aggregate": {}}', "has no 'folds' list"),
    ('{"folds": [], "aggregate": null}', "has no 'aggregate' dict"),
])  # fmt: skip
def test_malformed_results_files_are_one_line_errors(tmp_path, content, message):
    from volta3d.protocol.results import load_run

    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_run(tmp_path)
