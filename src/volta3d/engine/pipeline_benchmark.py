"""What the pretraining data pipeline costs, and how many CPU cores it needs to keep a step busy.

Three figures per volume, each on one CPU thread: the per-volume MONAI reference path
(``MultiCropViews``: crops, resize, flips, intensity changes, GMML in a DataLoader worker), the
DataLoader's share of the batched path (``PretrainVolumesDataset``: read the cached volume, draw the
crop parameters) and the batched views themselves (``BatchedMultiCrop`` on the benchmark device; on
a GPU they cost the CPU only kernel launches). With ``--data``, the end-to-end step: real loading
from the cache with the configured workers, views on the device, the trainer's step.

Cores needed = CPU seconds per volume x volumes per step / seconds per step, for the step measured
here and for a GPU step estimated from its FLOP count at an assumed achieved rate.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from volta3d.config import to_kwargs
from volta3d.data.batched_views import PretrainVolumesDataset, build_views, collate_volumes, move_batch
from volta3d.data.dataset import VolumeDataset, read_manifest
from volta3d.data.masking import GMMLMasker
from volta3d.data.views import MultiCropViews
from volta3d.engine.benchmark import constant_schedules, sync, synthetic_volumes
from volta3d.engine.distributed import DistInfo
from volta3d.engine.meta_arch import build_volta3d
from volta3d.engine.optim import build_optimizer
from volta3d.engine.trainer import StepSettings, build_pretrain_loader, train_step


@dataclass(frozen=True)
class PipelineFigures:
    views_per_volume: int
    reference_seconds: float  # per volume, MONAI per-volume views, one thread
    batched_seconds: float  # per volume, BatchedMultiCrop on the benchmark device (one thread on a CPU)
    draw_seconds: float  # per volume, the DataLoader's crop-parameter draw
    load_seconds: float | None  # per volume, reading the cache (with --data)
    end_to_end_seconds_per_step: float | None  # with --data


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Time CPU work per core: intra-op threads would hide how much CPU it takes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_views(
    cfg: DictConfig, device: torch.device, n_volumes: int, seed: int
) -> tuple[float, float, float]:
    """Seconds per volume of the reference views, the batched views and the parameter draw."""
    masking = GMMLMasker(**to_kwargs(cfg.masking), patch_size=cfg.model.patch_size)
    reference = MultiCropViews(masker=masking, **to_kwargs(cfg.views))
    batched = build_views(to_kwargs(cfg.views), to_kwargs(cfg.masking), patch_size=cfg.model.patch_size)
    volumes = synthetic_volumes(cfg, n_volumes, seed)
    with one_thread():
        t0 = time.perf_counter()
        for i, volume in enumerate(volumes):
            reference(volume, seed=seed + i)
        t_reference = time.perf_counter() - t0
        t0 = time.perf_counter()
        items = [{"image": v, "index": torch.tensor(i), **batched.draw(v.shape[1:], seed + i)}
                 for i, v in enumerate(volumes)]  # fmt: skip
        t_draw = time.perf_counter() - t0
        batch = move_batch(collate_volumes(items), device)
        batched(batch)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        batched(batch)
        sync(device)
        t_batched = time.perf_counter() - t0
    return t_reference / n_volumes, t_batched / n_volumes, t_draw / n_volumes


def time_loading(cfg: DictConfig, data: Path, n_volumes: int) -> float:
    """Seconds per volume to read a cached volume and draw its crop parameters (one DataLoader item)."""
    views = build_views(to_kwargs(cfg.views), to_kwargs(cfg.masking), patch_size=cfg.model.patch_size)
    dataset = PretrainVolumesDataset(VolumeDataset(read_manifest(data)), views, base_seed=cfg.seed)
    n = min(n_volumes, len(dataset))
    with one_thread():
        t0 = time.perf_counter()
        for i in range(n):
            dataset[i]
        return (time.perf_counter() - t0) / n


def time_end_to_end(cfg: DictConfig, data: Path, device: torch.device, *, steps: int, warmup: int) -> float:
    """Seconds per optimiser step of the trainer's step fed by its own DataLoader from the cache."""
    manifest = read_manifest(data)[["subject_id", "path"]]
    dataset, sampler, loader = build_pretrain_loader(cfg, manifest, DistInfo(), device)
    model = build_volta3d(to_kwargs(cfg.model), to_kwargs(cfg.head), to_kwargs(cfg.loss)).to(device)
    optimizer = build_optimizer(model.student, cfg.optim.betas)
    schedules = constant_schedules(steps + warmup + 1)
    settings = StepSettings.from_config(cfg, device)
    batches = _endless(loader, sampler, dataset)
    info = DistInfo()
    for i in range(warmup):
        train_step(
            model, model.student, optimizer, schedules, i, batches, device, info, dataset.views, settings
        )
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(
            model, model.student, optimizer, schedules, i, batches, device, info, dataset.views, settings
        )
    sync(device)
    return (time.perf_counter() - t0) / steps


