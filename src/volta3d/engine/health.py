"""Representation health while pretraining: is the method learning, or has it collapsed?

A falling total loss says little about a self-distillation method: the reconstruction term can fall
while the CLS-style summary becomes the same vector for every brain. These statistics, logged every
step, say what the total hides (RankMe: Garrido et al., ICML 2023; entropies: DINO, Caron et al. 2021):

* per branch, the teacher's mean per-sample entropy and the entropy of its batch-mean; their gap is
  the information the targets carry about which sample they came from (0 when every sample gets the
  same target);
* the mean pairwise cosine of the CLS-style embeddings of *different* volumes in the batch;
* the effective rank of the CLS embeddings and of the patch tokens over a rolling buffer of steps.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def mean_entropy(p: Tensor) -> Tensor:
    """Mean entropy (nats) of the distributions along the last dim: (..., K) -> ()."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def entropy_stats(probs: Tensor, prefix: str) -> dict[str, Tensor]:
    """Per-sample entropy, entropy of the batch-mean distribution, and their gap: (..., K) -> scalars."""
    flat = probs.reshape(-1, probs.shape[-1])  # (..., K) -> (M, K)
    per_sample = mean_entropy(flat)
    marginal = mean_entropy(flat.mean(0, keepdim=True))
    return {f"{prefix}entropy": per_sample, f"{prefix}marginal_entropy": marginal,
            f"{prefix}entropy_gap": marginal - per_sample}  # fmt: skip


@torch.no_grad()
def cross_volume_cosine(embeddings: Tensor) -> Tensor:
    """Mean cosine between embeddings of different volumes of the same view: (V, B, E) -> ().

    1 means every volume gets the same embedding; NaN when the batch holds a single volume.
    """
    if embeddings.dim() != 3:
        raise ValueError(f"expected (views, batch, dim) embeddings, got shape {tuple(embeddings.shape)}")
    v, b, _ = embeddings.shape
    if b < 2:
        return embeddings.new_tensor(float("nan"))
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = x @ x.transpose(1, 2)  # (V, B, B)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return similarity[:, off_diagonal].mean()


@torch.no_grad()
def effective_rank(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe: exp of the entropy of the normalised singular values of (n, E) embeddings.

    Between 1 (all embeddings on one line) and min(n, E); computed on the raw (uncentered) embeddings
    as in the RankMe paper.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"expected (n, E) embeddings with n >= 1, got shape {tuple(embeddings.shape)}")
    s = torch.linalg.svdvals(embeddings.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


class RollingRank:
    """Effective rank over the embeddings of the last ``capacity`` rows seen (one step is too few)."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.rows: deque[Tensor] = deque(maxlen=capacity)

    def add(self, embeddings: Tensor) -> float:
        """Add (n, E) rows; return the effective rank of the buffer."""
        self.rows.extend(embeddings.detach().float().cpu().unbind(0))
        return effective_rank(torch.stack(list(self.rows)))


class CollapseMonitor:
    """The collapse alarm: fires when one of the signs below holds for ``patience`` consecutive steps.

    * ``uniform``: the CLS teacher's per-sample entropy above 0.95 log K (DINO's collapse to uniform);
    * ``one prototype``: the entropy of its batch-mean below 0.05 log K (collapse to a constant one-hot);
    * ``same embedding``: the student's CLS-style embeddings of different volumes at a mean cosine above
      ``max_cosine`` (the summary no longer depends on the brain, whatever the head does).
    The alarm is logged once per sign and reported in every row while it holds (``collapse_alarm`` 1).
    """

    def __init__(self, log_k: float, patience: int, logger: Any, max_cosine: float = 0.99) -> None:
        self.log_k, self.patience, self.logger, self.max_cosine = log_k, patience, logger, max_cosine
        self.counts: dict[str, int] = {}
        self.warned: set[str] = set()

    def signs(self, row: Mapping[str, float]) -> list[str]:
        def value(key: str) -> float:
            v = row.get(key, float("nan"))
            return float(v) if v != "" else float("nan")

        found = []
        if value("teacher_entropy") > 0.95 * self.log_k:
            found.append("uniform")
        if value("teacher_marginal_entropy") < 0.05 * self.log_k:
            found.append("one prototype")
        if value("student_cls_cosine") > self.max_cosine:
            found.append("same embedding")
        return found

    def observe(self, step: int, row: Mapping[str, float]) -> int:
        """Update with one step's logged values; return 1 while an alarm holds, else 0."""
        signs = self.signs(row)
        self.counts = {s: self.counts.get(s, 0) + 1 for s in signs}
        firing = [s for s, n in self.counts.items() if n >= self.patience]
        for sign in firing:
            if sign not in self.warned:
                self.warned.add(sign)
                self.logger.warning(
                    "collapse alarm at step %d: %s for %d steps (teacher entropy %.3f, marginal %.3f, log K %.3f, "
                    "student CLS cosine %.4f); see the README's 'Representation health' for remedies",
                    step, sign, self.counts[sign], row.get("teacher_entropy", math.nan),
                    row.get("teacher_marginal_entropy", math.nan), self.log_k, row.get("student_cls_cosine", math.nan),
                )  # fmt: skip
        return int(bool(firing))


class HealthTracker:
    """Adds the rolling effective ranks and the collapse alarm to each logged step's row."""

    def __init__(
        self,
        log_k: float,
        logger: Any,
        *,
        rank_buffer: int,
        collapse_patience: int,
        collapse_max_cosine: float,
    ) -> None:  # the train.* keys of the same names
        self.ranks = {name: RollingRank(rank_buffer) for name in ("cls", "patch")}
        self.alarm = CollapseMonitor(log_k, collapse_patience, logger, collapse_max_cosine)

    def observe(self, step: int, row: dict[str, float], embeddings: Mapping[str, torch.Tensor]) -> None:
        for name, rows in embeddings.items():
            row[f"{name}_rank"] = self.ranks[name].add(rows)
        row["collapse_alarm"] = self.alarm.observe(step, row)
