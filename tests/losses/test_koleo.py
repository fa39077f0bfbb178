"""KoLeo against -(1/n) sum_i log(min_{j != i} ||x_i - x_j|| + eps) on L2-normalised rows, i over the
local rows and j over every rank's rows."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from volta3d.engine.distributed import all_gather_rows
from volta3d.losses import koleo_loss


def _reference(local: torch.Tensor, remote: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """The formula with explicit loops; ``remote`` rows are neighbour candidates only (constants)."""
    rows = [r / r.norm() for r in local]
    others = [] if remote is None else [r / r.norm() for r in remote.detach()]
    terms = []
    for i, x_i in enumerate(rows):
        candidates = [x_j for j, x_j in enumerate(rows) if j != i] + others
        nearest = torch.stack([(x_i - x_j).norm() for x_j in candidates]).min()
        terms.append(torch.log(nearest + eps))
    return -torch.stack(terms).mean()


def _randn(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gather_with(other_rank_rows: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fake all-gather: this rank's rows first, then what the other rank sends (its normalised rows)."""
    sent = F.normalize(other_rank_rows.float(), dim=-1)
    return lambda mine: torch.cat([mine, sent])


def _grad(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    loss_fn(leaf).backward()
    return leaf.grad


@pytest.mark.parametrize("n, dim, seed", [(2, 3, 0), (5, 8, 1), (16, 64, 2)])
def test_matches_the_formula(n, dim, seed):
    x = _randn(n, dim, seed)
    assert koleo_loss(x).item() == pytest.approx(_reference(x).item(), rel=1e-5)
    torch.testing.assert_close(_grad(koleo_loss, x), _grad(_reference, x), rtol=1e-4, atol=1e-5)


def test_two_ranks_search_neighbours_over_the_union_of_their_rows():
    x0, x1 = _randn(4, 6, 3), _randn(5, 6, 4)
    for local, remote in ((x0, x1), (x1, x0)):
        gather = _gather_with(remote)
        value = koleo_loss(local, gather=gather)
        assert value.item() == pytest.approx(_reference(local, remote).item(), rel=1e-5)
        assert value.item() != pytest.approx(koleo_loss(local).item(), rel=1e-3)  # a remote row is nearer
        torch.testing.assert_close(
            _grad(lambda x, g=gather: koleo_loss(x, gather=g), local),
            _grad(lambda x, r=remote: _reference(x, r), local),
            rtol=1e-4,
            atol=1e-5,
        )


def test_one_row_needs_a_remote_neighbour():
    with pytest.raises(ValueError, match="at least 2 embeddings over all ranks, got 1"):
        koleo_loss(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 embeddings over all ranks, got 1"):
        koleo_loss(torch.randn(1, 4), gather=all_gather_rows)  # one process: nothing gathered
    lone, remote = _randn(1, 4, 5), _randn(2, 4, 6)
    gather = _gather_with(remote)
    assert koleo_loss(lone, gather=gather).item() == pytest.approx(_reference(lone, remote).item(), rel=1e-5)
    grad = _grad(lambda x: koleo_loss(x, gather=gather), lone)
    torch.testing.assert_close(grad, _grad(lambda x: _reference(x, remote), lone), rtol=1e-4, atol=1e-5)
    assert grad.abs().sum() > 0


def test_all_gather_rows_returns_its_input_in_a_single_process():
    x = torch.randn(3, 4)
    assert all_gather_rows(x) is x


def _koleo_on_a_gloo_rank(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        rows = [_randn(3, 6, 7), _randn(3, 6, 8)]
        local, remote = rows[rank], rows[1 - rank]
        gathered = all_gather_rows(F.normalize(local.float(), dim=-1))
        torch.testing.assert_close(
            gathered, F.normalize(torch.cat([local, remote]).float(), dim=-1)
        )  # own first
        value = koleo_loss(local, gather=all_gather_rows).item()
        assert value == pytest.approx(_reference(local, remote).item(), rel=1e-5)
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_on_two_gloo_ranks(tmp_path):
    mp.spawn(_koleo_on_a_gloo_rank, args=(str(tmp_path / "rendezvous"),), nprocs=2)


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
    with pytest.raises(ValueError, match=r"\(n, E\)"):
        koleo_loss(torch.randn(2, 3, 4))
