"""Saved fold models and `volta3d predict` on raw scans."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from volta3d.cli import main
from volta3d.data.dataset import read_manifest, read_preprocessing
from volta3d.downstream.train_segment import run_segmentation
from volta3d.protocol.splits import make_holdout_split

from ..config_kwargs import section
from ..data.scan_factory import write_nifti
from .conftest import config_section

MAX_VOXELS = section("preprocess")["max_voxels"]  # the voxel limit scans are read under


def _world_ball(shape, affine, center_mm, radius_mm) -> np.ndarray:
    """Voxels of a grid (shape, affine) whose world position lies within the ball."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (np.linalg.norm(xyz - np.asarray(center_mm), axis=1) <= radius_mm).reshape(shape)


def _sphere_scan(rng, shape, affine, center, radius) -> tuple[np.ndarray, np.ndarray]:
    ball = _world_ball(shape, affine, center, radius)
    vol = rng.uniform(0.0, 0.4, shape).astype(np.float32)
    vol[ball] += 0.6
    return vol, ball


@pytest.fixture(scope="module")
def sphere_model(tmp_path_factory):
    """A tiny U-Net trained on NIfTI spheres (RAS, 1 mm) preprocessed by `volta3d preprocess`."""
    root = tmp_path_factory.mktemp("sphere_model")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(10):
        vol, ball = _sphere_scan(rng, (32, 32, 32), np.eye(4), rng.uniform(10, 22, 3), rng.uniform(5, 7))
        rows.append(
            {
                "subject_id": f"sub{s:02d}",
                "path": str(write_nifti(root / f"raw/img{s}.nii.gz", vol)),
                "label_path": str(write_nifti(root / f"raw/lab{s}.nii.gz", ball.astype(np.uint8))),
            }
        )
    pd.DataFrame(rows).to_csv(root / "raw.csv", index=False)
    prep = root / "prep"
    assert (
        main(
            [
                "preprocess",
                "-o",
                str(prep),
                "--no-progress",
                str(root / "raw.csv"),
                "preprocess.size=[32,32,32]",
            ]
        )
        == 0
    )
    table = read_manifest(prep)
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
    run_segmentation(
        table, root / "run", splits, section,
        unet_kwargs={"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1},
        preprocessing=read_preprocessing(prep), seed=0, device="cpu", progress=False,
    )  # fmt: skip
    return root / "run"


def test_fold_model_records_how_to_rebuild_it(sphere_model):
    meta = json.loads((sphere_model / "models" / "fold0" / "model.json").read_text())
    assert meta["task"] == "segment" and meta["classes"] == [0, 1] and meta["encoder"] is None
    assert meta["build"]["model"] == "unet" and meta["build"]["unet_kwargs"]["channels"] == [8, 16, 32, 64]
    assert meta["preprocessing"]["size"] == [32, 32, 32] and meta["preprocessing"]["orientation"] == "RAS"
    assert (sphere_model / "models" / "fold0" / "model.safetensors").is_file()


def test_predict_writes_the_mask_on_the_input_grid(sphere_model, tmp_path):
    # stored L-P-I-ish with anisotropic voxels: axes flipped and 1.5 / 0.8 / 1.2 mm
    affine = np.array([[-1.5, 0, 0, 20.0], [0, -0.8, 0, 12.0], [0, 0, 1.2, -15.0], [0, 0, 0, 1]])
    shape, center, radius = (24, 36, 26), (3.0, -2.0, 0.0), 6.5
    vol, ball = _sphere_scan(np.random.default_rng(5), shape, affine, center, radius)
    scan = write_nifti(tmp_path / "in" / "odd.nii.gz", vol, affine)
    write_nifti(tmp_path / "in" / "flat.nii.gz", np.ones((10, 10, 10), np.float32))
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(sphere_model),
                str(scan),
                str(tmp_path / "in" / "flat.nii.gz"),
                str(tmp_path / "missing.nii.gz"),
                str(scan),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    img = nib.load(out / "odd_seg.nii.gz")
    mask = np.asarray(img.dataobj)
    assert mask.shape == shape and np.allclose(img.affine, affine)
    dice = 2 * (mask.astype(bool) & ball).sum() / (mask.astype(bool).sum() + ball.sum())
    assert dice > 0.7
    volumes = pd.read_csv(out / "volumes.csv")
    assert volumes["segmentation"].tolist() == ["odd_seg.nii.gz", "odd_2_seg.nii.gz"]  # never overwritten
    expected = mask.astype(bool).sum() * 1.5 * 0.8 * 1.2
    assert volumes["volume_label1_mm3"].tolist() == pytest.approx([expected, expected])
    assert expected == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.35)
    rejected = pd.read_csv(out / "rejected.csv")
    assert len(rejected) == 2 and len(volumes) == 2  # the bad scans did not stop the good ones
    reasons = dict(zip(rejected["source"].map(lambda s: s.split("/")[-1]), rejected["reason"], strict=True))
    assert "constant volume" in reasons["flat.nii.gz"] and "not found" in reasons["missing.nii.gz"]


