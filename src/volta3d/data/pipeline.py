"""The preprocessing pipeline of paper II-A for one scan, built from MONAI dictionary transforms.

channel-first array (from ``read_volume``) -> reorient to RAS -> resample to 1 mm isotropic
(image trilinear, mask nearest neighbour) -> [crop to the foreground box] -> crop/pad (or resize)
to the output cube -> scale intensities to [0, 1]. The image and its mask travel together in one
dict, so the mask always ends on exactly the image's grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from volta3d.config_rules import CHOICES, cube_error
from volta3d.data.io import ScanError, check_voxel_count
from volta3d.errors import InputError

# A stored cube with fewer voxels than this off its most common value is treated as constant.
MIN_VARYING_FRACTION = 1e-3
# Bump when the pipeline's output changes for the same settings, so old caches are recomputed.
PIPELINE_VERSION = 1
# Settings that change the output volume; the CSV column names do not.
OUTPUT_KEYS = (
    "size", "spacing", "orientation", "crop", "foreground_threshold", "resize",
    "intensity", "lower_percentile", "upper_percentile", "dtype",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PreprocessSettings:
    """The ``preprocess:`` config section as plain values (see default.yaml for each key)."""

    size: tuple[int, int, int]
    spacing: float
    orientation: str
    crop: str
    foreground_threshold: float
    resize: bool
    intensity: str
    lower_percentile: float
    upper_percentile: float
    dtype: str
    image_column: str
    label_path_column: str
    subject_column: str
    max_voxels: int  # a scan's declared and resampled grid; not an output setting

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        object.__setattr__(self, "size", size)
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"preprocess.size must be 3 positive integers, got {list(self.size)}")
        if isinstance(self.max_voxels, bool) or not isinstance(self.max_voxels, int) or self.max_voxels < 1:
            raise InputError(f"preprocess.max_voxels must be a positive integer, got {self.max_voxels!r}")
        too_big = cube_error(size, self.max_voxels)  # before any scan is read into it
        if too_big:
            raise InputError(too_big)
        if not self.spacing > 0:
            raise InputError(f"preprocess.spacing must be > 0 mm, got {self.spacing}")
        if len(self.orientation) != 3 or set(self.orientation.upper()) - set("RASLPI"):
            raise InputError(
                f"preprocess.orientation must be 3 axis codes such as RAS, got '{self.orientation}'"
            )
        for key in ("crop", "intensity", "dtype"):
            allowed = CHOICES[f"preprocess.{key}"]
            if getattr(self, key) not in allowed:
                raise InputError(
                    f"preprocess.{key} must be one of {', '.join(allowed)}, got '{getattr(self, key)}'"
                )
        if not 0 <= self.lower_percentile < self.upper_percentile <= 100:
            raise InputError(
                f"preprocess percentiles must satisfy 0 <= lower < upper <= 100, "
                f"got {self.lower_percentile}, {self.upper_percentile}"
            )

    def output_hash(self) -> str:
        """Hash of every setting that changes the output (plus the pipeline version)."""
        values = {k: asdict(self)[k] for k in OUTPUT_KEYS} | {"pipeline_version": PIPELINE_VERSION}
        values["size"] = list(values["size"])
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreprocessedScan:
    """One scan after ``preprocess_scan``: the network-ready image, its labels (if any) on the same
    grid, and that grid's affine (kept in the scan's cache record, so positions stay in world mm)."""

    image: np.ndarray  # (1, D, H, W) float32 in [0, 1]
    mask: np.ndarray | None  # (1, D, H, W) integer labels, same grid
    affine: np.ndarray  # (4, 4) voxel -> RAS world of the output grid


def _above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return x > threshold


def build_transform(settings: PreprocessSettings, with_mask: bool) -> Compose:
    """MONAI pipeline over keys ``image`` (+ ``mask``); inputs are MetaTensors carrying the affine."""
    keys = ["image", "mask"] if with_mask else ["image"]
    interp = ("bilinear", "nearest") if with_mask else ("bilinear",)
    steps: list[Any] = [
        Orientationd(keys=keys, axcodes=settings.orientation.upper(), labels=None),
        Spacingd(
            keys=keys,
            pixdim=(settings.spacing,) * 3,
            mode=interp,
            padding_mode="zeros",
            dtype=torch.float32,  # type: ignore[arg-type]  # MONAI takes torch dtypes; its hint lists numpy ones
        ),
    ]
    if settings.crop == "foreground":
        steps.append(
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=partial(_above, threshold=settings.foreground_threshold),
                allow_smaller=True,
            )
        )
    if settings.resize:
        resize_modes = ("trilinear", "nearest") if with_mask else ("trilinear",)
        steps.append(Resized(keys=keys, spatial_size=settings.size, mode=resize_modes))
    else:
        steps.append(ResizeWithPadOrCropd(keys=keys, spatial_size=settings.size))
    if settings.intensity == "percentile":
        steps.append(
            ScaleIntensityRangePercentilesd(
                keys="image",
                lower=settings.lower_percentile,
                upper=settings.upper_percentile,
                b_min=0.0,
                b_max=1.0,
                clip=True,
            )
        )
    else:
        steps.append(ScaleIntensityd(keys="image", minv=0.0, maxv=1.0))
    return Compose(steps)


def check_image_values(image: np.ndarray, name: str) -> None:
    """Reject NaN/Inf voxels and constant volumes before they turn into a silent all-zero cube."""
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise ScanError(f"{name}: {bad} voxels are NaN or Inf")
    lo, hi = float(image.min()), float(image.max())
    if hi - lo <= 0:
        raise ScanError(f"{name}: constant volume (every voxel = {lo:g}); nothing to learn from")


def check_mask(mask: np.ndarray, mask_meta: dict, image_shape: tuple, image_meta: dict, name: str) -> None:
    """The mask must be integer labels on exactly the image's voxel grid, forming a small set close to
    0..K: a binary mask saved as 0/255 would otherwise make segmentation infer 256 classes."""
    if mask.shape != image_shape:
        raise ScanError(f"{name}: label grid {mask.shape[1:]} does not match image grid {image_shape[1:]}")
    if not np.allclose(mask_meta["affine"], image_meta["affine"], atol=1e-3):
        raise ScanError(f"{name}: label affine differs from the image affine (label not on the image grid)")
    if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)) or mask.min() < 0:
        raise ScanError(f"{name}: label map must hold non-negative integer labels")
    labels = np.unique(mask).astype(np.int64)
    if labels.max() > 2 * len(labels):
        shown = ", ".join(str(v) for v in labels[:8]) + (
            f" (+{len(labels) - 8} more)" if len(labels) > 8 else ""
        )
        raise ScanError(
            f"{name}: label values {shown} are not a small contiguous set 0..K ({len(labels)} labels, the "
            f"largest {labels.max()}); relabel them 0, 1, ..., K (a binary mask saved as 0/255 becomes 0/1)"
        )


def check_stored_values(image: np.ndarray, dtype: str, name: str, input_range: tuple[float, float]) -> None:
    """After the cast to the stored dtype nearly every voxel must not hold one value: one voxel of
    1e30 scaled to [0, 1] leaves the rest below float16's smallest number, a cube of zeros."""
    stored = image.astype(dtype)
    values, counts = np.unique(stored, return_counts=True)
    varying = stored.size - int(counts.max())
    if varying < MIN_VARYING_FRACTION * stored.size:
        raise ScanError(
            f"{name}: only {varying} of {stored.size} voxels differ from the rest once scaled to [0, 1] and "
            f"stored as {dtype} (input range {input_range[0]:g} to {input_range[1]:g}: an extreme outlier?); "
            "preprocess.intensity=percentile ignores outliers"
        )


