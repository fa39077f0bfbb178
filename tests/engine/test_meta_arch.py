import copy

import pytest
import torch

from volta3d.config import load_config, to_kwargs
from volta3d.engine.meta_arch import build_volta3d
from volta3d.engine.optim import apply_schedule_values, build_optimizer

from ..config_kwargs import section


def _model(overrides, **loss):
    cfg = load_config(overrides=overrides + [f"loss.{k}={v}" for k, v in loss.items()])
    torch.manual_seed(0)
    return build_volta3d(to_kwargs(cfg.model), to_kwargs(cfg.head), to_kwargs(cfg.loss))


def _batch(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.rand(2, b, 1, 32, 32, 32, generator=g)
    voxel_mask = torch.rand(2, b, 1, 32, 32, 32, generator=g) > 0.5
    return {
        "global": clean,
        "local": torch.rand(2, b, 1, 16, 16, 16, generator=g),
        "global_masked": torch.where(voxel_mask, torch.rand(clean.shape, generator=g), clean),
        "voxel_mask": voxel_mask,
        "token_mask": torch.rand(2, b, 8, generator=g) > 0.5,
    }


def _split(batch, k):
    return [{key: v.chunk(k, dim=1)[i] for key, v in batch.items()} for i in range(k)]


def test_losses_present_and_finite(tiny_overrides):
    model = _model(tiny_overrides)
    out = model.compute_losses(_batch(), 0.04, 0.04)
    for key in ("loss", "loss_global", "loss_local", "loss_rec", "teacher_entropy"):
        assert torch.isfinite(out[key]), key
    expected = out["loss_global"] + out["loss_local"] + 100.0 * out["loss_rec"]
    torch.testing.assert_close(out["loss"], expected)
    assert set(out["center_stats"]) == {"global", "patch"}
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())  # teacher gets no gradient


@pytest.mark.parametrize(
    "weights, active",
    [
        ({"global_weight": 0, "local_weight": 0}, {"loss_rec"}),
        ({"local_weight": 0, "rec_weight": 0}, {"loss_global"}),
        ({"global_weight": 0, "rec_weight": 0}, {"loss_local"}),
    ],
)
def test_zero_weight_skips_branch(tiny_overrides, weights, active):
    model = _model(tiny_overrides, **weights)
    out = model.compute_losses(_batch(), 0.04, 0.04)
    assert {k for k in out if k.startswith("loss_")} == active
    out["loss"].backward()
    decoder_grad = model.student.encoder.conv3d_transpose.weight.grad
    assert (decoder_grad is not None) == ("loss_rec" in active)


def test_all_zero_weights_rejected(tiny_overrides):
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _model(tiny_overrides, global_weight=0, local_weight=0, rec_weight=0)


def test_accumulation_matches_one_big_batch(tiny_overrides):
    """k micro-batches of b (loss / k, centers and teacher updated once) == one batch of k * b."""
    base = _model(tiny_overrides)
    base.global_center.center.normal_()  # non-trivial centers so their use is tested too
    base.patch_center.center.normal_()
    batch = _batch(b=4)
    runs = {}
    for k in (1, 2, 4):
        model = copy.deepcopy(base)
        # SGD, not AdamW: Adam divides by sqrt(v), which turns float-rounding noise on parameters
        # with a ~0 gradient (e.g. attention key biases) into full-size steps.
        opt = torch.optim.SGD(model.student.parameters(), lr=0.1)
        stats = {}
        for micro in _split(batch, k):
            out = model.compute_losses(micro, 0.05, 0.06)
            (out["loss"] / k).backward()
            for name, (s, c) in out["center_stats"].items():
                acc = stats.setdefault(name, [torch.zeros_like(s), torch.zeros(())])
                acc[0] += s
                acc[1] += c
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        opt.step()
        model.update_teacher(0.99)
        model.update_centers({n: tuple(v) for n, v in stats.items()})
        runs[k] = (grads, model)
    ref_grads, ref_model = runs[1]
    for k in (2, 4):
        grads, model = runs[k]
        assert grads.keys() == ref_grads.keys()
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=f"grad {n} (k={k})")
        torch.testing.assert_close(model.global_center.center, ref_model.global_center.center)
        torch.testing.assert_close(model.patch_center.center, ref_model.patch_center.center)
        for (n, a), b in zip(model.teacher.named_parameters(), ref_model.teacher.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"teacher {n} (k={k})")


def test_teacher_moves_only_through_ema(tiny_overrides):
    model = _model(tiny_overrides)
    opt = build_optimizer(model.student, section("optim")["betas"])
    apply_schedule_values(opt, lr=1e-2, weight_decay=0.0)
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    model.compute_losses(_batch(), 0.04, 0.04)["loss"].backward()
    opt.step()
    for a, b in zip(model.teacher.parameters(), teacher_before, strict=True):
        assert torch.equal(a, b)  # an optimiser step alone leaves the teacher untouched
    model.update_teacher(0.5)
    for t, s, b in zip(model.teacher.parameters(), model.student.parameters(), teacher_before, strict=True):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
