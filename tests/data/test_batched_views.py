"""The batched view builder (BatchedMultiCrop) against the per-volume reference path, its numerics,
its determinism (seed, batch split, DataLoader workers) and the pretraining dataset around it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torch.utils.data import DataLoader, Dataset, default_collate

from volta3d.config import load_config, to_kwargs
from volta3d.data.batched_views import (
    BIAS_TERMS,
    BatchedMultiCrop,
    PretrainVolumesDataset,
    bias_fields,
    build_views,
    collate_volumes,
    move_batch,
    view_overlaps,
)
from volta3d.data.masking import GMMLMasker
from volta3d.data.views import MultiCropViews, ViewSettings

from ..config_kwargs import kwargs_for, section_kwargs

G, L, P = 16, 8, 4  # tiny global / local crop edges and patch size
NO_INTENSITY = {"gamma_prob": 0.0, "contrast_prob": 0.0, "noise_prob": 0.0, "bias_field_prob": 0.0}


def _masker() -> GMMLMasker:
    return GMMLMasker(**kwargs_for(GMMLMasker, "masking", ratio=0.5, block_size=4, patch_size=P))


def _settings(**kwargs) -> dict:
    return section_kwargs("views", **{"global_size": G, "local_size": L, "n_local": 3, **kwargs})


def _volume(seed: int, shape=(1, 20, 22, 18)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _batch(views: BatchedMultiCrop, volumes: list[torch.Tensor], seeds: list[int]) -> dict[str, torch.Tensor]:
    items = [{"image": v, "index": torch.tensor(i), **views.draw(v.shape[1:], s)}
             for i, (v, s) in enumerate(zip(volumes, seeds, strict=True))]  # fmt: skip
    return views(default_collate(items))


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_same_boxes_flips_and_masks_as_the_reference_path(flip_prob):
    """The crop boxes come from the same seeds as the reference path, the resize is the same kernel,
    and the GMML masks (and noise fill) are the reference masker's, voxel for voxel."""
    kwargs = _settings(flip_prob=flip_prob, **NO_INTENSITY)
    reference = MultiCropViews(masker=_masker(), **kwargs)
    batched = BatchedMultiCrop(ViewSettings(**kwargs), _masker())
    volumes, seeds = [_volume(i) for i in range(3)], [11, 12, 13]
    out = _batch(batched, volumes, seeds)
    for b, (volume, seed) in enumerate(zip(volumes, seeds, strict=True)):
        expected = reference(volume, seed)
        assert set(expected) | {"index", "view_global_overlap", "view_local_in_global"} == set(out)
        for key, value in expected.items():
            torch.testing.assert_close(out[key][:, b], value, atol=1e-6, rtol=0)


