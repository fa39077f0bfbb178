"""3D position-embedding resampling, checked against a field linear in the token-center coordinates."""

from __future__ import annotations

import itertools

import pytest
import torch

from volta3d.models import interpolate_pos_embed

from ..config_kwargs import tiny_encoder

COEFFS = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1], [2.0, 0.0, 0.25]])  # (E=3 channels, 3 axes)
OFFSET = torch.tensor([0.1, -0.4, 0.9])


def linear_field(grid: tuple[int, int, int], clamp_to: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(1, N, 3) field f(u) = COEFFS @ u + OFFSET at token centers u_a = (i_a + 0.5) / n_a.

    With ``clamp_to`` the centers are clamped into the span of that grid's outermost centers: the
    value a linear resampler gives where it cannot interpolate (edge replication).
    """
    rows = []
    for index in itertools.product(*(range(n) for n in grid)):  # depth-major, as MONAI flattens
        u = torch.tensor([(i + 0.5) / n for i, n in zip(index, grid, strict=True)])
        if clamp_to is not None:
            lo = torch.tensor([0.5 / n for n in clamp_to])
            u = torch.maximum(torch.minimum(u, 1 - lo), lo)
        rows.append(COEFFS @ u + OFFSET)
    return torch.stack(rows)[None]


def test_identity_when_grid_is_unchanged():
    pos = torch.randn(1, 24, 8)
    assert interpolate_pos_embed(pos, (2, 3, 4), (2, 3, 4)) is pos


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ((6, 4, 8), (3, 2, 4)),  # downsampling: every new center lies inside the old hull
        ((6, 6, 6), (3, 3, 3)),
        ((4, 6, 2), (2, 3, 1)),
    ],
)
def test_linear_field_is_reproduced_exactly_when_downsampling(old, new):
    out = interpolate_pos_embed(linear_field(old), old, new)
    torch.testing.assert_close(out, linear_field(new), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("old", "new"), [((2, 2, 2), (4, 4, 4)), ((3, 2, 4), (6, 5, 2)), ((6, 6, 6), (3, 9, 3))]
)
def test_linear_field_on_any_grid_matches_analytic_values_with_edge_replication(old, new):
    out = interpolate_pos_embed(linear_field(old), old, new)
    torch.testing.assert_close(out, linear_field(new, clamp_to=old), rtol=0, atol=1e-5)


def test_interior_tokens_are_exact_when_upsampling():
    old, new = (4, 4, 4), (8, 8, 8)
    out = interpolate_pos_embed(linear_field(old), old, new).reshape(*new, 3)
    exact = linear_field(new).reshape(*new, 3)
    # new centers 1..6 lie inside the old centers' span [1/8, 7/8]
    torch.testing.assert_close(out[1:-1, 1:-1, 1:-1], exact[1:-1, 1:-1, 1:-1], rtol=0, atol=1e-5)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"does not match the grid \(2, 2, 2\)"):
        interpolate_pos_embed(torch.randn(1, 9, 4), (2, 2, 2), (3, 3, 3))
    with pytest.raises(ValueError, match="grids must be 3D"):
        interpolate_pos_embed(torch.randn(1, 4, 4), (2, 2), (3, 3))


def test_encoder_uses_its_own_parameter_on_the_native_grid_and_resamples_otherwise():
    enc = tiny_encoder(patch_size=4)
    assert enc.position_embedding((8, 8, 8)) is enc.patch_embedding.position_embeddings
    resampled = enc.position_embedding((4, 2, 8))
    expected = interpolate_pos_embed(enc.patch_embedding.position_embeddings.detach(), (8, 8, 8), (4, 2, 8))
    torch.testing.assert_close(resampled.detach(), expected)
    assert resampled.shape == (1, 64, 16)
