"""PatchDistillationLoss (paper eq. 4-5) against a loop implementation written from the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from volta3d.losses import PatchDistillationLoss


def _token_ce(p_t: np.ndarray, s: np.ndarray, temp: float) -> float:
    scaled = [float(v) / temp for v in s]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return -sum(float(p_t[k]) * (scaled[k] - log_z) for k in range(len(scaled)))


def _reference(student: np.ndarray, teacher: np.ndarray, temp: float, weight: np.ndarray | None) -> float:
    """Per volume: weighted mean of token cross-entropies; volumes with no weight are left out."""
    per_volume = []
    for b in range(student.shape[0]):
        ws = [1.0] * student.shape[1] if weight is None else [float(w) for w in weight[b]]
        if sum(ws) == 0:
            continue
        total = sum(ws[n] * _token_ce(teacher[b, n], student[b, n], temp) for n in range(student.shape[1]))
        per_volume.append(total / sum(ws))
    return sum(per_volume) / len(per_volume) if per_volume else 0.0


def _inputs(seed: int, b: int = 3, n: int = 8, k: int = 6):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(b, n, k, generator=gen) * 2
    teacher = torch.softmax(torch.randn(b, n, k, generator=gen) / 0.3, dim=-1)
    return student, teacher


def test_unweighted_value_matches_reference():
    student, teacher = _inputs(0)
    loss = PatchDistillationLoss()(student, teacher, student_temp=0.1)
    assert loss.item() == pytest.approx(_reference(student.numpy(), teacher.numpy(), 0.1, None), rel=1e-5)


def test_weighted_value_matches_reference_and_skips_empty_volumes():
    student, teacher = _inputs(1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1], [0] * 8, [1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    loss = PatchDistillationLoss()(student, teacher, 0.1, token_weight=mask)
    assert loss.item() == pytest.approx(
        _reference(student.numpy(), teacher.numpy(), 0.1, mask.numpy()), rel=1e-5
    )
    fractional = torch.rand(3, 8, generator=torch.Generator().manual_seed(5))
    loss = PatchDistillationLoss()(student, teacher, 0.1, token_weight=fractional)
    assert loss.item() == pytest.approx(
        _reference(student.numpy(), teacher.numpy(), 0.1, fractional.numpy()), rel=1e-5
    )


def test_masked_tokens_only_ignore_unmasked_student_tokens():
    student, teacher = _inputs(2)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True
    changed = student.clone()
    changed[:, 4:] = torch.randn(3, 4, 6) * 10
    loss = PatchDistillationLoss()
    assert loss(student, teacher, 0.1, mask).item() == pytest.approx(
        loss(changed, teacher, 0.1, mask).item(), rel=1e-6
    )


def test_gradient_matches_analytic_form():
    """dL/ds[b, n] = w[b, n] / (W_b * B_valid) * (softmax(s[b, n] / tau) - p_t[b, n]) / tau."""
    student, teacher = _inputs(3)
    tau = 0.2
    weight = torch.tensor([[1.0] * 8, [0.5, 0, 0, 2, 0, 0, 0, 1], [0.0] * 8])
    for token_weight in (None, weight):
        leaf = student.clone().requires_grad_(True)
        PatchDistillationLoss()(leaf, teacher, tau, token_weight).backward()
        w = torch.ones(3, 8) if token_weight is None else token_weight
        w_sum = w.sum(-1, keepdim=True)
        n_valid = int((w_sum > 0).sum())
        scale = torch.where(w_sum > 0, w / w_sum.clamp(min=1e-12), torch.zeros_like(w)) / n_valid
        analytic = scale.unsqueeze(-1) * (torch.softmax(student / tau, -1) - teacher) / tau
        torch.testing.assert_close(leaf.grad, analytic, rtol=1e-4, atol=1e-7)


def test_no_weight_at_all_gives_zero_and_a_zero_gradient():
    student, teacher = _inputs(4)
    leaf = student.clone().requires_grad_(True)
    loss = PatchDistillationLoss()(leaf, teacher, 0.1, torch.zeros(3, 8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(leaf.grad, torch.zeros_like(student))


def test_literal_value_for_uniform_logits():
    """Uniform student logits: every token's cross-entropy is log K, so with K = 6 the loss is
    log(6) = 1.7917595 for any teacher and any non-empty weighting."""
    _, teacher = _inputs(5)
    loss = PatchDistillationLoss()(torch.zeros(3, 8, 6), teacher, 0.1, torch.ones(3, 8))
    assert loss.item() == pytest.approx(1.7917595, abs=1e-6)


def test_extreme_bf16_logits_give_finite_loss_and_grad():
    student = (torch.randn(2, 4, 5) * 3e4).to(torch.bfloat16).requires_grad_(True)
    teacher = torch.softmax(torch.randn(2, 4, 5) * 1e4, dim=-1)
    loss = PatchDistillationLoss()(student, teacher, 0.1, torch.ones(2, 4, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad.float()).all()


@pytest.mark.parametrize(
    ("student_shape", "weight_shape", "temp", "message"),
    [
        ((2, 4, 5), None, 0.0, "student_temp must be > 0"),
        ((2, 3, 5), None, 0.1, "must both be"),
        ((2, 4, 5), (2, 3), 0.1, r"token_weight has shape \(2, 3\), expected \(B, N\) = \(2, 4\)"),
    ],
)
def test_bad_inputs_raise(student_shape, weight_shape, temp, message):
    weight = None if weight_shape is None else torch.ones(weight_shape)
    with pytest.raises(ValueError, match=message):
        PatchDistillationLoss()(torch.zeros(student_shape), torch.full((2, 4, 5), 0.2), temp, weight)