def test_predict_without_saved_models_is_a_one_line_error(tmp_path, capsys):
    assert (
        main(["predict", str(tmp_path), str(tmp_path), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no saved fold models in" in err[0]


def test_classifier_predict_reproduces_its_out_of_fold_probabilities(tmp_path):
    from .test_classify import FAST

    rng = np.random.default_rng(3)
    rows = []
    for s in range(12):
        vol = rng.uniform(0.0, 0.2, (32, 32, 32)).astype(np.float32)
        if s % 2 == 0:
            vol[_world_ball(vol.shape, np.eye(4), rng.uniform(10, 22, 3), 7)] = 1.0
        path = write_nifti(tmp_path / "raw" / f"s{s:02d}.nii.gz", vol)
        rows.append(
            {"subject_id": f"s{s:02d}", "path": str(path), "diagnosis": "blob" if s % 2 == 0 else "none"}
        )
    pd.DataFrame(rows).to_csv(tmp_path / "raw.csv", index=False)
    prep, run = tmp_path / "prep", tmp_path / "run"
    assert (
        main(
            [
                "preprocess",
                "-o",
                str(prep),
                "--no-progress",
                str(tmp_path / "raw.csv"),
                "preprocess.size=[32,32,32]",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "classify",
                "--data",
                str(prep),
                "--label",
                "diagnosis",
                "--output",
                str(run),
                "--no-progress",
                *FAST,
                "classify.epochs=2",
                "classify.positive_class=blob",
            ]
        )
        == 0
    )
    oof = pd.read_csv(run / "predictions.csv", dtype={"subject_id": str})
    results = json.loads((run / "results.json").read_text())
    for fold, expected in oof.groupby("fold"):
        table = pd.DataFrame(rows).set_index("subject_id").loc[expected["subject_id"]].reset_index()
        table[["subject_id", "path"]].to_csv(tmp_path / f"fold{fold}.csv", index=False)
        out = tmp_path / f"pred{fold}"
        assert (
            main(
                [
                    "predict",
                    str(run),
                    str(tmp_path / f"fold{fold}.csv"),
                    "--output",
                    str(out),
                    "--folds",
                    str(fold),
                    "--no-progress",
                ]
            )
            == 0
        )
        got = pd.read_csv(out / "predictions.csv", dtype={"subject_id": str}).set_index("subject_id")
        np.testing.assert_allclose(got.loc[expected["subject_id"], "p_blob"], expected["score"], atol=1e-5)
        thr = results["folds"][fold]["metrics"]["youden_threshold"]
        assert (got["label_youden"] == np.where(got["p_blob"] >= thr, "blob", "none")).all()
    # the whole ensemble: mean of the fold probabilities, labels at 0.5 and the mean threshold
    assert (
        main(
            [
                "predict",
                str(run),
                str(tmp_path / "raw.csv"),
                "--output",
                str(tmp_path / "all"),
                "--no-progress",
            ]
        )
        == 0
    )
    allp = pd.read_csv(tmp_path / "all" / "predictions.csv")
    assert len(allp) == 12 and np.allclose(allp["p_blob"] + allp["p_none"], 1.0, atol=1e-5)
    assert (allp["label_0.5"] == np.where(allp["p_blob"] >= 0.5, "blob", "none")).all()
    mean_thr = np.mean([f["metrics"]["youden_threshold"] for f in results["folds"]])
    assert allp["youden_threshold"].iloc[0] == pytest.approx(mean_thr)
    meta = json.loads((run / "models" / "fraction1.00_fold0" / "model.json").read_text())
    assert meta["positive_class"] == "blob" and meta["classes"] == ["blob", "none"]


def test_predict_segments_a_dicom_series_on_its_own_grid(sphere_model, tmp_path):
    from volta3d.data.io import read_volume

    from ..data.scan_factory import write_dicom_series

    rng = np.random.default_rng(11)
    shape = (16, 36, 40)  # slices 2 mm apart, pixels 0.9 x 0.8 mm
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ball = np.linalg.norm((grid - np.array([8, 18, 20])) * np.array([2.0, 0.9, 0.8]), axis=-1) <= 7.0
    volume = rng.uniform(0, 160, shape) + 240 * ball
    write_dicom_series(tmp_path / "dicom" / "series1", np.round(volume), rescale=(1.0, 0.0))
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                str(sphere_model),
                str(tmp_path / "dicom" / "series1"),
                "--output",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    volumes = pd.read_csv(out / "volumes.csv")
    image, meta = read_volume(tmp_path / "dicom" / "series1", MAX_VOXELS)
    seg = nib.load(out / volumes["segmentation"].item())
    mask = np.asarray(seg.dataobj).astype(bool)
    assert mask.shape == image.shape[1:] and np.allclose(seg.affine, meta["affine"])
    truth = image[0] > 200  # the bright ball, on the array grid the reader returns
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.7


def test_predict_needs_the_preprocessing_of_the_training_data(blob_data, tmp_path, capsys):
    from .test_classify import FAST

    run = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "classify",
                "--data",
                str(blob_data),
                "--label",
                "diagnosis",
                "--output",
                str(run),
                "--no-progress",
                *FAST,
                "classify.epochs=1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["predict", str(run), str(blob_data), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "records no preprocessing settings" in err[0]


def test_collect_scans_takes_files_folders_bids_and_csv(tmp_path):
    from volta3d.downstream.predict import collect_scans

    from ..data.scan_factory import head_like, write_bids

    write_bids(tmp_path / "bids")
    one = write_nifti(tmp_path / "single" / "brain_1.nii.gz", head_like())
    pd.DataFrame({"path": [str(one)], "subject_id": ["csv-subject"]}).to_csv(
        tmp_path / "list.csv", index=False
    )
    (tmp_path / "notes.txt").write_text("not a scan")
    scans, rejected = collect_scans(
        [tmp_path / "bids", one, tmp_path / "list.csv", tmp_path / "notes.txt"], section("preprocess")
    )
    assert [s.subject_id for s in scans][-2:] == ["brain_1", "csv-subject"]
    assert len(scans) == 5  # three BIDS T1w scans (the T2w is ignored), the file, the CSV row
    assert len(rejected) == 1 and rejected[0]["source"].endswith("notes.txt")
    assert "is a file but not a .csv/.tsv manifest" in rejected[0]["reason"]


def test_unknown_preprocessing_setting_is_a_one_line_error(sphere_model, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(sphere_model / "models", run / "models")
    record = run / "models" / "fold0" / "model.json"
    meta = json.loads(record.read_text())
    meta["preprocessing"]["zoom"] = 2
    record.write_text(json.dumps(meta))
    assert main(["predict", str(run), str(tmp_path), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert (
        len(err) == 1
        and "saved model fold0 has preprocessing setting 'zoom' unknown to this volta3d" in err[0]
    )
