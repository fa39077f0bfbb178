"""EMA center of the teacher's logits (DINO), the guard against collapse to one prototype.

The center is subtracted from the teacher's logits before sharpening (paper eq. 2 and 4). It is an
exponential moving average of the batch mean of teacher logits. Under gradient accumulation and
data parallelism the engine sums ``batch_stats`` over micro-batches and ranks and calls ``update``
once per optimiser step, so the center is what one big batch would give;
an update per micro-batch would make the EMA decay K times per optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Center(nn.Module):
    """Holds ``center`` (1, K) and updates it as ``m * center + (1 - m) * batch_mean``."""

    center: Tensor

    def __init__(self, out_dim: int, momentum: float) -> None:
        """``momentum``: ``loss.center_momentum``."""
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @staticmethod
    @torch.no_grad()
    def batch_stats(teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
        """Sum and count of the logit vectors, to be accumulated before one ``update``.

        (..., K) -> sum (K,) float32, count () float32 (number of K-vectors summed). Float32 so the
        pair can be all-reduced as is.
        """
        flat = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])  # (..., K) -> (M, K)
        count = torch.tensor(float(flat.shape[0]), device=flat.device)
        return flat.sum(dim=0), count

    @torch.no_grad()
    def update(self, sum_: Tensor, count: Tensor | int) -> None:
        """EMA step with the mean of all logit vectors seen since the last step: sum_ (K,)."""
        count = torch.as_tensor(count, dtype=torch.float32, device=self.center.device)
        if bool(count <= 0):
            raise ValueError("count must be > 0 to update the center")
        batch_mean = sum_.to(self.center.device, torch.float32).reshape(1, -1) / count  # (K,) -> (1, K)
        if batch_mean.shape != self.center.shape:
            raise ValueError(f"sum_ has {batch_mean.shape[1]} entries, the center has {self.center.shape[1]}")
        self.center.mul_(self.momentum).add_(batch_mean.to(self.center.dtype), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: Tensor, temp: float) -> Tensor:
        """Centered, sharpened teacher distribution, float32: (..., K) -> (..., K)."""
        if temp <= 0:
            raise ValueError(f"teacher temperature must be > 0, got {temp}")
        centered = teacher_logits.detach().float() - self.center.float()
        return F.softmax(centered / temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp_probs(
    teacher_logits: Tensor,
    temp: float,
    n_iterations: int,
    reduce_sum: Callable[..., None] | None = None,
    reduce_max: Callable[..., None] | None = None,
) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp instead of an EMA center (SwAV; DINOv2 ``sinkhorn_knopp_teacher``).

    ``(..., K) -> (..., K)`` float32 rows that sum to 1. DINOv2's convention: ``Q = exp(logits / temp)``
    over all M rows of the batch is scaled to total mass 1, then ``n_iterations`` (``loss.sinkhorn_iterations``) times every prototype
    gets mass 1/K over the rows and every row mass 1/M; the result is ``Q * M``. The first prototype step
    sees the raw ``exp``, so a per-row softmax start gives other targets after finitely many iterations.
    The equal partition forbids the same output for every volume, which EMA centering only discourages
    slowly. ``reduce_sum`` and ``reduce_max`` (in place, e.g. all-reduces) extend every sum and the maximum
    over all data-parallel ranks, so the partition is over the whole batch. The single global maximum
    subtracted from the logits cancels in the first normalisation and only prevents overflow
    (``exp(1 / 0.01)`` is inf in float32); float64 because the shifted ``exp(-2 / 0.01)`` is 0 in float32,
    which would zero a whole row (then 0/0). With far fewer rows than prototypes the constraint forces
    near-uniform rows: use a moderate K.
    """
    if temp <= 0:
        raise ValueError(f"teacher temperature must be > 0, got {temp}")
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    all_reduce_sum = reduce_sum if reduce_sum is not None else _no_reduce
    all_reduce_max = reduce_max if reduce_max is not None else _no_reduce
    shape = teacher_logits.shape
    logits = teacher_logits.detach().reshape(-1, shape[-1]).double()  # (..., K) -> (M, K)
    shift = logits.max()
    all_reduce_max(shift)
    q = torch.exp((logits - shift) / temp).T  # (K, M)
    total, n_rows = q.sum(), torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device)
    all_reduce_sum(total, n_rows)
    q /= total  # the whole matrix sums to 1
    k = q.shape[0]
    for _ in range(n_iterations):
        per_prototype = q.sum(dim=1, keepdim=True)  # (K, 1)
        all_reduce_sum(per_prototype)
        q /= per_prototype.clamp_min(torch.finfo(q.dtype).tiny) * k  # every prototype gets mass 1 / K
        q /= q.sum(dim=0, keepdim=True) * n_rows  # every row gets mass 1 / M
    return (q * n_rows).T.reshape(shape).float()  # rows sum to 1


def _no_reduce(*tensors: Tensor) -> None:
    """A single process: nothing to reduce across."""
