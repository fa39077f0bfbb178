"""KoLeo regulariser: spread a batch of embeddings over the sphere (Sablayrolles et al., ICLR 2019).

DINOv2 adds it to the student's class-token output of each global crop (``koleo_loss_weight`` 0.1 in
its default config). Here it acts on the CLS-style summary, the place where small-batch VolTA-3D runs
collapse: brains look alike globally, and nothing in the distillation losses alone pushes the
summaries of different volumes apart. It is the negative log distance of each embedding to its
nearest neighbour in the batch (the Kozachenko-Leonenko entropy estimator up to constants).

DINOv2 searches the neighbours within one rank's batch only. Here ``gather`` (e.g. an all-gather)
lets each local embedding find its neighbour among every data-parallel rank's embeddings of the same
view, as gathered negatives do in contrastive learning: a remote neighbour is a constant, so the
gradient reaches the local rows only. The micro-batches of gradient accumulation are NOT gathered
(their graphs are gone by then): with accumulation the neighbours come from one micro-batch on every
rank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(
    embeddings: Tensor, eps: float = 1e-8, gather: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """``(n, E) -> ()``: ``-(1/n) sum_i log(min_{j != i} ||x_i - x_j|| + eps)`` on L2-normalised rows.

    i runs over the n local rows, j over all ranks' rows: ``gather`` maps the detached normalised local
    rows to the concatenation over ranks, the local rows first (``all_gather_rows``); None (a single
    process) keeps j local. Needs >= 2 rows in all (a lone vector has no neighbour).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"koleo_loss expects (n, E) embeddings, got shape {tuple(embeddings.shape)}")
    x = F.normalize(embeddings.float(), dim=-1, eps=eps)
    n = x.shape[0]
    remote = x.new_zeros(0, x.shape[1]) if gather is None else gather(x.detach())[n:].to(x.dtype)  # (r, E)
    if n + remote.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs at least 2 embeddings over all ranks, got {n + remote.shape[0]}: "
            "a lone vector has no nearest neighbour"
        )
    candidates = torch.cat([x, remote])  # (n + r, E): local rows keep their graph, remote ones are constants
    with torch.no_grad():  # which neighbour is nearest is a discrete choice: no gradient through it
        similarity = x @ candidates.T  # (n, n + r)
        similarity[:, :n].fill_diagonal_(-2.0)  # a vector is never its own neighbour
        nearest = similarity.argmax(dim=1)  # (n,)
    distances = (x - candidates[nearest]).norm(dim=-1)  # (n,)
    return -torch.log(distances + eps).mean()
