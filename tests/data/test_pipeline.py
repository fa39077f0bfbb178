"""preprocess_scan: RAS + 1 mm + cube + [0, 1], masks on the image grid, value checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from volta3d.data.io import ScanError, make_meta
from volta3d.data.pipeline import PreprocessSettings, preprocess_scan

from ..config_kwargs import kwargs_for
from .scan_factory import head_like

# Non-RAS, anisotropic: file axes run (anterior->posterior at 2 mm, inferior->superior at 1.5 mm,
# left->right at 3 mm), like IXI's P-S-R storage.
AFFINE = np.array([[0, 0, 3.0, -15.0], [-2.0, 0, 0, 12.0], [0, 1.5, 0, -9.0], [0, 0, 0, 1]])


def test_reorient_resample_landmark():
    shape = (12, 14, 10)
    image = np.zeros((1, *shape), np.float32)
    image[0, 3:8, 4:10, 2:7] = 10.0  # body
    landmark = (5, 9, 6)
    image[0, landmark[0], landmark[1], landmark[2]] = 100.0
    out = preprocess_scan(
        image,
        make_meta(AFFINE),
        PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(40, 40, 40))),
    )
    assert out.image.shape == (1, 40, 40, 40) and out.image.dtype == np.float32
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.affine[:3, :3], np.eye(3), atol=1e-5)  # 1 mm isotropic, RAS
    assert out.image.min() == pytest.approx(0.0) and out.image.max() == pytest.approx(1.0)
    expected_world = (AFFINE @ np.array([*landmark, 1.0]))[:3]
    peak = np.unravel_index(np.argmax(out.image[0]), out.image.shape[1:])
    found_world = (out.affine @ np.array([*peak, 1.0]))[:3]
    assert np.linalg.norm(found_world - expected_world) <= 1.0  # within one output voxel


def test_mask_follows_image_with_nearest_labels():
    shape = (12, 14, 10)
    mask = np.zeros((1, *shape), np.float32)
    mask[0, 2:6, 3:9, 2:5] = 1
    mask[0, 6:10, 3:9, 5:8] = 2
    image = (mask * 40 + 5).astype(np.float32)
    meta = make_meta(AFFINE)
    out = preprocess_scan(
        image,
        meta,
        PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(32, 32, 32))),
        mask,
        meta,
    )
    assert out.mask.shape == out.image.shape and out.mask.dtype == np.int64
    assert set(np.unique(out.mask)) == {0, 1, 2}  # nearest neighbour: no blended labels
    # each label's center lands at the same world position as in the input (mm)
    for label in (1, 2):
        center_in = AFFINE @ np.array([*np.argwhere(mask[0] == label).mean(0), 1.0])
        center_out = out.affine @ np.array([*np.argwhere(out.mask[0] == label).mean(0), 1.0])
        assert np.linalg.norm(center_out - center_in) < 1.0
    # and the image intensities stayed with them: label 2 voxels are the bright ones
    assert out.image[0][out.mask[0] == 2].mean() > 0.85 > 0.6 > out.image[0][out.mask[0] == 1].mean()
    # label volumes scale with the voxel volume (2 * 1.5 * 3 = 9 mm^3 per input voxel)
    assert (out.mask == 1).sum() == pytest.approx(4 * 6 * 3 * 9, rel=0.2)


def test_center_crop_vs_foreground_crop():
    image = np.zeros((1, 60, 60, 60), np.float32)
    image[0, 2:10, 2:10, 2:10] = 1.0 + np.arange(8)[:, None, None]  # object in a corner
    meta = make_meta(np.eye(4))
    with pytest.raises(ScanError, match="constant after cropping"):
        preprocess_scan(
            image, meta, PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16)))
        )
    out = preprocess_scan(
        image,
        meta,
        PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16), crop="foreground")
        ),
    )
    assert (out.image > 0).sum() == 8 * 8 * 8  # the whole 8^3 object, padded to 16^3
    resized = preprocess_scan(
        image,
        meta,
        PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16), crop="foreground", resize=True)
        ),
    )
    assert (resized.image > 0).mean() > 0.9  # resized to fill the cube


def test_percentile_scaling_clips_outliers():
    image = head_like((16, 16, 16))[None]
    image[0, 8, 8, 8] = 1e6  # a hot voxel would squash every other intensity under min-max
    meta = make_meta(np.eye(4))
    pct = preprocess_scan(
        image,
        meta,
        PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16), intensity="percentile")
        ),
    )
    mm = preprocess_scan(
        image, meta, PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(16, 16, 16)))
    )
    assert pct.image.min() >= 0 and pct.image.max() <= 1
    brain = image[0] > 0
    assert np.median(pct.image[0][brain]) > 0.3 > 0.001 > np.median(mm.image[0][brain])


@pytest.mark.parametrize(
    "values,reason",
    [(np.nan, "1 voxels are NaN or Inf"), (np.inf, "1 voxels are NaN or Inf")],
)
def test_non_finite_rejected(values, reason):
    image = head_like((8, 8, 8))[None]
    image[0, 1, 1, 1] = values
    with pytest.raises(ScanError, match=reason):
        preprocess_scan(
            image,
            make_meta(np.eye(4)),
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(8, 8, 8))),
        )


def test_constant_volume_rejected():
    with pytest.raises(ScanError, match=r"constant volume \(every voxel = 0\)"):
        preprocess_scan(
            np.zeros((1, 8, 8, 8), np.float32),
            make_meta(np.eye(4)),
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess")),
        )


def test_mask_grid_mismatch_rejected():
    image = head_like((8, 8, 8))[None]
    meta = make_meta(np.eye(4))
    with pytest.raises(ScanError, match=r"label grid \(8, 8, 7\) does not match image grid \(8, 8, 8\)"):
        preprocess_scan(
            image,
            meta,
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess")),
            np.zeros((1, 8, 8, 7), np.float32),
            meta,
        )
    shifted = make_meta(np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ScanError, match="label affine differs from the image affine"):
        preprocess_scan(
            image,
            meta,
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess")),
            np.zeros_like(image),
            shifted,
        )
    with pytest.raises(ScanError, match="non-negative integer labels"):
        preprocess_scan(
            image,
            meta,
            PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess")),
            np.full_like(image, 0.5),
            meta,
        )


def test_settings_validation_and_hash():
    with pytest.raises(ValueError, match="preprocess.crop must be one of center, foreground, got 'middle'"):
        PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", crop="middle"))
    with pytest.raises(ValueError, match="preprocess.size must be 3 positive integers"):
        PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=(32, 32)))
    base = PreprocessSettings(**kwargs_for(PreprocessSettings, "preprocess", size=[32, 32, 32]))
    assert (
        base.output_hash()
        == PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(32, 32, 32), image_column="t1")
        ).output_hash()
    )
    assert (
        base.output_hash()
        != PreprocessSettings(
            **kwargs_for(PreprocessSettings, "preprocess", size=(32, 32, 32), dtype="float32")
        ).output_hash()
    )
