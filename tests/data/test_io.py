"""read_volume: the (1, D, H, W) float32 + affine contract for NIfTI files and DICOM series."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from volta3d.data.io import ScanError, read_volume

from ..config_kwargs import section
from .scan_factory import head_like, write_dicom_series, write_nifti

MAX_VOXELS = section("preprocess")["max_voxels"]  # the voxel limit scans are read under


def test_nifti_contract(tmp_path):
    affine = np.array([[0, 0, 2.0, -10], [-1.5, 0, 0, 20], [0, 3.0, 0, -5], [0, 0, 0, 1]])
    data = head_like((6, 7, 8))
    arr, meta = read_volume(write_nifti(tmp_path / "a.nii.gz", data, affine), MAX_VOXELS)
    assert arr.shape == (1, 6, 7, 8) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], data)
    np.testing.assert_allclose(meta["affine"], affine)
    assert meta["spacing"] == pytest.approx((1.5, 3.0, 2.0))
    assert meta["orientation"] == "PSR"


def test_singleton_4d_is_squeezed_true_4d_and_2d_rejected(tmp_path):
    arr, _ = read_volume(write_nifti(tmp_path / "s.nii", head_like((5, 6, 7))[..., None]), MAX_VOXELS)
    assert arr.shape == (1, 5, 6, 7)
    with pytest.raises(ScanError, match=r"4D image of shape \(5, 6, 7, 3\) \(3 volumes\)"):
        read_volume(write_nifti(tmp_path / "t.nii", np.ones((5, 6, 7, 3), np.float32)), MAX_VOXELS)
    with pytest.raises(ScanError, match=r"2D image of shape \(5, 6\)"):
        read_volume(write_nifti(tmp_path / "u.nii", np.ones((5, 6), np.float32)), MAX_VOXELS)
    with pytest.raises(ScanError, match="2D image"):
        read_volume(write_nifti(tmp_path / "v.nii", np.ones((5, 6, 1), np.float32)), MAX_VOXELS)


def test_truncated_and_missing_files(tmp_path):
    good = write_nifti(tmp_path / "g.nii.gz", head_like((8, 8, 8)))
    raw = gzip.decompress(good.read_bytes())
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(ScanError, match=r"cannot read bad.nii.gz \(truncated or corrupt\?\)"):
        read_volume(bad, MAX_VOXELS)
    with pytest.raises(ScanError, match="file not found"):
        read_volume(tmp_path / "nope.nii", MAX_VOXELS)


def _landmark_world_ras(arr, meta):
    idx = np.unravel_index(np.argmax(arr[0]), arr.shape[1:])
    return (meta["affine"] @ np.array([*idx, 1.0]))[:3]


@pytest.mark.parametrize(
    "row_dir,col_dir",
    [((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0))],  # axial, sagittal
    ids=["axial", "sagittal"],
)
def test_dicom_series_geometry(tmp_path, row_dir, col_dir):
    vol = np.full((5, 6, 7), 11.0)  # (slices, rows, cols); odd values survive slope 2, intercept -5
    k, r, c = 3, 4, 2
    vol[k, r, c] = 501.0
    origin, ps, step = np.array([-10.0, -20.0, 30.0]), (0.9, 0.8), 2.5
    # files written in scrambled order: the reader must sort by position, not by file name
    write_dicom_series(tmp_path / "s", vol, row_dir, col_dir, ps, step, origin, file_order=[2, 0, 4, 1, 3])
    arr, meta = read_volume(tmp_path / "s", MAX_VOXELS)
    assert arr.shape == (1, 7, 6, 5)  # (cols, rows, slices)
    assert arr.max() == pytest.approx(501.0) and arr.min() == pytest.approx(11.0)  # rescale slope/intercept
    normal = np.cross(row_dir, col_dir)
    lps = origin + k * step * normal + c * ps[1] * np.array(row_dir) + r * ps[0] * np.array(col_dir)
    np.testing.assert_allclose(_landmark_world_ras(arr, meta), lps * [-1, -1, 1], atol=1e-4)
    assert meta["spacing"] == pytest.approx((0.8, 0.9, 2.5))


def test_dicom_mixed_series_rejected(tmp_path):
    vol = np.ones((3, 4, 4)) * 7
    write_dicom_series(tmp_path / "m", vol, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "other", vol, series_uid="1.2.3.2")
    for i, p in enumerate(sorted((tmp_path / "other").iterdir())):
        p.rename(tmp_path / "m" / f"x{i}.dcm")
    with pytest.raises(ScanError, match=r"mixes 2 DICOM series \(SeriesInstanceUID 1.2.3.1, 1.2.3.2\)"):
        read_volume(tmp_path / "m", MAX_VOXELS)


def test_dicom_missing_slice_rejected(tmp_path):
    paths = write_dicom_series(tmp_path / "g", np.ones((5, 4, 4)))
    paths[2].unlink()
    with pytest.raises(ScanError, match="missing slices \\(InstanceNumber jumps from 2 to 4\\)"):
        read_volume(tmp_path / "g", MAX_VOXELS)


def test_dicom_uneven_positions_rejected(tmp_path):
    import pydicom

    paths = write_dicom_series(tmp_path / "u", np.ones((5, 4, 4)), slice_step=2.0)
    ds = pydicom.dcmread(paths[4])
    ds.ImagePositionPatient = [-10.0, -20.0, 30.0 + 11.0]  # 3 mm further than the regular 8 mm
    ds.save_as(paths[4])
    with pytest.raises(ScanError, match=r"uneven slice positions \(gaps from 2.00 to 5.00 mm\)"):
        read_volume(tmp_path / "u", MAX_VOXELS)