def check_resampled_size(
    shape: tuple[int, ...], spacing: tuple[float, ...], settings: PreprocessSettings, name: str
) -> None:
    """A 1e4 mm voxel resampled to 1 mm is a grid of terabytes: refuse it before resampling."""
    grid = tuple(max(1, int(np.ceil(n * s / settings.spacing))) for n, s in zip(shape, spacing, strict=True))
    check_voxel_count(grid, name, settings.max_voxels, what=f"resampled to {settings.spacing:g} mm would be")


def preprocess_scan(
    image: np.ndarray,
    meta: dict[str, Any],
    settings: PreprocessSettings,
    mask: np.ndarray | None = None,
    mask_meta: dict[str, Any] | None = None,
    name: str = "scan",
    mask_name: str = "mask",
) -> PreprocessedScan:
    """(1, X, Y, Z) at any spacing/orientation -> (1, *settings.size) RAS at ``settings.spacing`` mm.

    ``name`` / ``mask_name`` (file names) start every rejection reason about the image / the mask."""
    check_image_values(image, name)
    check_resampled_size(image.shape[1:], meta["spacing"], settings, name)
    if settings.crop == "foreground" and not np.any(image > settings.foreground_threshold):
        raise ScanError(f"{name}: no voxel above foreground_threshold={settings.foreground_threshold}")
    data = {"image": MetaTensor(torch.from_numpy(image), affine=torch.as_tensor(meta["affine"]))}
    if mask is not None:
        check_mask(mask, mask_meta or {}, image.shape, meta, mask_name)
        data["mask"] = MetaTensor(
            torch.from_numpy(mask.astype(np.float32)), affine=torch.as_tensor(meta["affine"])
        )
    out = build_transform(settings, with_mask=mask is not None)(data)
    image_out = out["image"].as_tensor().numpy().astype(np.float32)
    if float(image_out.max() - image_out.min()) <= 0:
        raise ScanError(
            f"{name}: volume is constant after cropping to {list(settings.size)} (nothing left in the cube)"
        )
    check_stored_values(image_out, settings.dtype, name, (float(image.min()), float(image.max())))
    mask_out = None
    if mask is not None:
        mask_out = np.rint(out["mask"].as_tensor().numpy()).astype(np.int64)
    return PreprocessedScan(image_out, mask_out, out["image"].affine.numpy().astype(np.float64))
