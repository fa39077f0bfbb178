from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from volta3d.evaluation.comparison import compare_results, format_comparison
from volta3d.protocol.results import load_run, save_run
from volta3d.protocol.splits import make_kfold_splits


def _fake_run(path, splits, signal, seed):
    rng = np.random.default_rng(seed)
    rows, folds = [], []
    for k, fold in enumerate(splits["folds"]):
        y = np.array([int(s[1:]) % 2 for s in fold["test"]])
        score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, len(y)))))
        folds.append(
            {"fold": k, "metrics": {"auroc": float(np.mean(score[y == 1]) - np.mean(score[y == 0]))}}
        )
        rows += [
            {"subject_id": s, "fold": k, "y_true": t, "score": p}
            for s, t, p in zip(fold["test"], y, score, strict=True)
        ]
    results = {"kind": "binary", "model": f"m{seed}", "splits": splits, "folds": folds, "aggregate": {}}
    save_run(path, results, pd.DataFrame(rows))


def test_compare_results_on_same_folds(tmp_path):
    subjects = [f"s{i:02d}" for i in range(40)]
    splits = make_kfold_splits(subjects, [int(s[1:]) % 2 for s in subjects], n_splits=4, seed=0)
    _fake_run(tmp_path / "a", splits, 2.0, 1)
    _fake_run(tmp_path / "b", splits, 0.2, 2)
    cmp = compare_results(tmp_path / "a", tmp_path / "b", n_boot=200, seed=0)
    assert cmp["n_folds"] == 4
    fl = cmp["fold_level"]["auroc"]
    assert fl["ci_low"] <= fl["estimate"] <= fl["ci_high"]
    d = cmp["delong"]
    assert d["n"] == 40 and d["diff"] > 0 and d["p"] < 0.05
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert "DeLong" in format_comparison(cmp)
    assert compare_results(load_run(tmp_path / "a"), load_run(tmp_path / "b"), n_boot=200, seed=0) == cmp


def test_compare_rejects_different_folds_and_unknown_metric(tmp_path):
    subjects = [f"s{i:02d}" for i in range(20)]
    strata = [int(s[1:]) % 2 for s in subjects]
    _fake_run(tmp_path / "a", make_kfold_splits(subjects, strata, n_splits=2, seed=0), 1.0, 1)
    _fake_run(tmp_path / "b", make_kfold_splits(subjects, strata, n_splits=2, seed=9), 1.0, 2)
    with pytest.raises(ValueError, match="were not evaluated on the same folds"):
        compare_results(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="metric 'dice' is not in both runs"):
        compare_results(tmp_path / "a", tmp_path / "a", metrics=["dice"])
    with pytest.raises(FileNotFoundError, match="results file not found"):
        compare_results(tmp_path / "a", tmp_path / "missing")


def _curve_run(splits, values: dict[str, list[float]]) -> dict:
    """A run with a reduced-data curve: ``values`` maps a fraction to its per-fold AUROCs."""
    blocks = {f: {"folds": [{"fold": k, "metrics": {"auroc": v}} for k, v in enumerate(vals)], "aggregate": {}}
              for f, vals in values.items()}  # fmt: skip
    top = blocks[max(values, key=float)]
    return {"kind": "binary", "primary_metric": "auroc", "splits": splits, "fractions": blocks, **top}


def test_compare_pairs_every_training_fraction_of_a_curve():
    subjects = [f"s{i:02d}" for i in range(20)]
    splits = make_kfold_splits(subjects, [int(s[1:]) % 2 for s in subjects], n_splits=4, seed=0)
    a = {"0.2": [0.9, 0.8, 0.85, 0.95], "1": [0.9, 0.9, 0.9, 0.9]}
    b = {"0.2": [0.6, 0.7, 0.65, 0.6], "1": [0.88, 0.91, 0.9, 0.89]}
    run_a, run_b = _curve_run(splits, a), _curve_run(splits, b)
    curve = compare_results(run_a, run_b, n_boot=500, seed=0)["fraction_level"]
    assert list(curve) == ["0.2", "1"]
    for frac in curve:
        assert curve[frac]["estimate"] == pytest.approx(np.mean(a[frac]) - np.mean(b[frac]))
        assert curve[frac]["n"] == 4 and curve[frac]["metric"] == "auroc"
    assert curve["0.2"]["ci_low"] > 0  # pretraining helped where labels were scarce
    assert "auroc, fraction 0.2" in format_comparison(compare_results(run_a, run_b, n_boot=200))


def test_headline_states_per_fraction_whether_pretraining_helped_fine_tuning():
    from volta3d.evaluation.report_headline import headline_rows, headline_table
    from volta3d.evaluation.report_runs import Run

    subjects = [f"s{i:02d}" for i in range(20)]
    splits = make_kfold_splits(subjects, [int(s[1:]) % 2 for s in subjects], n_splits=4, seed=0)
    a = _curve_run(splits, {"0.2": [0.9, 0.8, 0.85, 0.95], "1": [0.9, 0.9, 0.9, 0.9]})
    b = _curve_run(splits, {"0.2": [0.6, 0.7, 0.65, 0.6], "1": [0.88, 0.91, 0.9, 0.89]})
    for run, encoder in ((a, "/enc"), (b, None)):
        run.update(task="classify", label="sex", encoder=encoder)
        for block in run["fractions"].values():
            block["aggregate"] = {
                "auroc": {"mean": float(np.mean([f["metrics"]["auroc"] for f in block["folds"]]))}
            }
    ref, other = Run("vit-pretrained", a), Run("vit-scratch", b)
    key = ref.task_key
    rows = headline_rows({key: [ref, other]}, {key: [(ref, other, compare_results(a, b, n_boot=500))]})
    scarce, full = rows
    assert (scarce.fraction, full.fraction) == (0.2, None)
    assert scarce.verdict == "better" and scarce.ref_value == pytest.approx(0.875)
    assert "(20% of labels)" in scarce.label
    assert [row[1] for row in headline_table(rows, "VolTA-3D").rows] == ["sex, 20% of labels", "sex"]
    probe_key = ("probe", *key[1:])
    assert (
        len(headline_rows({probe_key: [ref, other]}, {probe_key: [(ref, other, compare_results(a, b))]})) == 1
    )
