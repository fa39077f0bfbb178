"""Throughput of one full VolTA-3D pretraining step, and how close it runs to the machine's limit.

A step is everything the trainer does per optimiser step: both crop sizes through the student, the
teacher on the global views, all losses, backward, AdamW, EMA and center updates (the trainer's own
``train_step`` is timed, on batches already in memory, so data loading is excluded). Achieved FLOP/s
are counted with ``torch.utils.flop_counter`` and divided by the rate of a large matmul timed in the
same process: the fraction of the machine's practical peak the step reaches.

The baseline is the straightforward way the paper ran: one volume per micro-batch with gradient
accumulation, fp32, unfused attention. ``run_patch_sweep`` instead times the same step for several
patch sizes (tokens per view grow as 1 / patch^3: 8x from patch 16 to 8).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from volta3d.config import to_kwargs
from volta3d.config_rules import validate_pretrain_config
from volta3d.data.batched_views import build_views, collate_volumes
from volta3d.engine.distributed import DistInfo
from volta3d.engine.meta_arch import VolTA3D, build_volta3d
from volta3d.engine.optim import build_optimizer
from volta3d.engine.schedules import Schedules
from volta3d.engine.trainer import StepSettings, train_step
from volta3d.errors import InputError


@dataclass(frozen=True)
class StepFigures:
    """Speed of one configuration's pretraining step: seconds, volumes and FLOPs per second, peak memory."""

    name: str
    seconds_per_step: float
    volumes_per_second: float
    flops_per_step: float
    achieved_flops: float
    peak_memory_gb: float


@dataclass(frozen=True)
class PatchFigures:
    """One patch size's step: tokens per global and per local view, and the step's figures."""

    patch_size: int
    global_tokens: int
    local_tokens: int
    step: StepFigures


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
    batch.pop("index")  # (B,): not a view entry; the step does not take it
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
    # view-major entries (V, B, ...) are split over B; 0-dim batch statistics (view overlaps) go to each
    micro = [
        {k: v.chunk(accum, dim=1)[i] if v.ndim > 1 else v for k, v in batch.items()} for i in range(accum)
    ]

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


def _device_batch(cfg: DictConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """One optimiser step's synthetic views (batch_size x accum_steps volumes) on ``device``."""
    batch = _synthetic_batch(cfg, cfg.optim.batch_size * cfg.optim.accum_steps, cfg.seed)
    return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


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
    batch = _device_batch(cfg, device)
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


def _view_tokens(view: torch.Tensor, patch_size: int) -> int:
    """Tokens of one view of a ``(V, B, C, D, H, W)`` batch entry."""
    return math.prod(int(side) // patch_size for side in view.shape[-3:])


def run_patch_sweep(
    cfg: DictConfig, device: torch.device, patch_sizes: Sequence[int], *, steps: int = 3, warmup: int = 1
) -> list[PatchFigures]:
    """The optimised step of ``cfg`` timed once per patch size (same views, fresh model each)."""
    configs = {}
    for p in patch_sizes:  # every size checked as pretraining checks it, before any is timed
        if p < 1:
            raise InputError(f"patch sizes must be >= 1, got {p}")
        configs[p] = cast(DictConfig, OmegaConf.merge(cfg, {"model": {"patch_size": int(p)}}))
        validate_pretrain_config(configs[p])
    rows = []
    for p, pcfg in configs.items():
        torch.manual_seed(cfg.seed)
        batch = _device_batch(pcfg, device)
        model = build_volta3d(to_kwargs(pcfg.model), to_kwargs(pcfg.head), to_kwargs(pcfg.loss)).to(device)
        step = time_step(pcfg, model, batch, device, steps=steps, warmup=warmup, name=f"patch {p}")
        rows.append(
            PatchFigures(int(p), _view_tokens(batch["global"], p), _view_tokens(batch["local"], p), step)
        )
        del model, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_patch_table(rows: Sequence[PatchFigures], device: torch.device, batch: int) -> str:
    """One line per patch size. On CPU the peak is the process's peak RSS so far (never falls row to row)."""
    peak = "peak GB" if device.type == "cuda" else "peak RSS GB"
    lines = [
        f"device {device}, batch {batch} volumes per step",
        f"{'patch':>5} {'tokens/global':>14} {'tokens/local':>13} {'s/step':>8} {'vol/s':>8} {'GFLOP/step':>11} {peak:>12}",
    ]
    for r in rows:
        s = r.step
        lines.append(
            f"{r.patch_size:>5} {r.global_tokens:>14} {r.local_tokens:>13} {s.seconds_per_step:>8.3f} "
            f"{s.volumes_per_second:>8.2f} {s.flops_per_step / 1e9:>11.1f} {s.peak_memory_gb:>12.2f}"
        )
    return "\n".join(lines)


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
    "PatchFigures",
    "StepFigures",
    "constant_schedules",
    "format_patch_table",
    "format_table",
    "matmul_rate",
    "run_benchmark",
    "run_patch_sweep",
    "synthetic_volumes",
    "time_step",
]
