"""3D multi-crop views built as a batch on the training device, with tensor operations.

The DataLoader only reads cached volumes and draws each crop's parameters from the item's seed
(``BatchedMultiCrop.draw``: a few numbers per crop). ``BatchedMultiCrop.__call__`` then builds all
crops of a batch at once on the device the model trains on (CPU or CUDA):

- random resized crops: each box cut as a view and resized with the trilinear ``interpolate`` that
  MONAI's ``Resize`` calls, then flipped;
- MONAI's intensity changes (``AdjustContrast`` gamma, ``ScaleIntensity`` / ``ShiftIntensity``,
  ``RandBiasField``'s Legendre-polynomial field, ``RandGaussianNoise`` with its std drawn from
  U(0, std)) as batched tensor arithmetic, in MONAI's order, then a clamp to [0, 1];
- GMML masks for the global views with ``GMMLMasker.mask_batch``.

Crop boxes are drawn from the same seeds as the per-volume reference path
(``volta3d.data.views.MultiCropViews``), so both cut the same box; everything else is drawn from the
crop's own seed, so a view depends only on (seed, epoch, index), never on the batch it is built in or
on the number of DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from volta3d.data.masking import GMMLMasker
from volta3d.data.views import N_GLOBAL, ViewSettings, crop_seeds

BIAS_DEGREE = 3  # MONAI RandBiasField's default degree
# (i, j, k) with i + j + k <= degree: the Legendre terms of MONAI's 3D bias field, in its order
BIAS_TERMS = [(i, j, k) for i in range(BIAS_DEGREE + 1) for j in range(BIAS_DEGREE + 1 - i)
              for k in range(BIAS_DEGREE + 1 - i - j)]  # fmt: skip
GAMMA_EPSILON = 1e-7  # MONAI AdjustContrast
PARAM_KEYS = ("crop_start", "crop_size", "flip", "gamma_on", "gamma", "scale", "shift", "bias_on", "bias_coeff",
              "noise_std", "noise_seed", "mask_seed")  # fmt: skip


class BatchedMultiCrop:
    """The 2 global + n_local crops of every volume of a batch, plus the GMML-masked global views.

    ``draw`` runs per item in the DataLoader (cheap, NumPy); ``__call__`` runs on the batch on the
    training device and returns the view-major dict the model consumes: "global" (2, B, C, G, G, G),
    "local" (n_local, B, C, L, L, L), "index" (B,); with a masker also "global_masked"
    (2, B, C, G, G, G), "voxel_mask" (2, B, 1, G, G, G) bool and "token_mask" (2, B, N) bool.
    """

    def __init__(self, settings: ViewSettings, masker: GMMLMasker | None = None) -> None:
        settings.check_masker(masker)
        self.settings = settings
        self.masker = masker

    def draw(self, spatial: Sequence[int], seed: int) -> dict[str, Tensor]:
        """Parameters of every crop of one volume of shape ``spatial``: tensors with a leading (V,) axis."""
        s = self.settings
        seeds = crop_seeds(seed, s.n_views)
        rows = [self._draw_crop(spatial, c, s.global_edge_scale if v < N_GLOBAL else s.local_edge_scale)
                for v, c in enumerate(seeds)]  # fmt: skip
        return {key: torch.as_tensor(np.stack([r[key] for r in rows])) for key in PARAM_KEYS}

    def _draw_crop(self, spatial: Sequence[int], seeds: np.ndarray, scale: Sequence[float]) -> dict[str, Any]:
        """One crop: its box from seeds 0-1 (as the reference path), flips and intensity changes from
        seed 2, the GMML mask seed 3. Every value is always drawn, so the stream never depends on which
        changes happen."""
        s = self.settings
        size = s.crop_shape(spatial, np.random.default_rng(int(seeds[0])), scale)
        rng = np.random.default_rng(int(seeds[2]))
        flip = np.zeros(3, dtype=bool)
        flip[list(s.flip_axes)] = rng.random(len(s.flip_axes)) < s.flip_prob
        gamma_on, gamma = rng.random() < s.gamma_prob, rng.uniform(s.gamma_range[0], s.gamma_range[1])
        scale_on, factor = rng.random() < s.contrast_prob, rng.uniform(-s.intensity_scale, s.intensity_scale)
        shift_on, offset = rng.random() < s.contrast_prob, rng.uniform(-s.intensity_shift, s.intensity_shift)
        bias_on = rng.random() < s.bias_field_prob
        coeff = rng.uniform(-s.bias_field_coeff, s.bias_field_coeff, len(BIAS_TERMS))
        noise_on, std = rng.random() < s.noise_prob, rng.uniform(0.0, s.noise_std)
        return {
            "crop_start": np.array(s.crop_start(spatial, size, int(seeds[1])), dtype=np.int64),
            "crop_size": np.array(size, dtype=np.int64), "flip": flip,
            "gamma_on": np.bool_(gamma_on), "gamma": np.float32(gamma),
            "scale": np.float32(1.0 + factor if scale_on else 1.0), "shift": np.float32(offset if shift_on else 0.0),
            "bias_on": np.bool_(bias_on), "bias_coeff": coeff.astype(np.float32) * bias_on,
            "noise_std": np.float32(std if noise_on else 0.0), "noise_seed": np.int64(rng.integers(2**62)),
            "mask_seed": np.int64(seeds[3]),
        }  # fmt: skip

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """A collated batch of ``PretrainVolumesDataset`` items, on the device -> the views (class docstring)."""
        # B x (C, D, H, W): one tensor, or a list when the volumes' sizes differ
        volumes = [v.float() for v in batch["image"]]
        if any(v.dim() != 4 for v in volumes):
            raise ValueError(
                f"batch['image'] must hold (C, D, H, W) volumes, got {[tuple(v.shape) for v in volumes]}"
            )
        s = self.settings
        params = {key: batch[key].transpose(0, 1) for key in PARAM_KEYS}  # (B, V, ...) -> (V, B, ...)
        out = {
            "global": self._crops(volumes, {k: v[:N_GLOBAL] for k, v in params.items()}, s.global_size),
            "local": self._crops(volumes, {k: v[N_GLOBAL:] for k, v in params.items()}, s.local_size),
            "index": batch["index"],
        }
        out.update(view_overlaps(params["crop_start"], params["crop_size"]))
        if self.masker is not None:
            views = out["global"]  # (2, B, C, G, G, G)
            seeds = params["mask_seed"][:N_GLOBAL].reshape(-1).tolist()
            masked = self.masker.mask_batch(views.flatten(0, 1), seeds)
            for key, value in zip(("global_masked", "voxel_mask", "token_mask"), masked, strict=True):
                out[key] = value.unflatten(0, views.shape[:2])
        return out

    def _crops(self, volumes: Sequence[Tensor], params: Mapping[str, Tensor], size: int) -> Tensor:
        """B x (C, D, H, W) and (V, B, ...) parameters -> (V, B, C, S, S, S) augmented crops in [0, 1]."""
        n_views, n_volumes, channels = params["crop_start"].shape[0], len(volumes), volumes[0].shape[0]
        if n_views == 0:
            return volumes[0].new_zeros((0, n_volumes, channels, size, size, size))
        crops = resample_boxes(volumes, params["crop_start"], params["crop_size"], params["flip"], size)
        flat = {key: value.flatten(0, 1) for key, value in params.items()}  # (V * B, ...)
        augmented = augment_intensity(crops.flatten(0, 1), flat).clamp_(0.0, 1.0)
        return augmented.unflatten(0, (n_views, n_volumes))


def _intersection(start_a: Tensor, size_a: Tensor, start_b: Tensor, size_b: Tensor) -> Tensor:
    """Voxels shared by boxes a and b: (..., 3) corners and edges -> (...)."""
    low = torch.maximum(start_a, start_b)
    high = torch.minimum(start_a + size_a, start_b + size_b)
    return (high - low).clamp_min(0).prod(dim=-1).double()


def view_overlaps(start: Tensor, size: Tensor) -> dict[str, Tensor]:
    """How much the views of each volume share, from their (V, B, 3) boxes in the volume's voxels.

    ``view_global_overlap``: intersection over union of the two global crops (1: the same box);
    ``view_local_in_global``: the share of a local crop inside the global crop that holds most of it.
    Medians over the batch (NaN without local crops). Near 1, the cross-view prediction is close to the
    identity map, which is what made the volume-fraction crop scales a weak task (docs/method.md, "Views")."""
    volume = size.prod(dim=-1).double()  # (V, B)
    shared = _intersection(start[0], size[0], start[1], size[1])  # (B,)
    overlap = shared / (volume[0] + volume[1] - shared)
    local = [_intersection(start[N_GLOBAL:], size[N_GLOBAL:], start[g], size[g]) for g in range(N_GLOBAL)]
    inside = (
        torch.maximum(*local) / volume[N_GLOBAL:]
        if start.shape[0] > N_GLOBAL
        else overlap.new_full((1,), math.nan)
    )
    return {
        "view_global_overlap": overlap.quantile(0.5),
        "view_local_in_global": inside.flatten().quantile(0.5),
    }


def resample_boxes(volumes: Sequence[Tensor], start: Tensor, size: Tensor, flip: Tensor, out: int) -> Tensor:
    """B x (C, D, H, W) volumes and (V, B, 3) boxes and flips -> (V, B, C, out, out, out) crops.

    Each box is cut as a view and resized with ``interpolate(mode="trilinear", align_corners=False)``,
    the call inside MONAI's ``Resize``, so the voxels equal the reference path's. One call per crop:
    on a CPU that was faster than one batched ``grid_sample`` or three batched separable matmuls over
    the whole batch, which read every voxel of the volume for every crop (docs/performance.md, "Performance")."""
    n_views, n_volumes = start.shape[:2]
    crops = volumes[0].new_empty((n_views, n_volumes, volumes[0].shape[0], out, out, out))
    boxes = torch.cat([start, start + size], dim=-1).tolist()  # one transfer: (V, B, 6) corners
    flips = flip.tolist()
    for v in range(n_views):
        for b in range(n_volumes):
            d0, h0, w0, d1, h1, w1 = boxes[v][b]
            box = volumes[b][None, :, d0:d1, h0:h1, w0:w1]
            crop = torch.nn.functional.interpolate(
                box, size=(out,) * 3, mode="trilinear", align_corners=False
            )[0]
            axes = [1 + a for a in range(3) if flips[v][b][a]]
            crops[v, b] = crop.flip(axes) if axes else crop
    return crops


def legendre_table(n: int, device: torch.device) -> Tensor:
    """(BIAS_DEGREE + 1, n): Legendre polynomials P_0..P_3 on linspace(-1, 1, n), as RandBiasField uses."""
    x = torch.linspace(-1.0, 1.0, n, device=device)
    return torch.stack([torch.ones_like(x), x, (3 * x**2 - 1) / 2, (5 * x**3 - 3 * x) / 2])


def bias_fields(coeff: Tensor, shape: Sequence[int]) -> Tensor:
    """(N, len(BIAS_TERMS)) coefficients -> (N, D, H, W) log bias fields: sum_c coeff_c P_i(d) P_j(h) P_k(w)."""
    grid = coeff.new_zeros((coeff.shape[0], *(BIAS_DEGREE + 1,) * 3))
    i, j, k = (torch.tensor(t, device=coeff.device) for t in zip(*BIAS_TERMS, strict=True))
    grid[:, i, j, k] = coeff
    tables = [legendre_table(n, coeff.device) for n in shape]
    return torch.einsum("nijk,id,jh,kw->ndhw", grid, *tables)


def augment_intensity(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    """(N, C, S, S, S) crops and their (N, ...) parameters -> gamma, scale, shift, bias field and noise
    in MONAI's order (the reference path's), in place on each crop that a change applies to."""
    values = {key: p[key].tolist() for key in ("gamma_on", "gamma", "scale", "shift", "bias_on", "noise_std",
                                               "noise_seed")}  # fmt: skip
    for n in range(x.shape[0]):
        changed = values["gamma_on"][n] or values["bias_on"][n] or values["noise_std"][n] > 0
        if not (changed or values["scale"][n] != 1.0 or values["shift"][n] != 0.0):
            continue
        # a fresh tensor per crop: vectorised kernels then round alike wherever the crop sits in the batch
        crop = x[n].clone()
        if values["gamma_on"][n]:  # MONAI AdjustContrast: ((x - min) / (range + eps)) ** gamma * range + min
            low, span = crop.min(), crop.max() - crop.min()
            crop.sub_(low).div_(span + GAMMA_EPSILON).pow_(values["gamma"][n]).mul_(span).add_(low)
        if values["scale"][n] != 1.0:
            crop.mul_(values["scale"][n])
        if values["shift"][n] != 0.0:
            crop.add_(values["shift"][n])
        if values["bias_on"][n]:  # one crop at a time, so its field does not depend on the batch
            crop.mul_(torch.exp(bias_fields(p["bias_coeff"][n : n + 1], crop.shape[1:])))
        if values["noise_std"][n] > 0:
            generator = torch.Generator(x.device).manual_seed(int(values["noise_seed"][n]))
            crop.add_(
                torch.randn(crop.shape, generator=generator, device=x.device), alpha=values["noise_std"][n]
            )
        x[n] = crop
    return x


class PretrainVolumesDataset(Dataset):
    """Items of a volume dataset plus their crop parameters: {"image": (C, D, H, W), "index", PARAM_KEYS}.

    Item i at epoch e draws from the seed derived from (base_seed, e, i), so it does not depend
    on worker count or access order. The epoch sits in shared memory, so persistent DataLoader
    workers see ``set_epoch`` too (call it before iterating the loader for that epoch).
    """

    def __init__(self, base: Dataset, views: BatchedMultiCrop, base_seed: int = 0) -> None:
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
        image = torch.as_tensor(self.base[index]["image"])
        if image.dim() != 4:
            raise ValueError(f"volume {index} must be (C, D, H, W), got shape {tuple(image.shape)}")
        params = self.views.draw(image.shape[1:], seed=self.item_seed(index))
        return {"image": image, "index": torch.tensor(int(index)), **params}


def collate_volumes(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Any]:
    """DataLoader collate: crop parameters and indices stacked; the volumes stacked (B, C, D, H, W) when
    they share a size, else kept as a list (folders preprocessed to different cubes pretrain together)."""
    if not items:
        raise ValueError("collate_volumes got an empty list of items")
    batch: dict[str, Any] = {k: default_collate([it[k] for it in items]) for k in items[0] if k != "image"}
    images = [it["image"] for it in items]
    batch["image"] = torch.stack(images) if len({tuple(i.shape) for i in images}) == 1 else images
    return batch


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensors of a collated batch (and a list of volumes) on ``device``; other entries dropped."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
            moved[key] = [v.to(device, non_blocking=True) for v in value]
    return moved


def build_views(
    views_section: Mapping[str, Any], masking_section: Mapping[str, Any], patch_size: int
) -> BatchedMultiCrop:
    """Config sections ``views:`` and ``masking:`` (plain dicts) -> the batched view builder with a GMML masker."""
    masker = GMMLMasker(**dict(masking_section), patch_size=patch_size)
    return BatchedMultiCrop(ViewSettings(**dict(views_section)), masker)


__all__ = [
    "BatchedMultiCrop",
    "PretrainVolumesDataset",
    "augment_intensity",
    "bias_fields",
    "build_views",
    "collate_volumes",
    "view_overlaps",
    "move_batch",
    "resample_boxes",
]
