"""GlobalDistillationLoss (paper eq. 2-3) against a loop implementation written from the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from volta3d.losses import GlobalDistillationLoss


def _log_softmax_loop(row: np.ndarray, temp: float) -> list[float]:
    scaled = [float(v) / temp for v in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_z for v in scaled]


def _reference(student: list[np.ndarray], teacher: list[np.ndarray], temp: float) -> float:
    """Eq. 3: average over pairs (i, j), j != i, of eq. 2 averaged over the batch."""
    pair_losses = []
    for i, p_t in enumerate(teacher):
        for j, s in enumerate(student):
            if j == i:
                continue
            per_sample = []
            for b in range(s.shape[0]):
                log_p_s = _log_softmax_loop(s[b], temp)
                per_sample.append(-sum(p_t[b, k] * log_p_s[k] for k in range(s.shape[1])))
            pair_losses.append(sum(per_sample) / len(per_sample))
    return sum(pair_losses) / len(pair_losses)


def _views(seed: int, n_views: int = 5, batch: int = 3, k: int = 7):
    gen = torch.Generator().manual_seed(seed)
    student = [torch.randn(batch, k, generator=gen, dtype=torch.float64) * 2 for _ in range(n_views)]
    teacher = [
        torch.softmax(torch.randn(batch, k, generator=gen, dtype=torch.float64) / 0.5, -1) for _ in range(2)
    ]
    return student, teacher


def test_value_matches_reference():
    student, teacher = _views(0)
    loss = GlobalDistillationLoss()(student, teacher, student_temp=0.1)
    expected = _reference([s.numpy() for s in student], [t.numpy() for t in teacher], 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_matches_analytic_form():
    """dL/ds_j = sum_{i != j} (softmax(s_j / tau) - p_t_i) / (tau * B * n_pairs)."""
    student, teacher = _views(1)
    tau, batch = 0.1, student[0].shape[0]
    leaves = [s.clone().requires_grad_(True) for s in student]
    GlobalDistillationLoss()(leaves, teacher, student_temp=tau).backward()
    n_pairs = len(teacher) * (len(student) - 1)
    for j, (s, leaf) in enumerate(zip(student, leaves, strict=True)):
        p_s = torch.softmax(s.float() / tau, dim=-1).double()
        analytic = sum((p_s - p_t) for i, p_t in enumerate(teacher) if i != j) / (tau * batch * n_pairs)
        torch.testing.assert_close(leaf.grad, analytic, rtol=1e-4, atol=1e-6)


def test_a_view_is_not_distilled_into_itself():
    """Teacher view i equals student view i exactly: only the pairs j != i may enter the loss."""
    student, _ = _views(2, n_views=3)
    tau = 0.1
    teacher = [torch.softmax(student[i] / tau, dim=-1) for i in range(2)]  # identical to student 0 and 1
    loss = GlobalDistillationLoss()(student, teacher, student_temp=tau).item()
    s_np, t_np = [s.numpy() for s in student], [t.numpy() for t in teacher]
    kept = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(_pair(t_np[i], s_np[j], tau) for i, j in kept) / 4
    with_self = (expected * 4 + _pair(t_np[0], s_np[0], tau) + _pair(t_np[1], s_np[1], tau)) / 6
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(loss - with_self) > 1e-3


def _pair(p_t: np.ndarray, s: np.ndarray, tau: float) -> float:
    return sum(-float(np.dot(p_t[b], _log_softmax_loop(s[b], tau))) for b in range(s.shape[0])) / s.shape[0]


def test_only_global_views_gives_two_pairs():
    student, teacher = _views(3, n_views=2)
    loss = GlobalDistillationLoss()(student, teacher, student_temp=0.2).item()
    s_np, t_np = [s.numpy() for s in student], [t.numpy() for t in teacher]
    assert loss == pytest.approx((_pair(t_np[0], s_np[1], 0.2) + _pair(t_np[1], s_np[0], 0.2)) / 2, rel=1e-5)


def test_literal_value_for_uniform_logits():
    """Uniform student logits give log_softmax = -log K for every class, so each pair's cross-entropy
    is log K whatever the teacher: with K = 4 the loss is log(4) = 1.3862944."""
    student = [torch.zeros(2, 4) for _ in range(4)]
    teacher = [torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]])] * 2
    assert GlobalDistillationLoss()(student, teacher, 0.1).item() == pytest.approx(1.3862944, abs=1e-6)


def test_extreme_bf16_logits_give_finite_loss_and_grad():
    student = [
        torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 1.0]], dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    ]
    teacher = [torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])] * 2
    loss = GlobalDistillationLoss()(student, teacher, student_temp=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(s.grad.float()).all() for s in student)


@pytest.mark.parametrize(
    ("n_student", "n_teacher", "temp", "message"),
    [
        (1, 2, 0.1, "got 2 teacher views but only 1 student views"),
        (1, 1, 0.1, "need at least one teacher view and one other student view"),
        (3, 2, 0.0, "student_temp must be > 0"),
    ],
)
def test_bad_inputs_raise(n_student, n_teacher, temp, message):
    student = [torch.zeros(1, 3)] * n_student
    teacher = [torch.full((1, 3), 1 / 3)] * n_teacher
    with pytest.raises(ValueError, match=message):
        GlobalDistillationLoss()(student, teacher, temp)


def test_shape_mismatch_names_the_views():
    with pytest.raises(ValueError, match="teacher view 0 has shape"):
        GlobalDistillationLoss()([torch.zeros(1, 3), torch.zeros(1, 4)], [torch.full((1, 3), 1 / 3)], 0.1)
