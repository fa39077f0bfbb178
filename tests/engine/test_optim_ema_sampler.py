import pytest
import torch
from torch import nn

from volta3d.engine.ema import ema_update
from volta3d.engine.optim import (
    apply_schedule_values,
    build_optimizer,
    cancel_gradients,
    clip_gradients_per_tensor,
    param_groups,
)
from volta3d.engine.sampler import ResumableSampler

from ..config_kwargs import section


def test_ema_matches_formula():
    torch.manual_seed(0)
    t = [torch.randn(3, 4), torch.randn(5)]
    s = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * a + 0.1 * b for a, b in zip(t, s, strict=True)]
    ema_update(t, s, 0.9)
    for a, e in zip(t, expected, strict=True):
        torch.testing.assert_close(a, e)
    with pytest.raises(ValueError, match="tensors"):
        ema_update(t, s[:1], 0.9)


def test_param_groups_exclude_biases_and_norms_from_decay():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = param_groups(m)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(m, section("optim")["betas"])
    apply_schedule_values(opt, lr=0.1, weight_decay=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_per_tensor_clipping():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.1, 0.0, 0.0])  # norm 0.1 -> untouched
    total = clip_gradients_per_tensor([a, b], max_norm=1.0)
    assert total.item() == pytest.approx((25 + 0.01) ** 0.5)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.1, 0.0, 0.0]))


def test_cancelled_parameters_are_not_updated():
    m = nn.Linear(3, 2)
    opt = build_optimizer(m, section("optim")["betas"])
    apply_schedule_values(opt, lr=0.1, weight_decay=0.1)
    m(torch.randn(4, 3)).sum().backward()
    before = m.weight.detach().clone()
    cancel_gradients([m.weight])
    opt.step()
    torch.testing.assert_close(m.weight, before)  # no gradient step and no decay
    assert not torch.equal(m.bias.grad, torch.zeros(2))


def _batches(sampler, batch_size):
    idx = list(sampler)
    return [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]


def test_sampler_resume_mid_epoch_replays_the_rest():
    s = ResumableSampler(10, batch_size=3, seed=4)
    s.set_epoch(2)
    full = _batches(s, 3)
    assert len(full) == 3 and len(s) == 9  # drop_last: 3 whole batches of 3
    s.set_epoch(2, start_batch=1)
    assert _batches(s, 3) == full[1:]
    s.set_epoch(3)
    assert _batches(s, 3) != full  # reshuffled per epoch


def test_sampler_ranks_split_each_global_batch():
    one = ResumableSampler(12, batch_size=4, seed=1)
    ranks = [ResumableSampler(12, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(5)
    single = _batches(one, 4)
    per_rank = [_batches(s, 2) for s in ranks]
    for step, batch in enumerate(single):
        assert sorted(per_rank[0][step] + per_rank[1][step]) == sorted(batch)
        assert not set(per_rank[0][step]) & set(per_rank[1][step])


def test_sampler_rejects_tiny_dataset():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableSampler(3, batch_size=2, world_size=2)