def _endless(loader: Any, sampler: Any, dataset: PretrainVolumesDataset) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_pipeline_benchmark(
    cfg: DictConfig, device: torch.device, data: Path | None, *, n_volumes: int, steps: int, warmup: int
) -> PipelineFigures:
    reference, batched, draw = time_views(cfg, device, n_volumes, cfg.seed)
    load = time_loading(cfg, data, n_volumes) if data is not None else None
    end_to_end = time_end_to_end(cfg, data, device, steps=steps, warmup=warmup) if data is not None else None
    return PipelineFigures(2 + int(cfg.views.n_local), reference, batched, draw, load, end_to_end)


def cores_needed(cpu_seconds_per_volume: float, volumes_per_step: int, seconds_per_step: float) -> float:
    """CPU cores that must work in parallel to prepare each step's volumes while the step runs."""
    return cpu_seconds_per_volume * volumes_per_step / seconds_per_step


def format_pipeline(figures: PipelineFigures, step_seconds: float, step_flops: float, volumes_per_step: int,
                    gpu_flops: float, device: torch.device) -> str:  # fmt: skip
    """The pipeline table: CPU time per volume of each path and the cores each needs to feed the step."""
    f = figures
    # the loader's share now: a loaded item includes its draw
    loader_new = f.load_seconds if f.load_seconds is not None else f.draw_seconds
    loader_old = (f.load_seconds or 0.0) + f.reference_seconds
    gpu_step = step_flops / gpu_flops
    lines = [
        f"views pipeline, {f.views_per_volume} crops per volume, CPU seconds per volume on one thread "
        f"({'with' if f.load_seconds is not None else 'without'} reading the cache):",
        f"{'path':<40} {'s/volume':>9} {'views/s/core':>13} {'cores: step here':>17} {'cores: GPU step':>16}",
    ]
    rows = [("reference (MONAI, per volume, workers)", loader_old)]
    if device.type == "cpu":
        rows.append(("batched: loader + views on this CPU", loader_new + f.batched_seconds))
    rows.append(("batched: loader only (views on a GPU)", loader_new))
    for name, seconds in rows:
        lines.append(
            f"{name:<40} {seconds:>9.4f} {f.views_per_volume / seconds:>13.1f} "
            f"{cores_needed(seconds, volumes_per_step, step_seconds):>17.2f} "
            f"{cores_needed(seconds, volumes_per_step, gpu_step):>16.1f}"
        )
    lines.append(f"batched views alone on {device}: {f.batched_seconds:.4f} s/volume "
                 f"({f.reference_seconds / f.batched_seconds:.1f}x less than the reference views)")  # fmt: skip
    lines.append(f"GPU step estimated from {step_flops / 1e12:.3f} TFLOP at {gpu_flops / 1e12:.0f} TFLOP/s achieved: "
                 f"{gpu_step * 1e3:.1f} ms; step here: {step_seconds:.3f} s")  # fmt: skip
    if f.end_to_end_seconds_per_step is not None:
        ratio = f.end_to_end_seconds_per_step / step_seconds
        lines.append(f"end to end (cache -> loader -> views on {device} -> step): "
                     f"{f.end_to_end_seconds_per_step:.3f} s/step, {ratio:.2f}x the in-memory step")  # fmt: skip
    return "\n".join(lines)


__all__ = ["PipelineFigures", "cores_needed", "format_pipeline", "run_pipeline_benchmark"]
