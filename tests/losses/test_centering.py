"""Center EMA (DINO) against center <- m * center + (1 - m) * mean(teacher logits), and Sinkhorn-Knopp
against DINOv2's ``sinkhorn_knopp_teacher`` formula."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from volta3d.engine.distributed import all_reduce_max, all_reduce_sum
from volta3d.losses import Center, sinkhorn_knopp_probs

from ..config_kwargs import section

LOSS = section("loss")  # default.yaml's center_momentum and sinkhorn_iterations


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
    center = Center(out_dim=4, momentum=LOSS["center_momentum"])
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
        call(Center(out_dim=3, momentum=LOSS["center_momentum"]))


def test_bad_momentum_raises():
    with pytest.raises(ValueError, match="momentum must be in"):
        Center(out_dim=3, momentum=1.5)


def _sinkhorn_reference(
    logits: np.ndarray, temp: float, iterations: int, row_softmax_start: bool = False
) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` from its formula, float64 and no max subtraction: Q = exp(L / T)
    scaled to total mass 1, then alternately every prototype (column) gets mass 1/K and every row 1/B;
    returns Q * B. ``row_softmax_start`` is the old convention: each row's softmax instead of exp(L / T)."""
    q = np.exp(logits.astype(np.float64) / temp)
    if row_softmax_start:
        q = q / q.sum(axis=1, keepdims=True)
    b, k = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=0, keepdims=True)
        q = q / k
        q = q / q.sum(axis=1, keepdims=True)
        q = q / b
    return q * b


def _uniform_logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1  # in [-1, 1]


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_matches_the_dinov2_formula(iterations):
    logits = _uniform_logits(6, 10, seed=3)
    out = sinkhorn_knopp_probs(logits, temp=0.1, n_iterations=iterations)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(
        out.numpy(), _sinkhorn_reference(logits.numpy(), 0.1, iterations), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(out.sum(-1), torch.ones(6))


def test_a_per_row_softmax_start_is_not_the_dinov2_convention():
    # the row normaliser of a softmax start acts before the first prototype normalisation, so the
    # targets differ after a finite number of iterations: why the function starts from exp(L / T)
    logits = _uniform_logits(6, 10, seed=3).numpy()
    dinov2 = _sinkhorn_reference(logits, 0.1, 3)
    softmax_start = _sinkhorn_reference(logits, 0.1, 3, row_softmax_start=True)
    total_variation = 0.5 * np.abs(dinov2 - softmax_start).sum(axis=1).mean()
    assert total_variation > 1e-3


def test_sinkhorn_is_finite_at_temperature_0_01():
    # exp(1 / 0.01) overflows float32; a row 2 below the global maximum gives exp(-200), 0 in float32
    logits = _uniform_logits(2, 5, 16, seed=1)  # (B, N, K) patch logits
    logits[0, 0] = -1.0
    logits[1, 0, 0] = 1.0
    out = sinkhorn_knopp_probs(logits, temp=0.01, n_iterations=LOSS["sinkhorn_iterations"])
    assert out.shape == logits.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_knopp_probs(logits, temp=0.0, n_iterations=LOSS["sinkhorn_iterations"])


class _Lockstep:
    """Threads standing in for data-parallel ranks: a collective waits for every rank, then combines."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list[torch.Tensor] = [torch.empty(0)] * world

    def reducer(self, rank: int, combine: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
        def reduce(*tensors: torch.Tensor) -> None:
            for t in tensors:
                self.slots[rank] = t.clone()
                self.barrier.wait()
                combined = combine(torch.stack(self.slots))
                self.barrier.wait()  # every rank has read the slots before any overwrites its own
                t.copy_(combined)

        return reduce


def test_two_ranks_in_lockstep_equal_one_process_on_the_whole_batch():
    logits = _uniform_logits(8, 12, seed=4)
    logits[5:] -= 0.5  # the second rank's rows never hold the global maximum: a local shift would be wrong
    halves = logits.chunk(2)
    group = _Lockstep(world=2)

    def rank(r: int) -> torch.Tensor:
        return sinkhorn_knopp_probs(
            halves[r],
            temp=0.05,
            n_iterations=LOSS["sinkhorn_iterations"],
            reduce_sum=group.reducer(r, lambda s: s.sum(dim=0)),
            reduce_max=group.reducer(r, lambda s: s.amax(dim=0)),
        )

    with ThreadPoolExecutor(max_workers=2) as pool:
        per_rank = [f.result() for f in [pool.submit(rank, r) for r in range(2)]]
    torch.testing.assert_close(
        torch.cat(per_rank),
        sinkhorn_knopp_probs(logits, temp=0.05, n_iterations=LOSS["sinkhorn_iterations"]),
        rtol=1e-5,
        atol=1e-7,
    )


def _sinkhorn_on_a_gloo_rank(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        element_wise = torch.tensor([float(rank), -float(rank)])
        all_reduce_max(element_wise)
        assert element_wise.tolist() == [1.0, 0.0]
        logits = _uniform_logits(8, 12, seed=4)
        logits[5:] -= 0.5
        out = sinkhorn_knopp_probs(
            logits.chunk(2)[rank],
            temp=0.05,
            n_iterations=LOSS["sinkhorn_iterations"],
            reduce_sum=all_reduce_sum,
            reduce_max=all_reduce_max,
        )
        expected = sinkhorn_knopp_probs(logits, temp=0.05, n_iterations=LOSS["sinkhorn_iterations"]).chunk(2)[
            rank
        ]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_on_two_gloo_ranks_equals_one_process(tmp_path):
    mp.spawn(_sinkhorn_on_a_gloo_rank, args=(str(tmp_path / "rendezvous"),), nprocs=2)


def test_sinkhorn_spreads_a_batch_that_points_at_one_prototype():
    # every row prefers prototype 0 (a collapsed teacher): plain softmax gives every row the same target
    logits = torch.zeros(8, 8)
    logits[:, 0] = 1.0
    logits += 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    out = sinkhorn_knopp_probs(logits, temp=0.05, n_iterations=50)
    torch.testing.assert_close(out.sum(0), torch.ones(8), atol=1e-3, rtol=0)  # each prototype used equally
    assert out[:, 0].max() < 0.5  # no longer everyone's first choice


def test_all_reduce_max_is_a_no_op_in_a_single_process():
    t = torch.tensor([1.0, -2.0])
    all_reduce_max(t)
    assert torch.equal(t, torch.tensor([1.0, -2.0]))
