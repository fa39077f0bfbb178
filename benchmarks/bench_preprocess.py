"""Preprocessing cost per scan vs. cached load cost per volume, on the bundled IXI T1 scans.

    python benchmarks/bench_preprocess.py [--n 10] [--size 96] [--workers 1] [--shared-data ../shared/data]

Prints seconds per scan for `preprocess_dataset` (read NIfTI, RAS, 1 mm, crop/pad, scale, save .npy)
and the mean `VolumeDataset.__getitem__` time over the same volumes (warm file cache, best of 3 passes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from volta3d.config import load_config, to_kwargs
from volta3d.data.bundled import default_shared_data, write_bundled_manifests
from volta3d.data.dataset import VolumeDataset
from volta3d.data.preprocess import preprocess_dataset
from volta3d.data.sources import find_scans


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10, help="number of IXI scans")
    parser.add_argument("--size", type=int, default=96, help="output cube edge (voxels)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shared-data", type=Path, default=default_shared_data())
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per scan, as in a worker process

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        settings = {**to_kwargs(load_config().preprocess), "size": [args.size] * 3}
        columns = {k: settings[k] for k in ("image_column", "label_path_column", "subject_column")}
        scans = find_scans(write_bundled_manifests(args.shared_data, out / "sources")["ixi"], **columns)[
            : args.n
        ]
        start = time.perf_counter()
        summary = preprocess_dataset(scans, out / "cache", settings, workers=args.workers, progress=False)
        wall = time.perf_counter() - start
        rerun = preprocess_dataset(scans, out / "cache", settings, progress=False)

        ds = VolumeDataset(out / "cache", columns=["age", "sex"])
        passes = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            passes.append((time.perf_counter() - t0) / len(ds))
        print(f"IXI scans: {summary.accepted} accepted, {summary.rejected} rejected, cube {args.size}^3, "
              f"workers={args.workers}, torch threads=1")  # fmt: skip
        print(f"preprocess: {wall:.2f} s total, {wall / len(scans):.3f} s per scan (wall, incl. pool start)")
        print(f"re-run with everything cached: {rerun.seconds:.3f} s ({rerun.skipped} skipped)")
        print(f"dataset __getitem__: {1000 * min(passes):.2f} ms per volume (best of 3 passes)")


if __name__ == "__main__":
    main()
