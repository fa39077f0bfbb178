"""Forward + backward time of one UNETR training batch at patch 16 and patch 8, on the CPU.

    python benchmarks/bench_unetr_patch.py [--configs tiny-cpu.yaml demo.yaml] [--repeats 5] [--threads N]

The network is the demo's (``finetune segment`` with tiny-cpu.yaml + demo.yaml: the encoder's widths and
depth from ``model:``, ``segment.feature_size``, ``segment.crop_size``), with 3 classes (the hippocampus
masks) and one batch of ``segment.batch_size x segment.samples_per_volume`` random crops; the loss is the
training loss (Dice + cross-entropy). Prints the median (and min / max) seconds over ``--repeats`` after
one warm-up step, the token grid, the parameter count and the step's GFLOP (torch's ``FlopCounterMode``,
forward + backward: a figure that, unlike the seconds, does not move with the machine's other load).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from monai.losses import DiceCELoss
from torch.utils.flop_counter import FlopCounterMode

from volta3d.config import load_config, to_kwargs
from volta3d.downstream.finetune import unetr_sizes
from volta3d.downstream.segmenter import build_unetr

NUM_CLASSES = 3  # MSD hippocampus: background, anterior, posterior


def time_step(patch_size: int, cfg_files: list[str], repeats: int) -> tuple[list[float], float, int, int]:
    """Seconds per forward + backward over ``repeats`` timed steps, GFLOP per step, the token grid edge
    and the parameter count."""
    cfg = load_config(cfg_files, [f"model.patch_size={patch_size}"])
    seg = to_kwargs(cfg.segment)
    torch.manual_seed(0)
    net = build_unetr(
        1, NUM_CLASSES, seg["crop_size"], **unetr_sizes(to_kwargs(cfg.model), seg, None)
    ).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    crops = seg["batch_size"] * seg["samples_per_volume"]
    x = torch.rand(crops, 1, *(seg["crop_size"],) * 3)  # (B, 1, D, H, W) crops
    y = torch.randint(0, NUM_CLASSES, (crops, 1, *(seg["crop_size"],) * 3))  # (B, 1, D, H, W) labels
    with FlopCounterMode(display=False) as counter:
        loss_fn(net(x), y).backward()
    seconds = []
    for step in range(repeats + 1):  # step 0 warms the allocator and the kernels up
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss_fn(net(x), y).backward()
        if step:
            seconds.append(time.perf_counter() - start)
    params = sum(p.numel() for p in net.parameters())
    return seconds, counter.get_total_flops() / 1e9, seg["crop_size"] // patch_size, params


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["tiny-cpu.yaml", "demo.yaml"])
    parser.add_argument("--patch-sizes", nargs="+", type=int, default=[16, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"configs {' + '.join(args.configs)}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(f"{'patch':>5} {'grid':>6} {'params':>9} {'GFLOP':>6} {'median s':>9} {'min s':>7} {'max s':>7}")
    for p in args.patch_sizes:
        seconds, gflop, grid, params = time_step(p, args.configs, args.repeats)
        print(
            f"{p:>5} {f'{grid}^3':>6} {params:>9,} {gflop:>6.1f} {statistics.median(seconds):>9.3f} "
            f"{min(seconds):>7.3f} {max(seconds):>7.3f}"
        )


if __name__ == "__main__":
    main()
