"""masked_mse (paper eq. 1): squared error averaged over the corrupted voxels only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.losses import masked_mse


def _reference(rec: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Per volume: mean over its masked voxels (all channels); then the mean over volumes."""
    per_volume = []
    for b in range(rec.shape[0]):
        total, count = 0.0, 0
        for c, d, h, w in np.ndindex(*rec.shape[1:]):
            if mask[b, 0, d, h, w]:
                total += (float(rec[b, c, d, h, w]) - float(target[b, c, d, h, w])) ** 2
                count += 1
        per_volume.append(total / count if count else 0.0)
    return sum(per_volume) / len(per_volume)


def _inputs(seed: int, channels: int = 2):
    gen = torch.Generator().manual_seed(seed)
    rec = torch.rand(2, channels, 4, 5, 3, generator=gen)
    target = torch.rand(2, channels, 4, 5, 3, generator=gen)
    mask = torch.rand(2, 1, 4, 5, 3, generator=gen) < 0.4
    return rec, target, mask


def test_value_matches_reference_over_all_channels():
    rec, target, mask = _inputs(0)
    expected = _reference(rec.numpy(), target.numpy(), mask.numpy())
    assert masked_mse(rec, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_unmasked_voxels_are_ignored():
    rec, target, mask = _inputs(1)
    changed = rec.clone()
    changed[~mask.expand_as(rec)] = 100.0
    assert masked_mse(changed, target, mask).item() == pytest.approx(
        masked_mse(rec, target, mask).item(), rel=1e-6
    )
    leaf = rec.clone().requires_grad_(True)
    masked_mse(leaf, target, mask).backward()
    assert torch.all(leaf.grad[~mask.expand_as(rec)] == 0)
    # d loss / d rec = 2 (rec - target) / (B * masked voxels of that volume * C)
    n_masked = mask.flatten(1).sum(1).reshape(-1, 1, 1, 1, 1) * rec.shape[1]
    expected = 2 * (rec - target) / (rec.shape[0] * n_masked)
    torch.testing.assert_close(leaf.grad[mask.expand_as(rec)], expected[mask.expand_as(rec)])


def test_is_a_mean_over_volumes():
    """Splitting the batch and averaging the halves gives the same value (what accumulation relies on)."""
    rec, target, mask = _inputs(4)
    mask[0] = False
    mask[0, 0, 0, 0, 0] = True  # volumes with very different masked counts
    halves = [masked_mse(rec[i : i + 1], target[i : i + 1], mask[i : i + 1]) for i in range(2)]
    assert masked_mse(rec, target, mask).item() == pytest.approx(float(sum(halves) / 2), rel=1e-6)


def test_nothing_masked_gives_zero_with_a_gradient_path():
    rec, target, _ = _inputs(2)
    leaf = rec.clone().requires_grad_(True)
    loss = masked_mse(leaf, target, torch.zeros(2, 1, 4, 5, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(rec))


def test_literal_value():
    """Reconstruction 0, target 1: every masked voxel has squared error exactly 1, so the loss is 1.0."""
    mask = torch.zeros(1, 1, 2, 2, 2, dtype=torch.bool)
    mask[..., 0] = True
    assert masked_mse(torch.zeros(1, 3, 2, 2, 2), torch.ones(1, 3, 2, 2, 2), mask).item() == 1.0


def test_bf16_reconstruction_is_computed_in_float32():
    rec, target, mask = _inputs(3)
    loss = masked_mse(rec.to(torch.bfloat16), target, mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("target_shape", "mask_shape", "message"),
    [
        ((2, 2, 4, 5, 2), (2, 1, 4, 5, 3), "must both be"),
        ((2, 2, 4, 5, 3), (2, 1, 4, 5), r"voxel_mask has shape \(2, 1, 4, 5\)"),
        ((2, 2, 4, 5, 3), (2, 3, 4, 5, 3), "expected"),
    ],
)
def test_bad_shapes_raise(target_shape, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        masked_mse(
            torch.zeros(2, 2, 4, 5, 3), torch.zeros(target_shape), torch.ones(mask_shape, dtype=torch.bool)
        )
