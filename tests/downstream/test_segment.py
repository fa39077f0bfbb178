from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from volta3d.cli import main
from volta3d.data.dataset import read_manifest
from volta3d.downstream.train_segment import run_segmentation, scan_spacings
from volta3d.protocol.splits import make_holdout_split

from .conftest import TINY_OVERRIDES, config_section
from .synthetic import write_sphere_segmentation


def test_tiny_unet_finds_the_sphere(tmp_path):
    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=10)
    table = read_manifest(data)
    splits = make_holdout_split(table["subject_id"], None, fraction=0.2, seed=0)
    section = config_section(
        "segment",
        model="unet",
        crop_size=16,
        samples_per_volume=2,
        epochs=20,
        batch_size=4,
        lr=1e-2,
        val_every=5,
        val_fraction=0.25,
    )
    res = run_segmentation(
        table, tmp_path / "run", splits, section,
        unet_kwargs={"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1},
        seed=0, device="cpu", progress=False,
    )  # fmt: skip
    assert res["aggregate"]["dice"]["mean"] > 0.8
    fold = res["folds"][0]
    assert (
        fold["n_test"] == 2 and fold["n_val"] == 2 and fold["n_train"] == 6
    )  # validation from training side
    preds = pd.read_csv(tmp_path / "run" / "predictions.csv")
    assert {"dice_label1", "hd95_label1", "dice_mean"} <= set(preds.columns)
    assert (tmp_path / "run" / "fold0_best.pt").exists()
    # saved test predictions: uint8 label maps on the preprocessed grid whose Dice is the reported one
    index = pd.read_csv(tmp_path / "run" / "predictions" / "index.csv", dtype={"subject_id": str})
    assert sorted(index["subject_id"]) == sorted(splits["folds"][0]["test"])
    for row in index.itertuples():
        pred = np.load(tmp_path / "run" / "predictions" / row.prediction)
        truth = np.load(row.label)[0].astype(bool)
        assert (
            row.prediction == f"{row.subject_id}.npy" and pred.dtype == np.uint8 and pred.shape == truth.shape
        )
        dice = 2 * (pred.astype(bool) & truth).sum() / (pred.astype(bool).sum() + truth.sum())
        reported = preds.loc[preds["subject_id"] == row.subject_id, "dice_label1"].item()
        assert np.isclose(dice, reported, atol=1e-5)


def test_segment_cli_rejects_masks_with_undeclared_labels(tmp_path, capsys):
    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=4)
    mask = np.load(data / "lab02.npy")
    mask[0, 0, 0, 0] = 2
    np.save(data / "lab02.npy", mask)
    code = main(
        [
            "finetune",
            "segment",
            "--data",
            str(data),
            "--output",
            str(tmp_path / "run"),
            "--model",
            "unet",
            "--no-progress",
            *TINY_OVERRIDES,
            "segment.num_classes=2",
            "segment.epochs=1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "lab02.npy has label 2 but segment.num_classes=2 (labels 0..1)" in err[0]


def test_segment_cli_unetr_writes_results(tmp_path):
    data = write_sphere_segmentation(tmp_path / "sph", n_subjects=5)
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "segment",
            "--data",
            str(data),
            "--output",
            str(out),
            "--no-progress",
            *TINY_OVERRIDES,
            "model.num_layers=12",
            "segment.feature_size=8",
            "segment.crop_size=32",
            "segment.epochs=1",
            "segment.samples_per_volume=1",
            "segment.val_fraction=0",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "unetr-scratch" and results["classes"] == [0, 1]
    assert results["splits"]["method"] == "holdout" and len(results["splits"]["folds"][0]["test"]) == 1


def test_hd95_spacing_comes_from_the_preprocessing_records(tmp_path):
    (tmp_path / "volumes").mkdir()
    (tmp_path / "records").mkdir()
    affine = [[-2.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]
    (tmp_path / "records" / "a.json").write_text(json.dumps({"affine": affine}))
    table = pd.DataFrame(
        {"path": [str(tmp_path / "volumes" / "a.npy"), str(tmp_path / "elsewhere" / "b.npy")]}
    )
    assert scan_spacings(table, None).tolist() == [[2.0, 1.5, 1.0], [1.0, 1.0, 1.0]]
    assert scan_spacings(table, [2.0, 1.5, 1.0]).tolist() == [[2.0, 1.5, 1.0], [2.0, 1.5, 1.0]]
    with pytest.raises(
        ValueError, match=r"segment.spacing=\[1.0, 1.0, 1.0\] disagrees with the preprocessed spacing"
    ):
        scan_spacings(table, [1.0, 1.0, 1.0])
