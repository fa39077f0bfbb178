"""Center EMA (DINO) against the formula center <- m * center + (1 - m) * mean(teacher logits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.losses import Center


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_update_follows_the_ema_formula_over_two_steps():
    torch.manual_seed(0)
    center = Center(out_dim=5, momentum=0.9)
    a, b = torch.randn(4, 5), torch.randn(3, 2, 5)  # CLS logits (B, K) and patch logits (B, N, K)
    center.update(*Center.batch_stats(a))
    center.update(*Center.batch_stats(b))
    expected = np.zeros(5)
    for logits in (a.numpy().reshape(-1, 5), b.numpy().reshape(-1, 5)):
        expected = 0.9 * expected + 0.1 * logits.mean(axis=0)
    np.testing.assert_allclose(center.center.numpy()[0], expected, rtol=1e-6, atol=1e-7)


def test_batch_stats_counts_every_vector():
    total, count = Center.batch_stats(torch.ones(2, 3, 7))
    assert total.shape == (7,) and total.dtype == torch.float32
    assert count.item() == 6.0 and torch.equal(total, torch.full((7,), 6.0))


def test_two_micro_batches_then_one_update_equal_one_big_batch():
    torch.manual_seed(1)
    first, second = torch.randn(2, 8) * 3, torch.randn(5, 8) + 1
    accumulated = Center(out_dim=8, momentum=0.8)
    s1, n1 = Center.batch_stats(first)
    s2, n2 = Center.batch_stats(second)
    accumulated.update(s1 + s2, n1 + n2)
    one_batch = Center(out_dim=8, momentum=0.8)
    one_batch.update(*Center.batch_stats(torch.cat([first, second])))
    torch.testing.assert_close(accumulated.center, one_batch.center)
    # two updates (one per micro-batch) is NOT the same: the EMA would decay twice per optimiser step
    twice = Center(out_dim=8, momentum=0.8)
    twice.update(s1, n1)
    twice.update(s2, n2)
    assert not torch.allclose(twice.center, one_batch.center)


def test_teacher_probs_center_and_sharpen_without_grad():
    torch.manual_seed(2)
    center = Center(out_dim=6, momentum=0.5)
    center.update(*Center.batch_stats(torch.randn(3, 6)))
    logits = torch.randn(4, 6, requires_grad=True)
    probs = center.teacher_probs(logits, temp=0.04)
    expected = _np_softmax((logits.detach().numpy() - center.center.numpy()) / 0.04)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not probs.requires_grad and probs.dtype == torch.float32


def test_teacher_probs_are_finite_for_extreme_bf16_logits():
    center = Center(out_dim=4)
    logits = torch.tensor([[1e4, -1e4, 0.0, 3e4]], dtype=torch.bfloat16)
    probs = center.teacher_probs(logits, temp=0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.update(torch.zeros(3), 0), "count must be > 0"),
        (lambda c: c.update(torch.zeros(5), 2), "sum_ has 5 entries, the center has 3"),
        (lambda c: c.teacher_probs(torch.zeros(1, 3), 0.0), "teacher temperature must be > 0"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(Center(out_dim=3))


def test_bad_momentum_raises():
    with pytest.raises(ValueError, match="momentum must be in"):
        Center(out_dim=3, momentum=1.5)


def _sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """Written from the definition: start from each row's softmax, then alternately give every prototype
    (column) the mass 1/K and every row the mass 1/M; return rows scaled to sum to 1."""
    q = _np_softmax(logits.astype(np.float64) / temp)
    m, k = q.shape
    q = q / m
    for _ in range(iterations):
        q = q / (q.sum(axis=0, keepdims=True) * k)
        q = q / (q.sum(axis=1, keepdims=True) * m)
    return q * m


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_the_definition(iterations):
    from volta3d.losses import sinkhorn_knopp_probs

    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(3))
    out = sinkhorn_knopp_probs(logits, temp=0.1, n_iterations=iterations)
    np.testing.assert_allclose(
        out.numpy(), _sinkhorn_reference(logits.numpy(), 0.1, iterations), rtol=1e-4, atol=1e-7
    )
    torch.testing.assert_close(out.sum(-1), torch.ones(6))


def test_sinkhorn_spreads_a_batch_that_points_at_one_prototype():
    from volta3d.losses import sinkhorn_knopp_probs

    # every row prefers prototype 0 (a collapsed teacher): plain softmax gives every row the same target
    logits = torch.zeros(8, 8)
    logits[:, 0] = 1.0
    logits += 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    out = sinkhorn_knopp_probs(logits, temp=0.05, n_iterations=50)
    torch.testing.assert_close(out.sum(0), torch.ones(8), atol=1e-3, rtol=0)  # each prototype used equally
    assert out[:, 0].max() < 0.5  # no longer everyone's first choice


def test_sinkhorn_keeps_leading_dims_and_survives_a_low_temperature():
    from volta3d.losses import sinkhorn_knopp_probs

    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)) * 5  # (B, N, K) patch logits
    out = sinkhorn_knopp_probs(logits, temp=0.001)
    assert out.shape == logits.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp_probs(logits, temp=0.0)
