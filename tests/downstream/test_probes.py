from __future__ import annotations

import json

import numpy as np
import pandas as pd

from volta3d.cli import main
from volta3d.config import load_config
from volta3d.protocol.embeddings import load_embeddings
from volta3d.protocol.labels import prepare_labels
from volta3d.protocol.probes import make_probe, run_probe
from volta3d.protocol.splits import make_kfold_splits

from .conftest import TINY_OVERRIDES, config_section


def _probe_settings(**changes) -> dict:
    """``run_probe``'s settings as the probe command passes them: the default config's."""
    probe = config_section("probe")
    return {
        "seed": load_config().seed,
        "fractions": probe["fractions"],
        "logreg_cs": probe["logreg_cs"],
        "knn_k": probe["knn_k"],
        "ridge_alphas": probe["ridge_alphas"],
        "inner_folds": probe["inner_folds"],
        **changes,
    }


def _table(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    table = pd.DataFrame(
        {
            "subject_id": [f"s{i:02d}" for i in range(n)],
            "path": [f"p{i}" for i in range(n)],
            "dx": np.where(y == 1, "AD", "CN"),
            "age": 20 + 3.0 * np.arange(n),
        }
    )
    feats = rng.normal(0, 1, (n, 8))
    feats[:, 0] += 3 * y  # the label is one feature away
    feats[:, 1] = table["age"] / 10  # age is linear in another
    return table, feats


def test_probes_recover_known_signal():
    table, feats = _table()
    for column, probe, metric, bound in (
        ("dx", "linear", "auroc", 0.95),
        ("dx", "knn", "auroc", 0.8),
        ("age", "linear", "r2", 0.95),
    ):
        labels = prepare_labels(table, column)
        splits = make_kfold_splits(table["subject_id"], labels.strata, n_splits=4, seed=0)
        res, preds = run_probe(
            feats, labels, splits, probe, feature_name="x", encoder=None, **_probe_settings(knn_k=5)
        )
        assert res["aggregate"][metric]["mean"] > bound, (column, probe)
        assert sorted(preds["subject_id"]) == sorted(table["subject_id"])


def test_probe_reduced_data_fractions_are_nested():
    table, feats = _table()
    labels = prepare_labels(table, "dx")
    splits = make_kfold_splits(table["subject_id"], labels.strata, n_splits=4, seed=0)
    res, preds = run_probe(
        feats,
        labels,
        splits,
        "linear",
        feature_name="x",
        encoder=None,
        **_probe_settings(fractions=[0.5, 1.0]),
    )
    assert set(res["fractions"]) == {"0.5", "1"}
    for fold in range(4):
        rows = preds[preds["fold"] == fold]
        half, full = (rows[rows["fraction"] == f] for f in (0.5, 1.0))
        assert sorted(half["subject_id"]) == sorted(
            full["subject_id"]
        )  # same test subjects at every fraction
    n_train = {frac: [f["n_train"] for f in res["fractions"][frac]["folds"]] for frac in ("0.5", "1")}
    # 40 subjects, 4 folds: 30 training = 15 per class; half of each class rounds to 8
    assert n_train == {"0.5": [16] * 4, "1": [30] * 4}


def test_embed_probe_compare_cli(blob_data, tmp_path, capsys):
    emb = tmp_path / "emb.npz"
    assert (
        main(["embed", "--data", str(blob_data), "--output", str(emb), "--no-progress", *TINY_OVERRIDES]) == 0
    )
    data, meta = load_embeddings(emb)
    assert data["mean"].shape == (24, 48) and data["cls"].shape == (24, 48)
    assert meta["init"] == "random-init"
    out = tmp_path / "probe"
    assert (
        main(
            [
                "probe",
                "--embeddings",
                str(emb),
                "--data",
                str(blob_data),
                "--label",
                "diagnosis",
                "--output",
                str(out),
                "probe.n_splits=3",
                "probe.knn_k=5",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"linear_cls", "knn_cls", "linear_mean", "knn_mean"}
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                str(out / "linear_mean"),
                str(out / "knn_mean"),
                "--n-boot",
                "100",
                "--output",
                str(tmp_path / "cmp.json"),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "DeLong" in printed and "auroc" in printed
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert cmp["n_folds"] == 3 and cmp["delong"]["n"] == 24
    # a run on other folds cannot be compared
    assert (
        main(
            [
                "probe",
                "--embeddings",
                str(emb),
                "--data",
                str(blob_data),
                "--label",
                "diagnosis",
                "--output",
                str(tmp_path / "other"),
                "probe.n_splits=2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["compare", str(out / "linear_mean"), str(tmp_path / "other" / "linear_mean")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "were not evaluated on the same folds" in err[0]


def test_linear_probe_chooses_its_regularisation_inside_the_training_rows():
    """Ridge picks a large alpha of the grid on pure noise (p >> n) and the smallest on an exact linear
    signal; a one-value grid is that fixed value; logistic regression with a class of one training subject
    falls back to the middle of the grid instead of failing."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 200))
    grid = [0.01, 1.0, 100.0, 10000.0]

    def fitted_alpha(y: np.ndarray) -> float:
        est = make_probe(
            "linear",
            "regression",
            logreg_cs=[1.0],
            knn_k=5,
            ridge_alphas=grid,
            inner_folds=5,
            train_targets=y,
            seed=0,
        )
        return est.fit(x, y)[-1].alpha_

    assert fitted_alpha(rng.normal(size=30)) >= 100.0  # noise: strong shrinkage
    assert fitted_alpha(x[:, :3] @ np.array([1.0, -2.0, 0.5])) == 0.01
    fixed = make_probe(
        "linear",
        "regression",
        logreg_cs=[1.0],
        knn_k=5,
        ridge_alphas=[3.0],
        inner_folds=5,
        train_targets=x[:, 0],
        seed=0,
    )
    assert fixed.fit(x, x[:, 0])[-1].alpha == 3.0
    y = np.array([0] * 29 + [1])
    lone = make_probe(
        "linear",
        "binary",
        logreg_cs=grid,
        knn_k=5,
        ridge_alphas=[1.0],
        inner_folds=5,
        train_targets=y,
        seed=0,
    )
    assert grid[len(grid) // 2] == lone.fit(x, y)[-1].C  # the middle of the grid


def test_logistic_probe_inner_folds_never_exceed_the_smallest_class():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 6))
    y = np.array([0] * 9 + [1] * 3)
    x[y == 1, 0] += 3.0
    est = make_probe(
        "linear", "binary", logreg_cs=[0.01, 1.0, 100.0], knn_k=5, ridge_alphas=[1.0], inner_folds=5,
        train_targets=y, seed=0,
    )  # fmt: skip
    est.fit(x, y)  # 5 inner folds on a class of 3 would raise in scikit-learn
    assert est[-1].cv.get_n_splits() == 3 and est[-1].C_ in (0.01, 1.0, 100.0)
