"""Real scans from ../shared/data: 2 IXI (2 mm, stored P-S-R) and 2 MSD hippocampus crops (with labels)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volta3d.data.bundled import write_bundled_manifests
from volta3d.data.cache import load_record, record_path, scan_key
from volta3d.data.dataset import VolumeDataset
from volta3d.data.preprocess import preprocess_dataset
from volta3d.data.sources import find_scans

from ..config_kwargs import kwargs_for, section_kwargs

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def manifests(shared_data, tmp_path_factory):
    return write_bundled_manifests(shared_data, tmp_path_factory.mktemp("bundled"))


def test_bundled_manifests(manifests):
    import pandas as pd

    ixi = pd.read_csv(manifests["ixi"])
    assert list(ixi.columns) == ["path", "subject_id", "age", "sex"] and len(ixi) == 145
    assert ixi.sex.isna().sum() == 4 and ixi.age.isna().sum() == 4
    msd = pd.read_csv(manifests["msd"])
    assert list(msd.columns) == ["path", "label_path", "subject_id"] and len(msd) == 200
    assert all(Path(p).is_absolute() and Path(p).exists() for p in msd.path[:3])


def test_ixi_reoriented_to_ras(manifests, tmp_path):
    scans = find_scans(manifests["ixi"], **kwargs_for(find_scans, "preprocess"))[:2]
    preprocess_dataset(scans, tmp_path, section_kwargs("preprocess", size=[32, 32, 32]), progress=False)
    ds = VolumeDataset(tmp_path, columns=["age", "sex"])
    assert len(ds) == 2 and ds[0]["sex"] in ("F", "M") and 18 < ds[0]["age"] < 90
    item = ds[0]
    assert item["image"].shape == (1, 32, 32, 32) and item["image"].min() >= 0 and item["image"].max() <= 1
    rec = load_record(record_path(tmp_path, scan_key(scans[0].source)))
    assert rec["input_orientation"] == "PSR" and rec["input_spacing"] == [2.0, 2.0, 2.0]
    affine = np.array(rec["affine"])
    assert nib.aff2axcodes(affine) == ("R", "A", "S") and np.allclose(affine[:3, :3], np.eye(3))
    # independent check: sample the source at the output grid's world points (nearest voxel, via
    # the two affines only); a flipped or permuted axis would destroy the correlation
    src = nib.load(scans[0].source)
    src_data = src.get_fdata()
    out = np.load(tmp_path / rec["path"]).astype(np.float32)[0]
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world = affine @ np.c_[grid, np.ones(len(grid))].T
    src_vox = np.rint(np.linalg.inv(src.affine) @ world)[:3].astype(int)
    inside = np.all((src_vox >= 0) & (src_vox < np.array(src_data.shape)[:, None]), axis=0)
    sampled = src_data[tuple(src_vox[:, inside])]
    corr = np.corrcoef(sampled, out.reshape(-1)[inside])[0, 1]
    assert inside.mean() > 0.9 and corr > 0.9


def test_msd_with_labels(manifests, tmp_path):
    scans = find_scans(manifests["msd"], **kwargs_for(find_scans, "preprocess"))[:2]
    summary = preprocess_dataset(
        scans, tmp_path, section_kwargs("preprocess", size=[48, 48, 48]), progress=False
    )
    assert (summary.accepted, summary.rejected) == (2, 0)
    ds = VolumeDataset(tmp_path, with_mask=True)
    for i in range(2):
        item = ds[i]
        assert item["image"].shape == item["mask"].shape == (1, 48, 48, 48)
        assert set(item["mask"].unique().tolist()) == {0, 1, 2}
        src_mask = nib.load(scans[i].label_path).get_fdata()
        for label in (1, 2):  # 1 mm RAS input: pad only, so every labelled voxel survives
            assert int((item["mask"] == label).sum()) == int((src_mask == label).sum())
