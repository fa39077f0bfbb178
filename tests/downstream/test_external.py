"""`finetune --test-data` trains on --data and tests on an external set."""

from __future__ import annotations

import json

import pandas as pd

from volta3d.cli import main

from .conftest import TINY_OVERRIDES
from .synthetic import write_blob_dataset, write_sphere_segmentation
from .test_classify import FAST


def _classify(data, out, *extra, epochs=1):
    return main(
        [
            "finetune",
            "classify",
            "--data",
            str(data),
            "--label",
            "diagnosis",
            "--output",
            str(out),
            "--no-progress",
            *FAST,
            f"classify.epochs={epochs}",
            *extra,
        ]
    )


def test_classify_reports_metrics_on_the_external_set(blob_data, tmp_path):
    ext = write_blob_dataset(tmp_path / "ext", n_subjects=8, seed=5)
    out = tmp_path / "run"
    assert _classify(blob_data, out, "--test-data", str(ext), epochs=10) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test"] == {"external": True, "data": str(ext)}
    assert res["splits"]["method"] == "external" and len(res["folds"]) == 1
    fold = res["folds"][0]
    assert fold["n_test"] == 8 and fold["n_train"] + fold["n_threshold"] == 24  # all of --data trains
    assert res["aggregate"]["auroc"]["mean"] > 0.9
    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds["subject_id"]) == [f"external:sub{s:02d}" for s in range(8)]


def test_internal_runs_say_their_test_is_not_external(blob_data, tmp_path):
    assert _classify(blob_data, tmp_path / "run") == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["test"] == {
        "external": False,
        "data": None,
    }


def test_external_class_unknown_to_training_is_an_error(blob_data, tmp_path, capsys):
    ext = write_blob_dataset(tmp_path / "ext", n_subjects=4, seed=5)
    manifest = pd.read_csv(ext / "manifest.csv")
    manifest.loc[0, "diagnosis"] = "cyst"
    manifest.to_csv(ext / "manifest.csv", index=False)
    assert _classify(blob_data, tmp_path / "run", "--test-data", str(ext)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and f"external test set {ext} has class 'cyst' that --data lacks" in err[0]
    assert _classify(blob_data, tmp_path / "run2", "--test-data", str(ext), "--splits", "x.json") == 2
    assert "--test-data fixes the split" in capsys.readouterr().err


def test_segment_reports_metrics_on_the_external_set(tmp_path):
    data = write_sphere_segmentation(tmp_path / "train", n_subjects=6)
    ext = write_sphere_segmentation(tmp_path / "ext", n_subjects=3, seed=9)
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "segment",
                "--data",
                str(data),
                "--test-data",
                str(ext),
                "--output",
                str(out),
                "--model",
                "unet",
                "--no-progress",
                *TINY_OVERRIDES,
                "segment.epochs=1",
                "segment.crop_size=32",
                "segment.samples_per_volume=1",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["external"] is True and res["folds"][0]["n_test"] == 3
    assert res["folds"][0]["n_train"] + res["folds"][0]["n_val"] == 6
    assert set(pd.read_csv(out / "predictions.csv")["subject_id"]) == {
        f"external:sub{s:02d}" for s in range(3)
    }
