from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import volta3d.downstream.train_classify as tc
import volta3d.protocol.scoring as scoring
from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.models.encoder import VolTAEncoder
from volta3d.protocol.labels import prepare_labels
from volta3d.protocol.splits import make_kfold_splits

from ..config_kwargs import kwargs_for
from .conftest import TINY_OVERRIDES, config_section
from .synthetic import write_blob_dataset

FAST = [
    *TINY_OVERRIDES,
    "classify.pooling=mean",
    "classify.n_splits=2",
    "classify.batch_size=2",
    "classify.lr=1e-3",
]


def _finetune(data, out, label, *extra, epochs=10):
    return main(
        [
            "finetune",
            "classify",
            "--data",
            str(data),
            "--label",
            label,
            "--output",
            str(out),
            "--no-progress",
            *FAST,
            f"classify.epochs={epochs}",
            *extra,
        ]
    )


def test_blob_classifier_reaches_high_auroc_and_resumes(blob_data, tmp_path):
    out = tmp_path / "run"
    assert _finetune(blob_data, out, "diagnosis") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "binary" and results["classes"] == ["blob", "none"]
    assert results["aggregate"]["auroc"]["mean"] > 0.9
    assert len(results["folds"]) == 2
    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["subject_id"]) == sorted(
        read_manifest(blob_data)["subject_id"]
    )  # each scan tested once
    assert {"score", "prediction", "y_true", "fold"} <= set(preds.columns)
    for name in ("config.yaml", "splits.json", "log.txt", "folds/fraction1.00_fold0.json"):
        assert (out / name).exists()
    # resume: finished folds are read back, not retrained
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()}
    (out / "results.json").unlink()
    assert _finetune(blob_data, out, "diagnosis") == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()} == mtimes
    assert json.loads((out / "results.json").read_text())["aggregate"] == results["aggregate"]
    assert "finished in an earlier run, skipped" in (out / "log.txt").read_text()


def test_youden_threshold_is_fitted_on_an_inner_validation_split(blob_data, tmp_path, monkeypatch):
    seen = []
    real = scoring.binary_metrics

    def spy(y_true, scores, train_true, train_scores):
        seen.append((len(y_true), len(train_true)))
        return real(y_true, scores, train_true, train_scores)

    monkeypatch.setattr(scoring, "binary_metrics", spy)
    labels = prepare_labels(read_manifest(blob_data), "diagnosis")
    splits = make_kfold_splits(labels.table["subject_id"], labels.strata, n_splits=3, seed=0)
    res = tc.run_classification(
        labels,
        tmp_path,
        splits,
        config_section("classify", pooling="mean", epochs=1),
        encoder_kwargs=kwargs_for(VolTAEncoder, "model", **_tiny_encoder()),
        seed=0,
        device="cpu",
        progress=False,
    )
    sizes = [(len(s["test"]), f["n_threshold"]) for s, f in zip(splits["folds"], res["folds"], strict=True)]
    assert seen == sizes  # the threshold saw exactly the held-out validation subjects of each fold
    assert res["youden_fit"]["source"] == "inner_validation"
    for fold, split in zip(res["folds"], splits["folds"], strict=True):
        held = set(fold["threshold_subjects"])
        assert len(held) == fold["n_threshold"] > 0 and held <= set(split["train"])
        assert fold["n_train"] + fold["n_threshold"] == len(split["train"])  # the model never saw them
        assert fold["metrics"]["youden_threshold"] is not None


def _tiny_encoder():
    return {
        "img_size": 32,
        "patch_size": 16,
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_layers": 2,
        "num_heads": 4,
    }


def test_reduced_data_curve_uses_nested_fractions(blob_data, tmp_path):
    out = tmp_path / "curve"
    assert _finetune(blob_data, out, "diagnosis", "--fractions", "0.5,1.0", epochs=1) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["fractions"]) == {"0.5", "1"}
    n_half = [f["n_train"] + f["n_threshold"] for f in results["fractions"]["0.5"]["folds"]]
    n_full = [f["n_train"] + f["n_threshold"] for f in results["fractions"]["1"]["folds"]]
    assert n_half == [6, 6] and n_full == [12, 12]
    assert set(pd.read_csv(out / "predictions.csv")["fraction"]) == {0.5, 1.0}


def test_age_regression_beats_the_mean_predictor(tmp_path):
    data = write_blob_dataset(tmp_path / "age", n_subjects=24, max_offset=0.4, seed=1)
    out = tmp_path / "reg"
    assert _finetune(data, out, "age", epochs=25) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "regression" and results["primary_metric"] == "mae"
    preds = pd.read_csv(out / "predictions.csv")
    baseline = np.mean(np.abs(preds["y_true"] - preds["y_true"].mean()))
    assert results["aggregate"]["mae"]["mean"] < 0.6 * baseline


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("site", "label column 'site' has only one class ('A'); nothing to classify"),
        ("sex", "label column 'sex' is not in the manifest"),
    ],
)
def test_bad_label_column_is_a_one_line_error(blob_data, tmp_path, capsys, label, message):
    assert _finetune(blob_data, tmp_path / "bad", label, epochs=1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_missing_labels_are_dropped_and_multiclass_sorted():
    table = pd.DataFrame(
        {"subject_id": list("abcdef"), "path": list("abcdef"), "dx": ["CN", "AD", "", "MCI", None, "CN"]}
    )
    labels = prepare_labels(table, "dx")
    assert labels.dropped == 2 and labels.kind == "multiclass"
    assert labels.classes == ["AD", "CN", "MCI"]
    assert labels.targets.tolist() == [1, 0, 2, 1]


def test_regress_names_brain_age_and_fits_its_bias_correction_on_training_subjects(tmp_path, capsys):
    data = write_blob_dataset(tmp_path / "age", n_subjects=16, max_offset=0.4, seed=1)
    out = tmp_path / "regress"
    argv = ["finetune", "regress", "--data", str(data), "--output", str(out), "--no-progress", *FAST,
            "classify.epochs=2"]  # fmt: skip
    assert main(argv) == 0  # --label defaults to age
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "regression" and results["label"] == "age"
    preds = pd.read_csv(out / "predictions.csv")
    for fold in results["folds"]:
        m = fold["metrics"]
        rows = preds[preds["fold"] == fold["fold"]]
        gap = rows["prediction"] - rows["y_true"]
        assert m["gap_mean"] == pytest.approx(gap.mean())
        assert m["gap_age_r"] == pytest.approx(np.corrcoef(gap, rows["y_true"])[0, 1])
        assert m["pearson_r"] == pytest.approx(np.corrcoef(rows["prediction"], rows["y_true"])[0, 1])
        assert "gap_age_r_corrected" in m  # fitted on the fold's training predictions
    assert main([*argv[:5], str(tmp_path / "bad"), "--label", "diagnosis", *argv[6:]]) == 2
    assert "diagnosis" in capsys.readouterr().err
