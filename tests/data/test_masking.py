"""GMMLMasker: realised ratio, block structure, fill values, token rule, determinism from the generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.data.masking import GMMLMasker

from ..config_kwargs import kwargs_for


def _gmml(**kwargs) -> GMMLMasker:
    """A masker with default.yaml's masking: and model.patch_size values, ``kwargs`` over them."""
    return GMMLMasker(**kwargs_for(GMMLMasker, "masking", "model", **kwargs))


def _mask(masker: GMMLMasker, volume: torch.Tensor, seed: int):
    return masker(volume, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75])
def test_realised_ratio_matches_target(ratio):
    volume = torch.rand(1, 32, 32, 32)
    _, voxel_mask, _ = _mask(_gmml(ratio=ratio, block_size=8, patch_size=8), volume, 0)
    assert voxel_mask.shape == (1, 32, 32, 32) and voxel_mask.dtype == torch.bool
    assert abs(voxel_mask.float().mean().item() - ratio) <= 1e-3


def test_ratio_zero_masks_nothing():
    volume = torch.rand(1, 16, 16, 16)
    corrupted, voxel_mask, token_mask = _mask(_gmml(ratio=0.0, patch_size=8), volume, 0)
    assert not voxel_mask.any() and not token_mask.any() and torch.equal(corrupted, volume)


def test_masked_voxels_form_blocks():
    """Block masking: a masked voxel's neighbour along each axis is masked far more often than the
    ratio (0.5) that independent voxel masking would give."""
    _, voxel_mask, _ = _mask(_gmml(ratio=0.5, block_size=8, patch_size=8), torch.rand(1, 32, 32, 32), 3)
    m = voxel_mask[0]
    for axis in range(3):
        a, b = m.narrow(axis, 0, 31), m.narrow(axis, 1, 31)
        assert (a & b).sum().item() / a.sum().item() > 0.8


def test_same_generator_seed_same_mask_other_seed_different():
    volume = torch.rand(2, 16, 16, 16)
    masker = _gmml(ratio=0.5, block_size=4, patch_size=8)
    first, second, other = _mask(masker, volume, 7), _mask(masker, volume, 7), _mask(masker, volume, 8)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert not torch.equal(first[1], other[1])


def test_global_random_state_is_neither_used_nor_changed():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    masker = _gmml(ratio=0.5, block_size=4, patch_size=8)
    a = _mask(masker, torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), 1)
    torch.manual_seed(123)
    np.random.seed(123)
    b = _mask(masker, torch.rand(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)), 1)
    assert torch.equal(a[0], b[0])
    torch.set_rng_state(torch_state)
    np.random.set_state(np_state)
    volume = torch.rand(1, 16, 16, 16)
    before_torch, before_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    _mask(masker, volume, 2)
    assert torch.equal(before_torch, torch.get_rng_state())
    assert np.array_equal(before_np, np.random.get_state()[1])


def test_noise_fill_is_uniform_on_unit_interval_and_unmasked_voxels_untouched():
    volume = torch.full((2, 32, 32, 32), -1.0)  # outside [0, 1], so every fill value is told apart
    corrupted, voxel_mask, _ = _mask(_gmml(ratio=0.5, fill="noise", patch_size=8), volume, 0)
    masked = voxel_mask.expand_as(volume)  # the same voxels in every channel
    assert torch.equal(corrupted[~masked], volume[~masked])
    fill = corrupted[masked]
    assert fill.min() >= 0.0 and fill.max() < 1.0
    assert fill.mean().item() == pytest.approx(0.5, abs=0.01)
    assert fill.var().item() == pytest.approx(1 / 12, abs=0.005)  # variance of U(0, 1)


def test_zeros_fill():
    volume = torch.rand(1, 16, 16, 16) + 0.5
    corrupted, voxel_mask, _ = _mask(_gmml(ratio=0.5, fill="zeros", block_size=4, patch_size=8), volume, 0)
    assert torch.all(corrupted[voxel_mask] == 0) and torch.equal(corrupted[~voxel_mask], volume[~voxel_mask])


def test_token_mask_follows_conv3d_patch_order_and_fraction_rule():
    """Reference: a Conv3d patch embedding (kernel = stride = p) with weights 1 / p^3 gives each
    patch's masked share in the order its output is flattened (d-major, then h, then w)."""
    p = 8
    masker = _gmml(ratio=0.4, block_size=5, token_masked_fraction=0.3, patch_size=p)
    _, voxel_mask, token_mask = _mask(masker, torch.rand(1, 16, 24, 32), 4)
    conv = torch.nn.Conv3d(1, 1, kernel_size=p, stride=p, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0 / p**3)
    with torch.no_grad():
        share = conv(voxel_mask.float().unsqueeze(0)).flatten(2)[0, 0]  # (1, 1, 2, 3, 4) -> (24,)
    assert token_mask.shape == (2 * 3 * 4,)
    assert torch.equal(token_mask, share >= 0.3 - 1e-6)
    assert 0 < token_mask.sum() < token_mask.numel()


def test_token_rule_threshold_is_inclusive():
    masker = _gmml(token_masked_fraction=0.5, patch_size=4)
    voxel_mask = torch.zeros(8, 4, 4, dtype=torch.bool)
    voxel_mask[:2] = True  # token 0 (d = 0): 32 of 64 voxels masked -> masked
    voxel_mask[4, :3, :] = True  # token 1 (d = 1): 12 of 64 -> not masked
    assert masker.token_mask(voxel_mask).tolist() == [True, False]