def test_gamma_equals_monai_adjust_contrast():
    kwargs = _settings(**{**NO_INTENSITY, "gamma_prob": 1.0, "gamma_range": (1.3, 1.3)}, flip_prob=0.0)
    reference = MultiCropViews(**kwargs)
    out = _batch(BatchedMultiCrop(ViewSettings(**kwargs)), [_volume(0)], [5])
    expected = reference(_volume(0), 5)
    torch.testing.assert_close(out["global"][:, 0], expected["global"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["local"][:, 0], expected["local"], atol=1e-5, rtol=0)


def test_bias_field_is_the_legendre_sum_of_monai():
    """log field = sum over i + j + k <= 3 of c_ijk P_i(d) P_j(h) P_k(w) on linspace(-1, 1) grids,
    as numpy's leggrid3d evaluates it from the coefficient cube."""
    rng = np.random.default_rng(0)
    coeff = rng.uniform(0, 0.3, size=(2, len(BIAS_TERMS)))
    shape = (5, 7, 6)
    ours = bias_fields(torch.tensor(coeff, dtype=torch.float32), shape)
    for n in range(2):
        cube = np.zeros((4, 4, 4))
        for c, (i, j, k) in zip(coeff[n], BIAS_TERMS, strict=True):
            cube[i, j, k] = c
        grids = [np.linspace(-1, 1, s) for s in shape]
        expected = np.polynomial.legendre.leggrid3d(*grids, cube)
        np.testing.assert_allclose(ours[n].numpy(), expected, atol=1e-5)
    assert len(BIAS_TERMS) == 20 and BIAS_TERMS[0] == (0, 0, 0)


DIMS = (1, 2, 3, 4)


def _slope_and_offset(view: torch.Tensor, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares view = a * volume + b, per view."""
    centered = volume - volume.mean()
    slope = ((view - view.mean(dim=DIMS, keepdim=True)) * centered).mean(dim=DIMS) / centered.pow(2).mean()
    return slope, view.mean(dim=DIMS) - slope * volume.mean()


# One intensity change at a time, always on, and statistics that recover its random draw.
CHANGES = {
    "gamma": ({"gamma_prob": 1.0}, lambda v, x: [(v - v.amin(dim=DIMS, keepdim=True)).mean(dim=DIMS)
                                                 / (v.amax(dim=DIMS) - v.amin(dim=DIMS))]),
    "scale and shift": ({"contrast_prob": 1.0}, lambda v, x: list(_slope_and_offset(v, x))),
    "bias field": ({"bias_field_prob": 1.0}, lambda v, x: [(v / x).log().mean(dim=DIMS), (v / x).log().std(dim=DIMS)]),
    "noise": ({"noise_prob": 1.0}, lambda v, x: [(v - x).std(dim=DIMS)]),
}  # fmt: skip


def _both_paths(settings: dict, n_draws: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-volume crops (no geometry) of one smooth volume, batched and reference: (2 * n_draws, 1, G, G, G)."""
    kwargs = _settings(n_local=0, global_edge_scale=(1.0, 1.0), aspect_range=(1.0, 1.0), flip_prob=0.0,
                       **{**NO_INTENSITY, **settings})  # fmt: skip
    smooth = torch.nn.functional.avg_pool3d(_volume(7, shape=(1, 1, G + 2, G + 2, G + 2)), 3, stride=1)[0]
    volume = smooth * 0.6 + 0.2  # away from the clamp at 0 and 1
    seeds = list(range(n_draws))
    ours = _batch(BatchedMultiCrop(ViewSettings(**kwargs)), [volume] * n_draws, seeds)["global"].flatten(0, 1)
    reference = MultiCropViews(**kwargs)
    return ours, torch.cat([reference(volume, s)["global"] for s in seeds]), volume


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_intensity_draws_have_the_reference_distribution(change):
    """Over 200 draws, the statistics that recover one change's random draw (gamma, scale and shift,
    bias-field coefficients, noise std) have the distribution MONAI's transforms give them
    (two-sample Kolmogorov-Smirnov on fixed seeds)."""
    settings, statistics = CHANGES[change]
    ours, theirs, volume = _both_paths(settings, 200)
    for a, b in zip(statistics(ours, volume), statistics(theirs, volume), strict=True):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 0.01, change


@pytest.mark.parametrize("key", ["gamma_prob", "contrast_prob", "bias_field_prob", "noise_prob"])
def test_intensity_changes_happen_as_often_as_in_the_reference(key):
    probability = getattr(ViewSettings(**section_kwargs("views")), key)
    ours, theirs, volume = _both_paths({key: probability}, 300)
    changed = [float(((v - volume).abs().amax(dim=DIMS) > 1e-6).float().mean()) for v in (ours, theirs)]
    # contrast_prob switches scale and shift on independently: a view changes unless both stay off
    expected = 1 - (1 - probability) ** 2 if key == "contrast_prob" else probability
    bound = 3 * np.sqrt(expected * (1 - expected) * 2 / len(ours))
    assert abs(changed[0] - changed[1]) < bound and abs(changed[0] - expected) < bound, (key, changed)


def test_views_do_not_depend_on_the_batch_they_are_built_in():
    batched = BatchedMultiCrop(ViewSettings(**_settings()), _masker())
    volumes, seeds = [_volume(i) for i in range(4)], [3, 4, 5, 6]
    whole = _batch(batched, volumes, seeds)
    halves = [_batch(batched, volumes[i : i + 2], seeds[i : i + 2]) for i in (0, 2)]
    for key in ("global", "local", "global_masked", "voxel_mask", "token_mask"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves], dim=1)), key
    again = _batch(batched, volumes, seeds)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    other = _batch(batched, volumes, [7, 8, 9, 10])
    assert not torch.equal(whole["global"], other["global"]) and not torch.equal(
        whole["voxel_mask"], other["voxel_mask"]
    )


