"""CPU cost of the SFCN brain-age baseline (volta3d.downstream.sfcn): the demo's widths against the paper's.

Prints, per channel list (the paper's, half and a quarter of it), the parameter count and the fastest
and median wall time of one training step's forward and backward pass (MSE regression, the project's
loss) on a batch of random volumes, after a warm-up step; and the median x the batches of one demo
age-regression epoch (5-fold CV of the 98 evaluation subjects: about 78 training scans, batch 4,
``drop_last``: 19 steps). The lists take turns step by step, so a load from other jobs on the machine
falls on all of them alike.

    python benchmarks/bench_sfcn.py [--size 64] [--batch 4] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from volta3d.config import load_config, to_kwargs
from volta3d.downstream.sfcn import SFCN, sfcn_kwargs

SFCN_SECTION = sfcn_kwargs(**to_kwargs(load_config().classify.sfcn))  # default.yaml: the paper's widths
SFCN_CHANNELS = tuple(SFCN_SECTION["channels"])
CHANNEL_SETS = {
    "paper": SFCN_CHANNELS,
    "paper/2 (demo)": tuple(c // 2 for c in SFCN_CHANNELS),
    "paper/4": tuple(c // 4 for c in SFCN_CHANNELS),
}
STEPS_PER_DEMO_EPOCH = 19


def step_times(channel_sets: list[tuple[int, ...]], size: int, batch: int, repeats: int) -> list[list[float]]:
    """Seconds of forward + backward for one (batch, 1, size^3) batch, per channel list and timed step;
    the lists take turns, after one warm-up step each."""
    torch.manual_seed(0)
    nets = [SFCN(1, **{**SFCN_SECTION, "channels": c}).train() for c in channel_sets]
    x, y = torch.rand(batch, 1, size, size, size), torch.randn(batch)
    times: list[list[float]] = [[] for _ in nets]
    for i in range(repeats + 1):
        for net, t in zip(nets, times, strict=True):
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(net(x)[:, 0], y)  # (B, 1, D, H, W) -> (B, 1) -> (B,)
            loss.backward()
            net.zero_grad(set_to_none=True)
            if i > 0:
                t.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=64, help="cube edge of the volumes")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per channel list")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x {args.size}^3, {args.threads} threads, {args.repeats} timed steps per list")
    sets = list(CHANNEL_SETS.values())
    for (name, channels), t in zip(
        CHANNEL_SETS.items(), step_times(sets, args.size, args.batch, args.repeats), strict=True
    ):
        params = sum(p.numel() for p in SFCN(1, **{**SFCN_SECTION, "channels": channels}).parameters())
        med = statistics.median(t)
        print(
            f"{name:15s} {list(channels)}: {params:,} parameters, forward+backward min {min(t):.2f} s, "
            f"median {med:.2f} s/batch, ~{med * STEPS_PER_DEMO_EPOCH:.0f} s per demo epoch"
        )


if __name__ == "__main__":
    main()
