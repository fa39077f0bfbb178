"""The per-volume reference path of the 3D multi-crop views (MultiCropViews) and ViewSettings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from volta3d.data.masking import GMMLMasker
from volta3d.data.views import MultiCropViews

from ..config_kwargs import kwargs_for, section_kwargs

G, L, P = 16, 8, 4  # tiny global / local crop edges and patch size


def _views(n_local: int = 3, masker: GMMLMasker | None = None, **kwargs) -> MultiCropViews:
    return MultiCropViews(
        masker=masker, **section_kwargs("views", global_size=G, local_size=L, n_local=n_local, **kwargs)
    )


def _masker(fill: str = "noise") -> GMMLMasker:
    return GMMLMasker(**kwargs_for(GMMLMasker, "masking", ratio=0.5, block_size=4, fill=fill, patch_size=P))


def _volume(seed: int = 0, shape=(1, 20, 22, 18)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_shapes_dtypes_and_range():
    out = _views(masker=_masker())(_volume(), seed=0)
    n_tokens = (G // P) ** 3
    assert out["global"].shape == (2, 1, G, G, G) and out["global"].dtype == torch.float32
    assert out["local"].shape == (3, 1, L, L, L) and out["local"].dtype == torch.float32
    assert out["global_masked"].shape == (2, 1, G, G, G)
    assert out["voxel_mask"].shape == (2, 1, G, G, G) and out["voxel_mask"].dtype == torch.bool
    assert out["token_mask"].shape == (2, n_tokens) and out["token_mask"].dtype == torch.bool
    for key in ("global", "local", "global_masked"):
        assert out[key].min() >= 0.0 and out[key].max() <= 1.0
        assert type(out[key]) is torch.Tensor  # not a MONAI MetaTensor: collates and pins as a plain tensor


def test_same_seed_same_views_other_seed_different():
    views, volume = _views(masker=_masker()), _volume()
    first, second, other = views(volume, seed=11), views(volume, seed=11), views(volume, seed=12)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(not torch.equal(first[k], other[k]) for k in ("global", "local", "voxel_mask"))
    assert not torch.equal(first["global"][0], first["global"][1])  # the two global views differ too


def test_masker_leaves_clean_views_and_local_crops_untouched():
    """Local crops are never masked (MC-SSL) and the teacher's global views stay clean: adding a
    masker changes nothing but the extra keys."""
    volume = _volume(1)
    with_mask = _views(masker=_masker())(volume, seed=5)
    without = _views()(volume, seed=5)
    assert set(without) == {"global", "local"}
    assert torch.equal(with_mask["global"], without["global"]) and torch.equal(
        with_mask["local"], without["local"]
    )


def test_global_masked_differs_from_global_only_where_masked():
    masker = _masker(fill="zeros")
    out = _views(masker=masker)(_volume(2), seed=3)
    mask = out["voxel_mask"].expand_as(out["global"])
    assert torch.equal(out["global_masked"][~mask], out["global"][~mask])
    assert torch.all(out["global_masked"][mask] == 0)
    assert out["voxel_mask"].float().mean().item() == pytest.approx(0.5, abs=1e-3)
    for v in range(2):
        assert torch.equal(out["token_mask"][v], masker.token_mask(out["voxel_mask"][v, 0]))


def test_full_crop_with_all_flips_is_the_flipped_volume():
    """Scale 1 and aspect 1 crop the whole volume; with G equal to its edge the resize is the
    identity, so with every flip on and every intensity change off the view is volume.flip(D, H, W)."""
    volume = _volume(3, shape=(1, G, G, G))
    views = _views(
        n_local=0,
        global_edge_scale=(1.0, 1.0),
        aspect_range=(1.0, 1.0),
        flip_prob=1.0,
        gamma_prob=0.0,
        contrast_prob=0.0,
        noise_prob=0.0,
        bias_field_prob=0.0,
    )
    out = views(volume, seed=0)
    for v in range(2):
        torch.testing.assert_close(out["global"][v], volume.flip(1, 2, 3))


def test_intensity_changes_happen_when_forced():
    volume = _volume(3, shape=(1, G, G, G))
    plain = dict(
        n_local=0,
        global_edge_scale=(1.0, 1.0),
        aspect_range=(1.0, 1.0),
        flip_prob=0.0,
        gamma_prob=0.0,
        contrast_prob=0.0,
        noise_prob=0.0,
        bias_field_prob=0.0,
    )
    torch.testing.assert_close(_views(**plain)(volume, seed=0)["global"][0], volume)
    for change in (
        {"gamma_prob": 1.0},
        {"contrast_prob": 1.0},
        {"noise_prob": 1.0},
        {"bias_field_prob": 1.0},
    ):
        changed = _views(**{**plain, **change})(volume, seed=0)["global"][0]
        assert not torch.allclose(changed, volume), change


def test_crop_shape_keeps_edge_fraction_and_aspect_bounds():
    views = _views(aspect_range=(0.8, 1.25))
    rng = np.random.default_rng(0)
    spatial = (90, 100, 110)
    for _ in range(50):
        edges = views.settings.crop_shape(spatial, rng, (0.2, 0.6))
        edge_fraction = (math.prod(edges) / math.prod(spatial)) ** (1 / 3)  # geometric-mean edge share
        assert 0.2 * 0.97 <= edge_fraction <= 0.6 * 1.03
        ratios = [e / s for e, s in zip(edges, spatial, strict=True)]
        assert max(ratios) / min(ratios) <= 1.25 * 1.02  # sqrt(hi / lo), plus rounding to whole voxels


def test_volume_smaller_than_the_crops_and_two_channels():
    out = _views(masker=_masker())(_volume(4, shape=(2, 6, 5, 7)), seed=1)
    assert out["global"].shape == (2, 2, G, G, G) and out["local"].shape == (3, 2, L, L, L)
    assert out["global_masked"].shape == (2, 2, G, G, G) and out["voxel_mask"].shape == (2, 1, G, G, G)


def test_no_local_crops():
    out = _views(n_local=0, masker=_masker())(_volume(), seed=0)
    assert out["local"].shape == (0, 1, L, L, L)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"global_edge_scale": (0.0, 1.0)}, "global_edge_scale must satisfy"),
        ({"local_edge_scale": (0.5, 0.2)}, "local_edge_scale must satisfy"),
        ({"n_local": -1}, "n_local must be an integer >= 0"),
        ({"flip_prob": 1.5}, "flip_prob must be a probability"),
        ({"noise_std": -0.1}, "noise_std must be >= 0"),
        (
            {"masker": GMMLMasker(**kwargs_for(GMMLMasker, "masking", patch_size=6))},
            "global_size 16 must be a multiple of the patch size 6",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _views(**kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="volume must be"):
        _views()(torch.rand(16, 16, 16), seed=0)


def test_flip_axes_restricts_flips_to_left_right():
    volume = _volume(3, shape=(1, G, G, G))
    views = _views(
        n_local=0,
        global_edge_scale=(1.0, 1.0),
        aspect_range=(1.0, 1.0),
        flip_prob=1.0,
        flip_axes=(0,),
        gamma_prob=0.0,
        contrast_prob=0.0,
        noise_prob=0.0,
        bias_field_prob=0.0,
    )
    out = views(volume, seed=0)
    for v in range(2):
        torch.testing.assert_close(
            out["global"][v], volume.flip(1)
        )  # spatial axis 0 is dim 1 of (C, D, H, W)
    with pytest.raises(ValueError, match="flip_axes"):
        _views(flip_axes=(0, 3))
    with pytest.raises(ValueError, match="flip_axes"):
        _views(flip_axes=(1, 1))
