"""CLS-style token self-distillation across views, paper eq. 2-3 (DINO's multi-crop loss)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GlobalDistillationLoss(nn.Module):
    """Mean cross-entropy H(P_t_i, P_s_j) over every teacher global view i and student view j != i.

    Student views are ordered global views first, then local views, so teacher view i and student
    view i are the same crop and that pair is skipped (a view is never distilled into itself).
    Softmax is taken in float32 so bf16 logits neither overflow nor lose the sharpened tail.
    """

    def forward(
        self,
        student_logits: Sequence[Tensor],
        teacher_probs: Sequence[Tensor],
        student_temp: float,
    ) -> Tensor:
        """student_logits: n_views x (B, K) logits; teacher_probs: n_global x (B, K) probabilities."""
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if len(teacher_probs) > len(student_logits):
            raise ValueError(
                f"got {len(teacher_probs)} teacher views but only {len(student_logits)} student views; "
                "student views must start with the same global views"
            )
        if len(student_logits) < 2 or len(teacher_probs) < 1:
            raise ValueError("need at least one teacher view and one other student view to form a pair")
        # (B, K) per view, log-probabilities of the sharpened student
        student_log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
        total = torch.zeros((), device=student_log_probs[0].device)
        n_pairs = 0
        for i, p_teacher in enumerate(teacher_probs):
            p_teacher = p_teacher.detach().float()
            for j, log_p_student in enumerate(student_log_probs):
                if j == i:
                    continue
                if p_teacher.shape != log_p_student.shape:
                    raise ValueError(
                        f"teacher view {i} has shape {tuple(p_teacher.shape)}, "
                        f"student view {j} has {tuple(log_p_student.shape)}"
                    )
                # (B, K) -> (B,) -> ()
                total = total + torch.sum(-p_teacher * log_p_student, dim=-1).mean()
                n_pairs += 1
        return total / n_pairs
