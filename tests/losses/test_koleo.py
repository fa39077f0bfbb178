"""KoLeo against the formula -(1/n) sum_i log(min_{j != i} ||x_i - x_j||) on L2-normalised rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.losses import koleo_loss


def _reference(x: np.ndarray, eps: float = 1e-8) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    nearest = [min(np.linalg.norm(x[i] - x[j]) for j in range(n) if j != i) for i in range(n)]
    return float(-np.mean(np.log(np.asarray(nearest) + eps)))


@pytest.mark.parametrize("n, dim, seed", [(2, 3, 0), (5, 8, 1), (16, 64, 2)])
def test_matches_the_formula(n, dim, seed):
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert koleo_loss(x).item() == pytest.approx(_reference(x.numpy()), rel=1e-5)


def test_gradient_pushes_the_closest_pair_apart():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [-1.0, 0.05]], requires_grad=True)
    before = koleo_loss(x)
    before.backward()
    with torch.no_grad():
        after = koleo_loss(x - 0.05 * x.grad)
    assert after < before  # a gradient step spreads the points
    assert x.grad.abs().sum() > 0


def test_spread_points_score_lower_than_clustered_ones():
    spread = torch.eye(4)
    clustered = torch.ones(4, 4) + 1e-3 * torch.eye(4)
    assert koleo_loss(spread) < koleo_loss(clustered)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(n, E\)"):
        koleo_loss(torch.randn(2, 3, 4))
