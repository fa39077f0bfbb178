"""Throughput of one full VolTA-3D pretraining step, and how close it runs to the machine's limit.

A step is everything the trainer does per optimiser step: both crop sizes through the student, the
teacher on the global views, all losses, backward, AdamW, EMA and center updates (the trainer's own
``train_step`` is timed, on batches already in memory, so data loading is excluded). Achieved FLOP/s
are counted with ``torch.utils.flop_counter`` and divided by the rate of a large matmul timed in the
same process: the fraction of the machine's practical peak the step reaches.

The baseline is the straightforward way the paper ran: one volume per micro-batch with gradient
accumulation, fp32, unfused attention.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from volta3d.config import to_kwargs
from volta3d.data.batched_views import build_views, collate_volumes
from volta3d.engine.distributed import DistInfo
from volta3d.engine.meta_arch import VolTA3D, build_volta3d
from volta3d.engine.optim import build_optimizer
from volta3d.engine.schedules import Schedules
from volta3d.engine.trainer import StepSettings, train_step


@dataclass(frozen=True)
class StepFigures:
    """Speed of one configuration's pretraining step: seconds, volumes and FLOPs per second, peak memory."""

    name: str
    seconds_per_step: float
    volumes_per_second: float
    flops_per_step: float
    achieved_flops: float
    peak_memory_gb: float


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an n x n matmul: the practical peak the step is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer reads the work done, not the work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB: the process's peak RSS


def synthetic_volumes(cfg: DictConfig, n: int, seed: int) -> list[torch.Tensor]:
    """n random volumes (1, *preprocess.size) in [0, 1]: view costs do not depend on the content."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, *(int(s) for s in cfg.preprocess.size), generator=g) for _ in range(n)]


def _synthetic_batch(cfg: DictConfig, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Real views (crops, augmentations, GMML) of random volumes: the tensors a step consumes."""
    views = build_views(to_kwargs(cfg.views), to_kwargs(cfg.masking), patch_size=cfg.model.patch_size)
    volumes = synthetic_volumes(cfg, batch_size, seed)
    items = [
        {"image": v, "index": torch.tensor(i), **views.draw(v.shape[1:], seed + i)}
        for i, v in enumerate(volumes)
    ]
    batch = views(collate_volumes(items))
    batch.pop("index")  # (B,): the only entry without a leading view axis
    return batch


def _views_ready(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The in-memory step: its batches are views already."""
    return dict(batch)


def constant_schedules(n: int) -> Schedules:
    ones = np.ones(n)
    return Schedules(
        lr=ones * 1e-5, weight_decay=ones * 0.04, momentum=ones * 0.996, teacher_temp=ones * 0.04,
        teacher_patch_temp=ones * 0.04, freeze_last_layer=np.zeros(n, dtype=bool),
    )  # fmt: skip


def time_step(
    cfg: DictConfig, model: VolTA3D, batch: dict[str, torch.Tensor], device: torch.device, *, steps: int, warmup: int,
    name: str,
) -> StepFigures:  # fmt: skip
    """Seconds per optimiser step of the trainer's own step function on a fixed batch."""
    settings = StepSettings.from_config(cfg, device)
    accum = settings.accum_steps
    micro = [{k: v.chunk(accum, dim=1)[i] for k, v in batch.items()} for i in range(accum)]

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield from micro

    optimizer = build_optimizer(model.student, cfg.optim.betas)
    schedules = constant_schedules(steps + warmup + 1)
    it = batches()
    info = DistInfo()

    def one(step: int) -> None:
        train_step(model, model.student, optimizer, schedules, step, it, device, info, _views_ready, settings)

    with FlopCounterMode(display=False) as counter:
        one(0)
    flops = float(counter.get_total_flops())
    for i in range(warmup):
        one(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        one(i)
    sync(device)
    seconds = (time.perf_counter() - t0) / steps
    volumes = batch["global"].shape[1]
    return StepFigures(name, seconds, volumes / seconds, flops, flops / seconds, _peak_memory_gb(device))


def run_benchmark(
    cfg: DictConfig,
    device: torch.device,
    *,
    steps: int = 3,
    warmup: int = 1,
    baseline: bool = True,
    matmul_size: int = 2048,
) -> dict[str, Any]:
    """Time the optimised step and (optionally) the straightforward one; returns figures and the peak."""
    torch.manual_seed(cfg.seed)
    batch_size = cfg.optim.batch_size * cfg.optim.accum_steps
    batch = {
        k: v.to(device) for k, v in _synthetic_batch(cfg, batch_size, cfg.seed).items() if torch.is_tensor(v)
    }
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    peak = matmul_rate(device, torch.bfloat16 if bf16 else torch.float32, n=matmul_size)
    model = build_volta3d(to_kwargs(cfg.model), to_kwargs(cfg.head), to_kwargs(cfg.loss)).to(device)
    results = [time_step(cfg, model, batch, device, steps=steps, warmup=warmup, name="volta3d")]
    if baseline:
        # The paper's way: batch 1 x accumulation B, fp32, MONAI's unfused einsum attention, and the
        # paper's losses (KoLeo compares volumes within a micro-batch: undefined at batch 1).
        naive_cfg = cast(
            DictConfig,
            OmegaConf.merge(
                cfg, {"optim": {"batch_size": 1, "accum_steps": batch_size}, "train": {"precision": "fp32"}}
            ),
        )
        model.koleo_weight = 0.0
        model.student.encoder.set_fused_attention(False)
        model.teacher.encoder.set_fused_attention(False)
        results.append(
            time_step(naive_cfg, model, batch, device, steps=steps, warmup=warmup, name="straightforward")
        )
    params = sum(p.numel() for p in model.student.parameters())
    return {
        "peak_flops": peak, "precision": "bf16" if bf16 else "fp32", "batch": batch_size, "params": params,
        "results": results,
    }  # fmt: skip


def format_table(report: dict[str, Any], device: torch.device) -> str:
    lines = [
        f"device {device}, {report['precision']} matmul rate {report['peak_flops'] / 1e9:.1f} GFLOP/s, "
        f"batch {report['batch']} volumes, student {report['params'] / 1e6:.1f} M parameters",
        f"{'implementation':<16} {'s/step':>8} {'vol/s':>8} {'GFLOP/step':>11} {'GFLOP/s':>9} {'of matmul':>10} {'peak GB':>8}",
    ]
    for r in report["results"]:
        lines.append(
            f"{r.name:<16} {r.seconds_per_step:>8.3f} {r.volumes_per_second:>8.2f} {r.flops_per_step / 1e9:>11.1f} "
            f"{r.achieved_flops / 1e9:>9.1f} {r.achieved_flops / report['peak_flops']:>10.2f} {r.peak_memory_gb:>8.2f}"
        )
    if len(report["results"]) == 2:
        fast, naive = report["results"]
        lines.append(
            f"speed-up over the straightforward step: {naive.seconds_per_step / fast.seconds_per_step:.2f}x"
        )
    return "\n".join(lines)


__all__ = [
    "StepFigures",
    "constant_schedules",
    "format_table",
    "matmul_rate",
    "run_benchmark",
    "synthetic_volumes",
    "time_step",
]
