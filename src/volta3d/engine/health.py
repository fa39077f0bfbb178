"""Representation health while pretraining: is the method learning, or has it collapsed?

A falling total loss says little about a self-distillation method: the reconstruction term can fall
while the CLS-style summary becomes the same vector for every brain. These statistics, logged every
step, say what the total hides (RankMe: Garrido et al., ICML 2023; entropies: DINO, Caron et al. 2021):

* per branch, the teacher's mean per-sample entropy, the entropy of its batch mean, and the entropy
  gap on per-volume targets (each volume's distribution averaged over its views, and tokens): the
  mutual information between the volume and its target, 0 when every volume gets the same target
  and at most log B (B volumes in the micro-batch);
* for the CLS-style branch, how often the two global views of a volume get the same top prototype;
* the mean pairwise cosine of the CLS-style embeddings of *different* volumes, and their centred
  spread (SimSiam's collapse monitor), on a scale where 1 is an isotropic distribution;
* the effective rank of the CLS embeddings and of the patch tokens over a rolling buffer of steps,
  beside its ceiling.

``CollapseMonitor`` turns them into an alarm.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def mean_entropy(p: Tensor) -> Tensor:
    """Mean entropy (nats) of the distributions along the last dim: (..., K) -> ()."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


def per_volume(probs: Tensor, n_views: int) -> Tensor:
    """Each volume's distribution averaged over its views (and tokens): (V*B, [N,] K) -> (B, K).

    Rows are view-major, as the views are batched: rows [0:B] are view 0, rows [B:2B] view 1, ...
    """
    if n_views < 1 or probs.shape[0] % n_views:
        raise ValueError(f"{probs.shape[0]} rows do not split into {n_views} views")
    by_volume = probs.unflatten(0, (n_views, -1)).transpose(0, 1)  # (B, V, [N,] K)
    return by_volume.flatten(1, -2).mean(1)  # (B, V[*N], K) -> (B, K)


def entropy_stats(probs: Tensor, prefix: str, n_views: int) -> dict[str, Tensor]:
    """The teacher's entropies on view-major (V*B, [N,] K) targets -> scalars.

    ``entropy``: mean per-sample (per-token) entropy; ``marginal_entropy``: entropy of the batch mean;
    ``entropy_gap``: marginal minus the mean entropy of the per-volume targets (``per_volume``), the
    mutual information between a volume and its target, in [0, log B]. Averaging the views first
    keeps two views that disagree from reading as more information about the volume (over all V*B
    rows the gap could reach log(V*B)); view agreement is ``view_agreement``'s. NaN gap for B = 1.
    """
    probs = probs.float()
    volumes = per_volume(probs, n_views)  # (B, K)
    per_sample = mean_entropy(probs.reshape(-1, probs.shape[-1]))
    marginal = mean_entropy(volumes.mean(0))  # volumes hold equal numbers of rows: the mean of all rows
    gap = marginal - mean_entropy(volumes) if volumes.shape[0] > 1 else marginal.new_tensor(math.nan)
    return {
        f"{prefix}entropy": per_sample,
        f"{prefix}marginal_entropy": marginal,
        f"{prefix}entropy_gap": gap,
    }


@torch.no_grad()
def view_agreement(probs: Tensor, n_views: int) -> Tensor:
    """Share of volumes whose global views get the same top prototype: (V*B, K) view-major -> ().

    Averaged over pairs of views; NaN for one view. 1: the targets are invariant to the view (as DINO
    trains them to be), or collapsed (read it beside the entropy gap); near the chance level
    sum_k m_k^2 (m: the marginal) the two views of a volume get unrelated targets.
    """
    if probs.dim() != 2:
        raise ValueError(f"expected (views * batch, K) probabilities, got shape {tuple(probs.shape)}")
    top = probs.argmax(-1).unflatten(0, (n_views, -1))  # (V, B)
    pairs = [(top[i] == top[j]).float().mean() for i, j in itertools.combinations(range(n_views), 2)]
    return torch.stack(pairs).mean() if pairs else probs.new_tensor(math.nan)


def _check_views_batch(embeddings: Tensor) -> None:
    if embeddings.dim() != 3:
        raise ValueError(f"expected (views, batch, dim) embeddings, got shape {tuple(embeddings.shape)}")


@torch.no_grad()
def cross_volume_cosine(embeddings: Tensor) -> Tensor:
    """Mean cosine between embeddings of different volumes of the same view: (V, B, E) -> ().

    1 means every volume gets the same embedding; NaN when the batch holds a single volume.
    """
    _check_views_batch(embeddings)
    v, b, _ = embeddings.shape
    if b < 2:
        return embeddings.new_tensor(float("nan"))
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    similarity = x @ x.transpose(1, 2)  # (V, B, B)
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return similarity[:, off_diagonal].mean()


