"""EMA teacher update (DINO): teacher <- m * teacher + (1 - m) * student, parameters and buffers alike
except the loss centers, which have their own update rule."""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float) -> None:
    """In-place, fused over all tensors. Call only after a real optimiser step: under gradient
    accumulation one call per micro-batch would move the teacher K times per step."""
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    torch._foreach_mul_(list(teacher), momentum)
    torch._foreach_add_(list(teacher), list(student), alpha=1.0 - momentum)
