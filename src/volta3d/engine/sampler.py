"""A seeded, epoch-aware, rank-aware sampler that can start mid-epoch.

The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run replays exactly the
batches it had not yet seen, without loading and discarding the ones it had. Each rank takes a
strided slice of each global batch of the same permutation, so ``world_size`` ranks x batch ``b``
see, at every optimiser step, the same set of volumes as one process x batch ``world_size * b``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from volta3d.errors import InputError


class ResumableSampler(Sampler[int]):
    """Index sampler for pretraining that yields this rank's share of each whole global batch, in an
    order fixed by ``(seed, epoch)``.

    Unlike torch's ``DistributedSampler`` it can start mid-epoch (``set_epoch(epoch, start_batch)``), so
    a resumed run continues with exactly the batches it had not seen. ``len`` counts this rank's
    indices from ``start_batch`` on.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise InputError(
                f"the dataset has {dataset_size} volumes, fewer than one global batch "
                f"(optim.batch_size={batch_size} x {world_size} process(es))"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        # Whole global batches only (drop_last): every optimiser step sees the same number of volumes.
        self.batches_per_epoch = dataset_size // global_batch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        global_batch = self.batch_size * self.world_size
        for b in range(self.start_batch, self.batches_per_epoch):
            chunk = order[b * global_batch : (b + 1) * global_batch]
            # rank r takes positions r, r + W, r + 2W, ... of the global batch
            yield from chunk[self.rank :: self.world_size]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