def test_block_larger_than_volume_and_non_cubic_volume():
    _, voxel_mask, _ = _mask(_gmml(ratio=0.5, block_size=64, patch_size=4), torch.rand(1, 8, 12, 4), 0)
    assert voxel_mask.sum().item() == round(0.5 * 8 * 12 * 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"ratio": -0.1}, "ratio must be in"),
        ({"fill": "gauss"}, "fill must be one of noise, zeros"),
        ({"block_size": 0}, "block_size must be an integer >= 1"),
        ({"token_masked_fraction": 0.0}, "token_masked_fraction must be in"),
        ({"patch_size": 0}, "patch_size must be an integer >= 1"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _gmml(**kwargs)


def test_bad_volumes_raise():
    masker = _gmml(patch_size=8)
    with pytest.raises(ValueError, match="volume must be"):
        masker(torch.rand(16, 16, 16), torch.Generator())
    with pytest.raises(ValueError, match="patch_size 8 does not divide"):
        masker(torch.rand(1, 16, 12, 16), torch.Generator())


def _boxes(mask: np.ndarray) -> list[tuple[int, ...]]:
    """Edges of the bounding boxes of the mask's connected components (for a sparse mask, single blocks)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask)
    return [tuple(s.stop - s.start for s in box) for box in ndimage.find_objects(labels)]


def test_random_blocks_have_edges_between_block_size_and_the_max_fraction():
    masker = _gmml(ratio=0.02, block_size=4, patch_size=16, block_shape="random", max_block_fraction=0.5)
    edges = []
    for seed in range(20):
        _, voxel_mask, _ = _mask(masker, torch.rand(1, 64, 64, 64), seed)
        edges += _boxes(voxel_mask[0].numpy())
    isolated = [e for e in edges if max(e) <= 32]  # components that are (mostly) one block
    assert len({e for e in isolated}) > 5  # edges vary between blocks, unlike cubes
    assert all(min(e) >= 1 for e in edges) and max(max(e) for e in isolated) <= 32


def test_random_blocks_keep_the_ratio_and_are_deterministic():
    masker = _gmml(ratio=0.5, block_size=8, patch_size=16, block_shape="random")
    volume = torch.rand(1, 64, 64, 64)
    a, b = _mask(masker, volume, 7), _mask(masker, volume, 7)
    assert abs(a[1].float().mean().item() - 0.5) <= 1e-3
    assert torch.equal(a[1], b[1])
    # bigger blocks hide whole 16^3 tokens, where 8^3 cubes leave almost every token partly visible
    cube_masker = _gmml(ratio=0.5, block_size=8, patch_size=16)

    def hidden_tokens(voxel_mask):
        share = voxel_mask[0].float().reshape(4, 16, 4, 16, 4, 16).mean(dim=(1, 3, 5))
        return int((share >= 0.9).sum())

    seeds = range(4)
    assert sum(hidden_tokens(_mask(masker, volume, s)[1]) for s in seeds) >= 8  # of 4 x 64 tokens
    assert sum(hidden_tokens(_mask(cube_masker, volume, s)[1]) for s in seeds) <= 1


def test_bad_block_shape():
    with pytest.raises(ValueError, match="block_shape"):
        _gmml(block_shape="sphere")
    with pytest.raises(ValueError, match="max_block_fraction"):
        _gmml(block_shape="random", max_block_fraction=0.0)


@pytest.mark.parametrize(
    ("kwargs", "spatial"),
    [
        ({"ratio": 0.5, "block_size": 8, "patch_size": 16}, (64, 48, 32)),
        ({"ratio": 0.5, "block_size": 8, "patch_size": 16, "block_shape": "random"}, (48, 48, 48)),
        ({"ratio": 0.3, "block_size": 5, "patch_size": 8}, (24, 32, 16)),
        ({"ratio": 0.5, "block_size": 64, "patch_size": 4}, (8, 12, 4)),  # blocks larger than the volume
        ({"ratio": 0.0, "patch_size": 8}, (16, 16, 16)),
    ],
)
def test_batched_block_mask_equals_one_block_at_a_time(kwargs, spatial):
    """The GPU algorithm (each voxel's first covering block by a scatter-min, then the first `target`
    voxels in (block, raster) order), run here on a CPU, gives exactly the sequential masks."""
    masker = _gmml(**kwargs)
    seeds = [3, 11, 12, 40]
    batched = masker._batched_block_mask(
        spatial, [torch.Generator().manual_seed(s) for s in seeds], torch.device("cpu")
    )
    for view, seed in zip(batched, seeds, strict=True):
        expected = masker._block_mask(spatial, torch.Generator().manual_seed(seed))
        assert torch.equal(view, torch.from_numpy(expected))


@pytest.mark.parametrize("fill", ["noise", "zeros"])
def test_mask_batch_equals_the_per_view_masker(fill):
    masker = _gmml(ratio=0.5, block_size=4, fill=fill, patch_size=8)
    views = torch.rand(3, 2, 16, 24, 8)
    corrupted, voxel_mask, token_mask = masker.mask_batch(views, [5, 6, 7])
    for n, seed in enumerate((5, 6, 7)):
        expected = _mask(masker, views[n], seed)
        assert torch.equal(corrupted[n], expected[0]) and torch.equal(voxel_mask[n], expected[1])
        assert torch.equal(token_mask[n], expected[2])
    with pytest.raises(ValueError, match="one seed each"):
        masker.mask_batch(views, [1, 2])
