"""VolumeDataset / read_manifest over a preprocessed folder."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from volta3d.data.dataset import VolumeDataset, read_manifest
from volta3d.data.preprocess import preprocess_dataset

from ..config_kwargs import section_kwargs
from .scan_factory import head_like, write_nifti


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    mask = np.zeros((20, 22, 18), np.float32)
    mask[6:12, 6:12, 6:12] = 1
    rows = []
    for i, (sex, age) in enumerate([("F", 30.0), ("M", None), ("", 55.5)]):
        write_nifti(root / f"in/img{i}.nii.gz", head_like(seed=i))
        write_nifti(root / f"in/seg{i}.nii.gz", mask)
        rows.append(
            {
                "path": f"img{i}.nii.gz",
                "label_path": f"seg{i}.nii.gz",
                "subject_id": f"{i:03d}",
                "sex": sex,
                "age": age,
            }
        )
    pd.DataFrame(rows).to_csv(root / "in/list.csv", index=False)
    preprocess_dataset(
        root / "in/list.csv", root / "out", section_kwargs("preprocess", size=[16, 16, 16]), progress=False
    )
    return root / "out"


def test_items(prepared):
    ds = VolumeDataset(prepared, columns=["sex", "age"], with_mask=True)
    assert len(ds) == 3
    item = ds[1]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0.0 and item["image"].max() <= 1.0
    assert item["mask"].shape == (1, 16, 16, 16) and item["mask"].dtype == torch.int64
    assert set(item["mask"].unique().tolist()) == {0, 1}
    assert item["subject_id"] == "001" and item["index"] == 1  # ids stay strings (leading zeros kept)
    assert item["sex"] == "M" and np.isnan(item["age"])
    assert ds[2]["sex"] == "" and ds[0]["age"] == 30.0
    batch = torch.utils.data.default_collate([ds[0], ds[2]])
    assert batch["image"].shape == (2, 1, 16, 16, 16) and batch["sex"] == ["F", ""]


def test_transform_and_dataframe_input(prepared):
    table = read_manifest(prepared / "manifest.csv")
    ds = VolumeDataset(table.iloc[:2], transform=lambda d: {**d, "image": d["image"] * 2})
    assert len(ds) == 2 and float(ds[0]["image"].max()) == pytest.approx(2.0)


def test_relative_paths_survive_a_move(prepared, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(prepared, moved)
    table = read_manifest(moved)
    assert all(p.startswith(str(moved)) for p in table.path)
    assert VolumeDataset(table)[0]["image"].shape == (1, 16, 16, 16)


def test_errors(prepared, tmp_path):
    with pytest.raises(KeyError, match="manifest has no column 'diagnosis'"):
        VolumeDataset(prepared, columns=["diagnosis"])
    with pytest.raises(FileNotFoundError, match="manifest not found: .*nothing/manifest.csv"):
        read_manifest(tmp_path / "nothing" / "manifest.csv")
    (tmp_path / "bad.csv").write_text("subject_id,file\na,b.npy\n")
    with pytest.raises(ValueError, match=r"bad.csv has no 'path' column"):
        read_manifest(tmp_path / "bad.csv")
    no_mask = read_manifest(prepared).drop(columns="label_path")
    with pytest.raises(KeyError, match="with_mask=True but the manifest has no 'label_path' column"):
        VolumeDataset(no_mask, with_mask=True)
