"""``volta3d bench``: time one full pretraining step against the machine's matmul rate, and the data
pipeline that feeds it."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from volta3d.commands.common import add_config_arguments
from volta3d.config import load_config
from volta3d.errors import InputError

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="time one full VolTA-3D pretraining step (speed, memory, fraction of matmul peak)",
        description="Times the trainer's full optimiser step (student on both crop sizes, teacher, all losses, "
        "backward, AdamW, EMA, centers) on in-memory batches, counts its FLOPs, and divides the achieved rate by "
        "a large matmul's rate measured in the same run. Also times the straightforward step (batch-1 "
        "micro-batches with accumulation, fp32, unfused attention) and prints the speed-up.",
    )
    add_config_arguments(p, "optim.batch_size=2")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps")
    p.add_argument("--no-baseline", action="store_true", help="skip the straightforward implementation")
    p.add_argument(
        "--matmul-size", type=int, default=2048, help="edge of the square matmul timed as the peak"
    )
    p.add_argument(
        "--data",
        type=Path,
        metavar="PREP",
        help="a preprocessed folder: also time reading the cache and the end-to-end step (loader, views, step)",
    )
    p.add_argument("--pipeline-volumes", type=int, default=8, help="volumes the views pipeline is timed on")
    p.add_argument(
        "--gpu-tflops",
        type=float,
        default=100.0,
        help="achieved TFLOP/s assumed for a GPU step when counting the CPU cores a pipeline needs",
    )
    p.add_argument(
        "--patch-sizes",
        type=int,
        nargs="+",
        metavar="P",
        help="instead, time the optimised step once per patch size (e.g. 16 8): one row each with the tokens "
        "per global / local view, seconds per step and peak memory",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volta3d.engine.benchmark import format_table, run_benchmark
    from volta3d.engine.pipeline_benchmark import format_pipeline, run_pipeline_benchmark
    from volta3d.runtime import resolve_device

    _check_counts(args)
    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.device)
    if args.patch_sizes:
        return _run_patch_sweep(cfg, device, args)
    report = run_benchmark(
        cfg,
        device,
        steps=args.steps,
        warmup=args.warmup,
        baseline=not args.no_baseline,
        matmul_size=args.matmul_size,
    )
    print(format_table(report, device))
    pipeline = run_pipeline_benchmark(cfg, device, args.data, n_volumes=args.pipeline_volumes, steps=args.steps,
                                      warmup=args.warmup)  # fmt: skip
    step = report["results"][0]
    print(format_pipeline(pipeline, step.seconds_per_step, step.flops_per_step, report["batch"],
                          args.gpu_tflops * 1e12, device))  # fmt: skip
    if args.json:
        payload = {**report, "results": [dataclasses.asdict(r) for r in report["results"]], "device": str(device),
                   "pipeline": dataclasses.asdict(pipeline)}  # fmt: skip
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


# (option, smallest, largest): a matmul edge of 16384 is 1 GB a float32 matrix; the views are timed on
# that many synthetic volumes held in memory
COUNTS = (("steps", 1, None), ("warmup", 0, None), ("matmul_size", 1, 16384), ("pipeline_volumes", 1, 256))


def _check_counts(args: argparse.Namespace) -> None:
    """One line for a count that would divide by zero (``--steps 0``) or allocate without bound."""
    for name, low, high in COUNTS:
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise InputError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
    if not args.gpu_tflops > 0:
        raise InputError(f"--gpu-tflops must be > 0, got {args.gpu_tflops}")


def _run_patch_sweep(cfg: DictConfig, device: torch.device, args: argparse.Namespace) -> int:
    """``--patch-sizes``: the step cost per patch size, one table row each."""
    from volta3d.engine.benchmark import format_patch_table, run_patch_sweep

    rows = run_patch_sweep(cfg, device, args.patch_sizes, steps=args.steps, warmup=args.warmup)
    print(format_patch_table(rows, device, cfg.optim.batch_size * cfg.optim.accum_steps))
    if args.json:
        payload = {"device": str(device), "patch_sweep": [dataclasses.asdict(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0
