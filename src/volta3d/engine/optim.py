"""Optimiser set-up and the per-step parameter surgery of the DINO recipe."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn


def param_groups(module: nn.Module) -> list[dict]:
    """Two AdamW groups: weight decay for weight matrices/kernels, none for biases and 1-D
    parameters (norms, learned tokens' scales), as DINO does. Frozen parameters are left out."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "apply_weight_decay": True},
        {"params": no_decay, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


def build_optimizer(module: nn.Module, betas: Sequence[float]) -> torch.optim.AdamW:
    """AdamW over ``module``'s parameter groups with ``optim.betas``."""
    # lr and weight decay are set from the schedules at the top of every step.
    beta1, beta2 = betas
    return torch.optim.AdamW(param_groups(module), lr=0.0, weight_decay=0.0, betas=(beta1, beta2))


def apply_schedule_values(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", True) else 0.0


@torch.no_grad()
def clip_gradients_per_tensor(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """DINO clips each parameter tensor's gradient to ``max_norm`` separately (not the global norm).

    Returns the global gradient norm before clipping, for logging."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)
    return total


def cancel_gradients(params: Iterable[nn.Parameter]) -> None:
    """Drop gradients so AdamW skips these parameters entirely this step (no decay, no moment update):
    DINO's way of freezing the heads' last layers during the first epoch."""
    for p in params:
        p.grad = None
