"""3D multi-crop views for VolTA-3D pretraining: 2 global + n local random resized crops per volume.

The teacher sees the clean global views, the student sees GMML-corrupted copies of them plus the
clean local crops (MC-SSL: local crops are never masked). Every random choice is derived from one
integer seed, so a sample is reproducible whatever the DataLoader worker count or order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
from torch.utils.data import Dataset

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


class MultiCropViews:
    """Build the 2 global + n_local crops of one volume, plus the GMML-masked global views.

    Each crop: random resized 3D crop (volume fraction from the scale range, per-axis aspect jitter,
    uniform position, trilinear resize to a cube), random flip per axis of ``flip_axes``, then
    MRI-plausible intensity changes (gamma, scale/shift, smooth bias field, Gaussian noise) and a clamp
    back to [0, 1]. On RAS volumes axis 0 runs left to right: ``flip_axes=(0,)`` flips left-right only,
    as DINO and MC-SSL flip images horizontally only (up-down and front-back flips ask for invariances
    larger than the differences between brains).
    """

    def __init__(
        self,
        global_size: int = 96,
        local_size: int = 48,
        n_local: int = 8,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        aspect_range: Sequence[float] = (0.9, 1.0 / 0.9),
        flip_prob: float = 0.5,
        flip_axes: Sequence[int] = (0, 1, 2),
        gamma_prob: float = 0.5,
        gamma_range: Sequence[float] = (0.7, 1.5),
        contrast_prob: float = 0.5,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        noise_prob: float = 0.2,
        noise_std: float = 0.02,
        bias_field_prob: float = 0.3,
        bias_field_coeff: float = 0.3,
        masker: GMMLMasker | None = None,
    ) -> None:
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if int(size) != size or size < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {size}")
        if int(n_local) != n_local or n_local < 0:
            raise ValueError(f"n_local must be an integer >= 0, got {n_local}")
        if masker is not None and global_size % masker.patch_size:
            raise ValueError(f"global_size {global_size} must be a multiple of the patch size {masker.patch_size}")
        for name, value in (("noise_std", noise_std), ("bias_field_coeff", bias_field_coeff),
                            ("intensity_scale", intensity_scale), ("intensity_shift", intensity_shift)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = _check_range("global_scale", global_scale, 0.0, 1.0)
        self.local_scale = _check_range("local_scale", local_scale, 0.0, 1.0)
        self.aspect_range = _check_range("aspect_range", aspect_range, 0.0, math.inf)
        gamma = _check_range("gamma_range", gamma_range, 0.0, math.inf)
        self.masker = masker
        if not set(flip_axes) <= {0, 1, 2} or len(set(flip_axes)) != len(flip_axes):
            raise ValueError(f"flip_axes must be distinct spatial axes among 0, 1, 2, got {list(flip_axes)}")
        self.flip_axes = tuple(int(a) for a in flip_axes)
        flip = [RandFlip(prob=_check_prob("flip_prob", flip_prob), spatial_axis=axis) for axis in self.flip_axes]
        contrast_prob = _check_prob("contrast_prob", contrast_prob)
        intensity = [
            RandAdjustContrast(prob=_check_prob("gamma_prob", gamma_prob), gamma=gamma),
            RandScaleIntensity(factors=float(intensity_scale), prob=contrast_prob),
            RandShiftIntensity(offsets=float(intensity_shift), prob=contrast_prob),
            RandBiasField(coeff_range=(0.0, float(bias_field_coeff)), prob=_check_prob("bias_field_prob", bias_field_prob)),
            RandGaussianNoise(prob=_check_prob("noise_prob", noise_prob), std=float(noise_std)),
        ]
        self._global_tf = Compose([Resize((self.global_size,) * 3, mode="trilinear"), *flip, *intensity])
        self._local_tf = Compose([Resize((self.local_size,) * 3, mode="trilinear"), *flip, *intensity])

    def __call__(self, volume: Tensor, seed: int) -> dict[str, Tensor]:
        """volume (C, D, H, W) in [0, 1] -> dict of crops (see module docstring); same seed, same views.

        "global" (2, C, G, G, G), "local" (n_local, C, L, L, L); with a masker also
        "global_masked" (2, C, G, G, G), "voxel_mask" (2, 1, G, G, G) bool, "token_mask" (2, N) bool.
        """
        if volume.dim() != 4:
            raise ValueError(f"volume must be (C, D, H, W), got shape {tuple(volume.shape)}")
        volume = torch.as_tensor(volume).float()
        # one independent child seed per crop: [crop shape, crop position, augmentation chain, GMML mask]
        crop_seeds = [child.generate_state(4) for child in np.random.SeedSequence(seed).spawn(N_GLOBAL + self.n_local)]
        global_views = [
            self._crop(volume, s, self.global_scale, self._global_tf) for s in crop_seeds[:N_GLOBAL]
        ]
        local_views = [
            self._crop(volume, s, self.local_scale, self._local_tf) for s in crop_seeds[N_GLOBAL:]
        ]
        empty_local = torch.zeros((0, volume.shape[0], *(self.local_size,) * 3))
        out = {
            "global": torch.stack(global_views),  # 2 x (C, G, G, G) -> (2, C, G, G, G)
            "local": torch.stack(local_views) if local_views else empty_local,  # (n_local, C, L, L, L)
        }
        if self.masker is not None:
            masked = [
                self.masker(view, torch.Generator().manual_seed(int(s[3])))
                for view, s in zip(global_views, crop_seeds[:N_GLOBAL], strict=True)
            ]
            out["global_masked"] = torch.stack([m[0] for m in masked])  # (2, C, G, G, G)
            out["voxel_mask"] = torch.stack([m[1] for m in masked])  # (2, 1, G, G, G)
            out["token_mask"] = torch.stack([m[2] for m in masked])  # (2, N)
        return out

    def crop_shape(self, spatial: Sequence[int], rng: np.random.Generator, scale: tuple[float, float]) -> list[int]:
        """Random crop edges: volume fraction ~ U(scale), per-axis aspect jitter from aspect_range.

        Per-axis log-factors are uniform on [log lo, log hi] / 2 and centred, so they multiply to 1
        (the crop keeps the drawn volume fraction unless an edge is clipped to the volume) and any two
        relative edges differ by at most sqrt(hi / lo), i.e. by hi for a range like torchvision's
        (lo = 1 / hi) ratio.
        """
        fraction = rng.uniform(*scale)
        half_logs = [0.5 * math.log(r) for r in self.aspect_range]
        log_aspect = rng.uniform(*half_logs, size=3)
        log_aspect -= log_aspect.mean()
        edge_scale = fraction ** (1.0 / 3.0) * np.exp(log_aspect)
        return [int(min(max(round(s * e), 1), s)) for s, e in zip(spatial, edge_scale, strict=True)]

    def _crop(self, volume: Tensor, seeds: np.ndarray, scale: tuple[float, float], chain: Compose) -> Tensor:
        """(C, D, H, W) -> (C, S, S, S): crop, resize, flip, intensity changes, clamp to [0, 1]."""
        roi = self.crop_shape(volume.shape[1:], np.random.default_rng(int(seeds[0])), scale)
        crop = RandSpatialCrop(roi_size=roi, random_center=True, random_size=False)
        crop.set_random_state(seed=int(seeds[1]))
        chain.set_random_state(seed=int(seeds[2]))
        view = chain(crop(volume))
        return convert_to_tensor(view, dtype=torch.float32, track_meta=False).clamp_(0.0, 1.0)


def build_views(views_section: Mapping[str, Any], masking_section: Mapping[str, Any], patch_size: int) -> MultiCropViews:
    """Config sections `views:` and `masking:` (plain dicts) -> MultiCropViews with a GMML masker."""
    masker = GMMLMasker(**dict(masking_section), patch_size=patch_size)
    return MultiCropViews(**dict(views_section), masker=masker)


class PretrainViewsDataset(Dataset):
    """Wrap a dataset of {"image": (1, D, H, W)} items into multi-crop view dicts plus "index".

    Item i at epoch e is built with the seed derived from (base_seed, e, i), so it does not depend
    on worker count or access order. The epoch sits in shared memory, so persistent DataLoader
    workers see ``set_epoch`` too (call it before iterating the loader for that epoch).
    """

    def __init__(self, base: Dataset, views: MultiCropViews, base_seed: int = 0) -> None:
        if base_seed < 0:
            raise ValueError(f"base_seed must be >= 0, got {base_seed}")
        self.base = base
        self.views = views
        self.base_seed = int(base_seed)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def item_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.base_seed, self.epoch, int(index)]).generate_state(1)[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.base[index]
        out = self.views(item["image"], seed=self.item_seed(index))
        out["index"] = torch.tensor(int(index))
        return out


def collate_views(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack a list of view dicts view-major, so each crop size is one batched forward.

    "global" (2, B, C, G, G, G), "local" (n_local, B, C, L, L, L), "global_masked" (2, B, C, G, G, G),
    "voxel_mask" (2, B, 1, G, G, G), "token_mask" (2, B, N), "index" (B,). The model reshapes
    (V, B, ...) -> (V * B, ...): crops are grouped by their full 3D shape (pitfall 10).
    """
    if not items:
        raise ValueError("collate_views got an empty list of items")
    batch = {key: torch.stack([it[key] for it in items], dim=1) for key in items[0] if key != "index"}
    batch["index"] = torch.stack([torch.as_tensor(it["index"]) for it in items])
    return batch