def test_shapes_dtypes_range_and_view_major_layout():
    batched = BatchedMultiCrop(ViewSettings(**_settings(n_local=2)), _masker())
    volumes = [_volume(i, shape=(2, 6, 5, 7)) for i in range(3)]  # two channels, smaller than the crops
    out = _batch(batched, volumes, [0, 1, 2])
    assert out["global"].shape == (2, 3, 2, G, G, G) and out["local"].shape == (2, 3, 2, L, L, L)
    assert out["global_masked"].shape == (2, 3, 2, G, G, G)
    assert out["voxel_mask"].shape == (2, 3, 1, G, G, G) and out["voxel_mask"].dtype == torch.bool
    assert out["token_mask"].shape == (2, 3, (G // P) ** 3) and out["index"].tolist() == [0, 1, 2]
    for key in ("global", "local", "global_masked"):
        assert out[key].dtype == torch.float32 and out[key].min() >= 0 and out[key].max() <= 1
    single = _batch(batched, volumes[1:2], [1])
    assert torch.equal(out["local"][1, 1], single["local"][1, 0])  # (view, volume) order
    none = _batch(BatchedMultiCrop(ViewSettings(**_settings(n_local=0))), volumes, [0, 1, 2])
    assert none["local"].shape == (0, 3, 2, L, L, L)


def test_volumes_of_other_sizes_share_a_batch():
    """collate_volumes keeps volumes of different sizes as a list; each gets its own views."""
    batched = BatchedMultiCrop(ViewSettings(**_settings()), _masker())
    volumes = [_volume(0, shape=(1, 20, 22, 18)), _volume(1, shape=(1, 12, 30, 16))]
    items = [
        {"image": v, "index": torch.tensor(i), **batched.draw(v.shape[1:], 5 + i)}
        for i, v in enumerate(volumes)
    ]
    batch = collate_volumes(items)
    assert isinstance(batch["image"], list) and batch["crop_start"].shape == (2, 5, 3)
    out = batched(move_batch(batch, torch.device("cpu")))
    for b, volume in enumerate(volumes):
        alone = _batch(batched, [volume], [5 + b])
        assert all(torch.equal(out[k][:, b], alone[k][:, 0]) for k in ("global", "local", "global_masked"))
    with pytest.raises(ValueError, match="empty list"):
        collate_volumes([])


def test_flips_only_on_flip_axes():
    batched = BatchedMultiCrop(ViewSettings(**_settings(flip_axes=(0,), flip_prob=0.5)))
    flips = torch.cat([batched.draw((20, 20, 20), s)["flip"] for s in range(50)])
    assert flips[:, 0].any() and not flips[:, 0].all() and not flips[:, 1:].any()


class _TinyVolumes(Dataset):
    """Stands in for VolumeDataset: items are {"image": (1, D, H, W)} in [0, 1]."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        return {"image": _volume(index), "subject_id": f"s{index}"}


def _dataset(base_seed: int = 0) -> PretrainVolumesDataset:
    return PretrainVolumesDataset(
        _TinyVolumes(), BatchedMultiCrop(ViewSettings(**_settings()), _masker()), base_seed
    )


def test_dataset_seeds_do_not_depend_on_access_order_and_change_with_epoch():
    forward, backward = _dataset(3), _dataset(3)
    in_order = [forward[i] for i in range(4)]
    reverse = [backward[i] for i in reversed(range(4))][::-1]
    for a, b in zip(in_order, reverse, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    forward.set_epoch(1)
    assert forward.epoch == 1 and not torch.equal(forward[0]["crop_start"], in_order[0]["crop_start"])
    assert not torch.equal(_dataset(4)[0]["mask_seed"], in_order[0]["mask_seed"])
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        forward.set_epoch(-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_persistent_workers_see_set_epoch_and_give_the_direct_views(workers):
    dataset = _dataset()
    loader = DataLoader(dataset, batch_size=2, num_workers=workers, persistent_workers=workers > 0)
    reference = _dataset()
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        reference.set_epoch(epoch)
        loaded = torch.cat([dataset.views(b)["global_masked"] for b in loader], dim=1)
        direct = dataset.views(default_collate([reference[i] for i in range(4)]))["global_masked"]
        assert torch.equal(loaded, direct)


def test_build_views_from_the_default_config():
    cfg = load_config(overrides=[f"views.global_size={G}", f"views.local_size={L}", "views.n_local=1"])
    views = build_views(to_kwargs(cfg.views), to_kwargs(cfg.masking), patch_size=P)
    assert views.masker is not None and views.masker.ratio == cfg.masking.ratio
    assert _batch(views, [_volume(0)], [0])["token_mask"].shape == (2, 1, (G // P) ** 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="global_size 16 must be a multiple of the patch size 6"):
        BatchedMultiCrop(
            ViewSettings(**_settings()), GMMLMasker(**kwargs_for(GMMLMasker, "masking", patch_size=6))
        )
    batched = BatchedMultiCrop(ViewSettings(**_settings()))
    with pytest.raises(ValueError, match=r"batch\['image'\] must hold \(C, D, H, W\) volumes"):
        batched({"image": torch.rand(2, 16, 16, 16)})

    class _Flat(_TinyVolumes):
        def __getitem__(self, index: int) -> dict:
            return {"image": torch.rand(16, 16, 16)}

    with pytest.raises(ValueError, match=r"volume 2 must be \(C, D, H, W\)"):
        PretrainVolumesDataset(_Flat(), batched)[2]
    with pytest.raises(ValueError, match="base_seed must be >= 0"):
        PretrainVolumesDataset(_TinyVolumes(), batched, base_seed=-1)


def test_view_overlaps_from_boxes():
    """IoU of the two global boxes and the share of each local box inside the global box holding most of it,
    checked on boxes whose overlaps are known by hand."""
    # (V=3, B=2, 3): volume 0: globals [0,4)^3 and [2,6)x[0,4)x[0,4) (IoU 32 / 96), local [3,5)x[0,2)x[0,2)
    start = torch.tensor([[[0, 0, 0], [0, 0, 0]], [[2, 0, 0], [0, 0, 0]], [[3, 0, 0], [8, 8, 8]]])
    size = torch.tensor([[[4, 4, 4], [4, 4, 4]], [[4, 4, 4], [4, 4, 4]], [[2, 2, 2], [2, 2, 2]]])
    out = view_overlaps(start, size)
    # volume 1: identical globals (IoU 1), its local crop outside both (0)
    assert float(out["view_global_overlap"]) == pytest.approx(np.median([32 / 96, 1.0]))
    assert float(out["view_local_in_global"]) == pytest.approx(
        np.median([1.0, 0.0])
    )  # volume 0's local: inside
    no_local = view_overlaps(start[:2], size[:2])
    assert math.isnan(float(no_local["view_local_in_global"]))


def test_scales_are_edge_fractions():
    settings = ViewSettings(**_settings(global_edge_scale=(0.5, 0.5), aspect_range=(1.0, 1.0)))
    shape = settings.crop_shape((40, 60, 20), np.random.default_rng(0), settings.global_edge_scale)
    assert shape == [20, 30, 10]  # half of each edge, an eighth of the volume


def test_default_bias_field_stays_within_mri_non_uniformity():
    """With the default coefficient (U(-0.05, 0.05) per Legendre term) a crop's brightest / darkest bias
    ratio has a median near 1.5 (about +-20 %, the non-uniformity of clinical scans), never the 20x of
    non-negative 0.3 coefficients."""
    settings = ViewSettings(**_settings(bias_field_prob=1.0))
    views = BatchedMultiCrop(settings)
    coeff = torch.stack([views.draw((24, 24, 24), seed)["bias_coeff"][0] for seed in range(200)])
    assert (
        float(coeff.min()) < 0 < float(coeff.max())
    )  # symmetric, as MONAI RandBiasField(coeff_range=(-c, c))
    field = torch.exp(bias_fields(coeff, (16, 16, 16))).flatten(1)
    ratio = (field.max(dim=1).values / field.min(dim=1).values).median()
    assert 1.2 < float(ratio) < 2.0
