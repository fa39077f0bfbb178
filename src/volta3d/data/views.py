"""3D multi-crop views for VolTA-3D pretraining: 2 global + n local random resized crops per volume.

The teacher sees the clean global views, the student sees GMML-corrupted copies of them plus the
clean local crops (MC-SSL: local crops are never masked). Every random choice is derived from one
integer seed, so a sample is reproducible whatever the DataLoader worker count or order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
)
from monai.utils import convert_to_tensor
from torch import Tensor

from volta3d.data.masking import GMMLMasker

N_GLOBAL = 2  # DINO / paper II-B: two global views, each the teacher's target for the other views


def _check_range(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not low < lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} < min <= max <= {high}, got [{lo}, {hi}]")
    return lo, hi


def _check_prob(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class ViewSettings:
    """The ``views:`` config section, checked: crop sizes and scales, flips and intensity changes.

    Each crop: random resized 3D crop (edge fraction from the scale range, per-axis aspect jitter,
    uniform position, trilinear resize to a cube), random flip per axis of ``flip_axes``, then
    MRI-plausible intensity changes (gamma, scale/shift, smooth bias field, Gaussian noise) and a clamp
    back to [0, 1].

    The scales are fractions of each *edge* of the volume. DINO's 2D scales are area fractions, and a
    volume fraction s in 3D gives edges of s^(1/3): DINO's 0.4-1 read as a volume fraction makes two
    global crops of a 64^3 volume overlap by a median 96 %. An edge fraction says what it means; DINO's
    area ranges become edge ranges by a square root (3DINO states its scales in-plane for this reason). On RAS volumes axis 0 runs left to right: ``flip_axes=(0,)`` flips left-right only,
    as DINO and MC-SSL flip images horizontally only (up-down and front-back flips ask for invariances
    larger than the differences between brains).
    """

    global_size: int
    local_size: int
    n_local: int
    global_edge_scale: Sequence[float]
    local_edge_scale: Sequence[float]
    aspect_range: Sequence[float]
    flip_prob: float
    flip_axes: Sequence[int]
    gamma_prob: float
    gamma_range: Sequence[float]
    contrast_prob: float
    intensity_scale: float
    intensity_shift: float
    noise_prob: float
    noise_std: float
    bias_field_prob: float
    bias_field_coeff: float

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            size = getattr(self, name)
            if int(size) != size or size < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {size}")
        if int(self.n_local) != self.n_local or self.n_local < 0:
            raise ValueError(f"n_local must be an integer >= 0, got {self.n_local}")
        for name in ("noise_std", "bias_field_coeff", "intensity_scale", "intensity_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("flip_prob", "gamma_prob", "contrast_prob", "noise_prob", "bias_field_prob"):
            _check_prob(name, getattr(self, name))
        axes = list(self.flip_axes)
        if not set(axes) <= {0, 1, 2} or len(set(axes)) != len(axes):
            raise ValueError(f"flip_axes must be distinct spatial axes among 0, 1, 2, got {axes}")
        fixed = {
            "global_size": int(self.global_size), "local_size": int(self.local_size), "n_local": int(self.n_local),
            "global_edge_scale": _check_range("global_edge_scale", self.global_edge_scale, 0.0, 1.0),
            "local_edge_scale": _check_range("local_edge_scale", self.local_edge_scale, 0.0, 1.0),
            "aspect_range": _check_range("aspect_range", self.aspect_range, 0.0, math.inf),
            "gamma_range": _check_range("gamma_range", self.gamma_range, 0.0, math.inf),
            "flip_axes": tuple(int(a) for a in axes),
        }  # fmt: skip
        for name, value in fixed.items():
            object.__setattr__(self, name, value)

    @property
    def n_views(self) -> int:
        return N_GLOBAL + self.n_local

    def crop_shape(
        self, spatial: Sequence[int], rng: np.random.Generator, scale: Sequence[float]
    ) -> list[int]:
        """Random crop edges: edge fraction ~ U(scale), per-axis aspect jitter from aspect_range.

        Per-axis log-factors are uniform on [log lo, log hi] / 2 and centered, so they multiply to 1
        (the crop keeps the drawn edge fraction as its geometric-mean edge unless an edge is clipped to
        the volume) and any two relative edges differ by at most sqrt(hi / lo), i.e. by hi for a range
        like torchvision's (lo = 1 / hi) ratio.
        """
        fraction = rng.uniform(scale[0], scale[1])
        low, high = (0.5 * math.log(r) for r in self.aspect_range)
        log_aspect = rng.uniform(low, high, size=3)
        log_aspect -= log_aspect.mean()
        edge_scale = fraction * np.exp(log_aspect)
        return [int(min(max(round(s * e), 1), s)) for s, e in zip(spatial, edge_scale, strict=True)]

    def check_masker(self, masker: GMMLMasker | None) -> None:
        """The GMML token mask follows the patch grid, so the global crops must tile into patches."""
        if masker is not None and self.global_size % masker.patch_size:
            raise ValueError(
                f"global_size {self.global_size} must be a multiple of the patch size {masker.patch_size}"
            )

    def crop_start(self, spatial: Sequence[int], size: Sequence[int], seed: int) -> list[int]:
        """Uniform crop corner, drawn exactly as MONAI's RandSpatialCrop(random_center=True) seeded with
        ``seed`` draws it (``monai.data.utils.get_random_patch``), so both view paths cut the same box."""
        state = np.random.RandomState(int(seed))
        return [int(state.randint(0, d - r + 1)) if d > r else 0 for d, r in zip(spatial, size, strict=True)]


def crop_seeds(seed: int, n_views: int) -> list[np.ndarray]:
    """One independent child seed per crop: [crop shape, crop position, augmentation chain, GMML mask]."""
    return [child.generate_state(4) for child in np.random.SeedSequence(seed).spawn(n_views)]


class MultiCropViews:
    """The per-volume reference path: the crops of one volume built with MONAI's array transforms.

    Training builds views as a batch on its device (``volta3d.data.batched_views``); this path is the
    reference the batched one is tested and benchmarked against. It draws the same crop boxes from the
    same seeds; flips and intensity changes come from MONAI's own random streams, with the same
    distributions.
    """

    def __init__(self, masker: GMMLMasker | None = None, **settings: Any) -> None:
        self.settings = ViewSettings(**settings)
        s = self.settings
        s.check_masker(masker)
        self.masker = masker
        flip = [RandFlip(prob=s.flip_prob, spatial_axis=axis) for axis in s.flip_axes]
        intensity = [
            RandAdjustContrast(prob=s.gamma_prob, gamma=s.gamma_range),
            RandScaleIntensity(factors=float(s.intensity_scale), prob=s.contrast_prob),
            RandShiftIntensity(offsets=float(s.intensity_shift), prob=s.contrast_prob),
            RandBiasField(
                coeff_range=(-float(s.bias_field_coeff), float(s.bias_field_coeff)), prob=s.bias_field_prob
            ),
            RandGaussianNoise(prob=s.noise_prob, std=float(s.noise_std)),
        ]
        self._global_tf = Compose([Resize((s.global_size,) * 3, mode="trilinear"), *flip, *intensity])
        self._local_tf = Compose([Resize((s.local_size,) * 3, mode="trilinear"), *flip, *intensity])

    def __call__(self, volume: Tensor, seed: int) -> dict[str, Tensor]:
        """volume (C, D, H, W) in [0, 1] -> dict of crops; same seed, same views.

        "global" (2, C, G, G, G), "local" (n_local, C, L, L, L); with a masker also
        "global_masked" (2, C, G, G, G), "voxel_mask" (2, 1, G, G, G) bool, "token_mask" (2, N) bool.
        """
        if volume.dim() != 4:
            raise ValueError(f"volume must be (C, D, H, W), got shape {tuple(volume.shape)}")
        s = self.settings
        volume = torch.as_tensor(volume).float()
        seeds = crop_seeds(seed, s.n_views)
        global_views = [self._crop(volume, c, s.global_edge_scale, self._global_tf) for c in seeds[:N_GLOBAL]]
        local_views = [self._crop(volume, c, s.local_edge_scale, self._local_tf) for c in seeds[N_GLOBAL:]]
        empty_local = torch.zeros((0, volume.shape[0], *(s.local_size,) * 3))
        out = {
            "global": torch.stack(global_views),  # 2 x (C, G, G, G) -> (2, C, G, G, G)
            "local": torch.stack(local_views) if local_views else empty_local,  # (n_local, C, L, L, L)
        }
        if self.masker is not None:
            masked = [
                self.masker(view, torch.Generator().manual_seed(int(c[3])))
                for view, c in zip(global_views, seeds[:N_GLOBAL], strict=True)
            ]
            out["global_masked"] = torch.stack([m[0] for m in masked])  # (2, C, G, G, G)
            out["voxel_mask"] = torch.stack([m[1] for m in masked])  # (2, 1, G, G, G)
            out["token_mask"] = torch.stack([m[2] for m in masked])  # (2, N)
        return out

    def _crop(self, volume: Tensor, seeds: np.ndarray, scale: Sequence[float], chain: Compose) -> Tensor:
        """(C, D, H, W) -> (C, S, S, S): crop, resize, flip, intensity changes, clamp to [0, 1]."""
        roi = self.settings.crop_shape(volume.shape[1:], np.random.default_rng(int(seeds[0])), scale)
        crop = RandSpatialCrop(roi_size=roi, random_center=True, random_size=False)
        crop.set_random_state(seed=int(seeds[1]))
        chain.set_random_state(seed=int(seeds[2]))
        view = chain(crop(volume))
        return convert_to_tensor(view, dtype=torch.float32, track_meta=False).clamp_(0.0, 1.0)
