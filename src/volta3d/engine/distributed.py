"""Process-group helpers. Every collective is guarded, so one CPU process runs the same code
without ``torch.distributed`` being initialised (DINO's ``main_dino.py`` and iBOT's
``main_ibot.py`` call ``dist.all_reduce`` unconditionally, so they need a process group even on one CPU)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group; the defaults (rank 0 of 1) describe a single process,
    so code can use it without checking whether ``torch.distributed`` is initialised."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set): NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    """Sum in place across ranks; a no-op in a single process."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_reduce_max(*tensors: torch.Tensor) -> None:
    """Element-wise maximum in place across ranks; a no-op in a single process."""
    if is_distributed():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's ``(n, ...)`` rows concatenated, this rank's first, then the following ranks
    cyclically; ``rows`` itself in a single process. No gradient flows through the gathered copies.
    Every rank must pass the same shape (the sampler gives each rank the same micro-batch size)."""
    if not is_distributed():
        return rows
    parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, rows.contiguous())
    rank = dist.get_rank()
    return torch.cat(parts[rank:] + parts[:rank])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group while the interpreter is fully alive. The DDP wrapper and its reducer
    hold the group and sit in reference cycles, so they are collected first: otherwise the group (and
    gloo's worker threads) can outlive ``destroy_process_group`` and be torn down during interpreter
    finalization, which intermittently aborts the process ("terminate called without an active
    exception") after a finished run."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