@torch.no_grad()
def cls_spread(embeddings: Tensor) -> Tensor:
    """Centred spread of (V, B, E) embeddings: the per-dimension std across the B volumes of the
    L2-normalised embeddings, averaged over dimensions and views, times sqrt(E) -> ().

    SimSiam's (Chen & He 2021) collapse monitor, as DINOv2-3D-Med logs it: 0 when every volume gets
    the same embedding, about 1 for directions drawn isotropically (each coordinate's std is then
    1/sqrt(E)); NaN for a single volume. For unit vectors the summed per-dimension variance (across
    volumes, unbiased) is exactly 1 - the mean pairwise cosine, so spread <= sqrt(1 - cosine), with
    equality when the variation is shared evenly by the dimensions: what the spread adds to the
    cosine is how many dimensions the volumes vary along (variation confined to a few reads low).
    """
    _check_views_batch(embeddings)
    if embeddings.shape[1] < 2:
        return embeddings.new_tensor(float("nan"))
    x = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    return x.std(dim=1).mean() * math.sqrt(x.shape[-1])


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

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.rows: deque[Tensor] = deque(maxlen=capacity)

    def add(self, embeddings: Tensor) -> float:
        """Add (n, E) rows; return the effective rank of the buffer."""
        self.rows.extend(embeddings.detach().float().cpu().unbind(0))
        return effective_rank(torch.stack(list(self.rows)))

    @property
    def ceiling(self) -> int:
        """The largest effective rank the buffer allows: min(rows held, embedding dim); 0 when empty."""
        return min(len(self.rows), self.rows[0].shape[0]) if self.rows else 0


GAP_MIN = 0.05  # nats: below what one volume of up to ~100 on a target of its own gives (h(1/B))
RANK_MIN = 2.5  # between a 2-D embedding (RankMe <= 2) and an even 3-D one (3)
RANK_MIN_CEILING = 8  # the rank sign waits for a buffer that allows a rank of at least 8
SPREAD_MIN = 0.05  # cls_spread's scale: 1 = isotropic; 0.05 = 5 % of an isotropic per-dimension std
UNIFORM_SHARE = 0.95  # of log K


def _number(value: Any) -> float:
    return math.nan if value is None or value == "" else float(value)


class CollapseMonitor:
    """The collapse alarm: fires when one of the signs below holds for ``patience`` consecutive steps.

    * ``uniform``: the CLS teacher's per-sample entropy above 0.95 log K (DINO's collapse to uniform;
      only reachable at a high teacher temperature, where it names the remedy);
    * ``targets ignore the volume``: the CLS branch's per-volume entropy gap (``entropy_stats``) below
      ``GAP_MIN``: every volume gets the same target, whether one prototype, a fixed mixture of a few, or
      uniform; ``patch targets ignore the token``: the same for the patch branch's per-token gap. Two
      clusters of volumes (half on one prototype, half on another) still carry one bit, log 2 = 0.69
      nats, about the volume: not this sign, but the rank sign's if the embedding behind them is 2-D;
    * ``low rank``: the teacher CLS effective rank (RankMe) below ``RANK_MIN`` while its ceiling is at
      least ``RANK_MIN_CEILING``: the summaries span two directions or fewer;
    * ``no spread``: the teacher's centred CLS spread (``cls_spread``) below ``SPREAD_MIN``;
    * ``same embedding``: the student's CLS-style embeddings of different volumes at a mean cosine above
      ``max_cosine`` (what a KoLeo term pushes down, hence the teacher-side signs above).
    Signs whose columns are missing or NaN (a branch switched off, one volume per micro-batch) never
    hold. The alarm is logged once per sign and reported in every row while it holds (``collapse_alarm`` 1).
    """

    def __init__(self, log_k: float, patience: int, logger: Any, max_cosine: float) -> None:
        self.log_k, self.patience, self.logger, self.max_cosine = log_k, patience, logger, max_cosine
        self.counts: dict[str, int] = {}
        self.warned: set[str] = set()

    def signs(self, row: Mapping[str, Any]) -> dict[str, str]:
        """The signs that hold in ``row``: sign -> the values behind it, for the log."""
        rank_ceiling = _number(row.get("cls_rank_max"))
        rules = [  # sign, column, "<" or ">", threshold, what the threshold is
            ("uniform", "teacher_entropy", ">", UNIFORM_SHARE * self.log_k, f"{UNIFORM_SHARE} log K"),
            ("targets ignore the volume", "teacher_entropy_gap", "<", GAP_MIN, "nats"),
            ("patch targets ignore the token", "teacher_patch_entropy_gap", "<", GAP_MIN, "nats"),
            ("low rank", "cls_rank", "<", RANK_MIN if rank_ceiling >= RANK_MIN_CEILING else -math.inf,
             f"cls_rank_max {rank_ceiling:.0f}"),
            ("no spread", "teacher_cls_spread", "<", SPREAD_MIN, "1 = isotropic"),
            ("same embedding", "student_cls_cosine", ">", self.max_cosine, "train.collapse_max_cosine"),
        ]  # fmt: skip
        found = {}
        for sign, column, op, limit, note in rules:
            x = _number(row.get(column))
            if (x < limit) if op == "<" else (x > limit):  # NaN (not logged) never holds
                found[sign] = f"{column} {x:.4g} {op} {limit:.4g}, {note}"
        return found

    def observe(self, step: int, row: Mapping[str, Any]) -> int:
        """Update with one step's logged values; return 1 while an alarm holds, else 0."""
        signs = self.signs(row)
        self.counts = {s: self.counts.get(s, 0) + 1 for s in signs}
        firing = [s for s, n in self.counts.items() if n >= self.patience]
        for sign in firing:
            if sign not in self.warned:
                self.warned.add(sign)
                self.logger.warning(
                    "collapse alarm at step %d: %s for %d steps (%s); see docs/health.md, 'Representation "
                    "health' for remedies", step, sign, self.counts[sign], signs[sign],
                )  # fmt: skip
        return int(bool(firing))


class HealthTracker:
    """Adds the rolling effective ranks, their ceilings and the collapse alarm to each step's row."""

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
            row[f"{name}_rank_max"] = self.ranks[name].ceiling
        row["collapse_alarm"] = self.alarm.observe(step, row)
