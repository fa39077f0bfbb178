"""KoLeo regulariser: spread a batch of embeddings over the sphere (Sablayrolles et al., ICLR 2019).

DINOv2 adds it to the student's class-token output of each global crop (``koleo_loss_weight`` 0.1 in
its default config). Here it acts on the CLS-style summary, the place where small-batch VolTA-3D runs
collapse: brains look alike globally, and nothing in the distillation losses alone pushes the
summaries of different volumes apart. It is the negative log distance of each embedding to its
nearest neighbour in the batch (the Kozachenko-Leonenko entropy estimator up to constants).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def koleo_loss(embeddings: Tensor, eps: float = 1e-8) -> Tensor:
    """``(n, E) -> ()``: ``-(1/n) sum_i log(min_{j != i} ||x_i - x_j|| + eps)`` on L2-normalised rows.

    Needs n >= 2 (a lone vector has no neighbour: zero gradient, as the estimator is undefined).
    """
    if embeddings.dim() != 2:
        raise ValueError(f"koleo_loss expects (n, E) embeddings, got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 embeddings, got {embeddings.shape[0]}")
    x = F.normalize(embeddings.float(), dim=-1, eps=eps)
    with torch.no_grad():  # which neighbour is nearest is a discrete choice: no gradient through it
        similarity = x @ x.T  # (n, n)
        similarity.fill_diagonal_(-2.0)  # a vector is never its own neighbour
        nearest = similarity.argmax(dim=1)  # (n,)
    distances = (x - x[nearest]).norm(dim=-1)  # (n,)
    return -torch.log(distances + eps).mean()
