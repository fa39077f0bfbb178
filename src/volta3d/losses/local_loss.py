"""Patch-token self-distillation between teacher and student, paper eq. 4-5 (iBOT's patch loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchDistillationLoss(nn.Module):
    """Per-token cross-entropy H(P_t, P_s), averaged over a volume's tokens, then over volumes.

    Called per global view: teacher tokens of clean view i against student tokens of masked view i
    (same crop, so token n of both covers the same 3D patch). With ``token_weight`` (e.g. the
    masked-token mask, iBOT) the token average is weighted; a volume whose weights sum to 0 is left
    out of the batch average, and a batch with no weight at all gives 0 (still differentiable).
    """

    def forward(
        self,
        student_patch_logits: Tensor,
        teacher_patch_probs: Tensor,
        student_temp: float,
        token_weight: Tensor | None = None,
    ) -> Tensor:
        """student_patch_logits (B, N, K), teacher_patch_probs (B, N, K), token_weight (B, N) -> ()."""
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        if student_patch_logits.dim() != 3 or student_patch_logits.shape != teacher_patch_probs.shape:
            raise ValueError(
                f"student_patch_logits {tuple(student_patch_logits.shape)} and teacher_patch_probs "
                f"{tuple(teacher_patch_probs.shape)} must both be (B, N, K)"
            )
        log_p_student = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
        # (B, N, K) -> (B, N)
        token_ce = torch.sum(-teacher_patch_probs.detach().float() * log_p_student, dim=-1)
        if token_weight is None:
            return token_ce.mean(dim=-1).mean()  # (B, N) -> (B,) -> ()
        if token_weight.shape != token_ce.shape:
            raise ValueError(
                f"token_weight has shape {tuple(token_weight.shape)}, expected (B, N) = {tuple(token_ce.shape)}"
            )
        weight = token_weight.detach().to(token_ce.dtype)
        weight_sum = weight.sum(dim=-1)  # (B,)
        has_weight = weight_sum > 0
        per_volume = (token_ce * weight).sum(dim=-1) / weight_sum.clamp(
            min=torch.finfo(weight_sum.dtype).tiny
        )
        n_volumes = has_weight.sum().clamp(min=1)
        # volumes without weight have per_volume == 0 exactly (0 / tiny); exclude them from the mean
        return torch.where(has_weight, per_volume, torch.zeros_like(per_volume)).sum() / n_volumes
