"""``volta3d preprocess``: scans (NIfTI folder / DICOM series / BIDS / CSV manifest) -> cached cubes + manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from volta3d.config import load_config, save_config, to_kwargs
from volta3d.data.bundled import BUNDLED, default_shared_data, write_bundled_manifests
from volta3d.data.sources import KINDS
from volta3d.errors import InputError, InputFileNotFound
from volta3d.runtime import setup_logging

EPILOG = """examples:
  volta3d preprocess scans/ --output cache/ preprocess.size=[64,64,64]
  volta3d preprocess --output cache/ --workers 4 subjects.csv
  volta3d preprocess --bundled msd --output cache_msd/ preprocess.size=[48,48,48]
  volta3d preprocess --output cache/ --shard 0/2 scans/   (machine A; machine B runs --shard 1/2)
  volta3d preprocess --output cache/ --merge              (then: manifest.csv from the shard parts)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "preprocess",
        help="validate scans, reorient to RAS, resample to 1 mm, crop/pad, scale to [0,1]; cache + manifest.csv",
        description="Preprocess a dataset once, offline (paper II-A): each scan is reoriented to RAS, resampled "
        "to isotropic spacing, cropped/padded to a cube and scaled to [0, 1], then cached as .npy. Writes "
        "OUT/manifest.csv (accepted scans with their labels), OUT/rejected.csv (source, reason), "
        "OUT/config.yaml and OUT/preprocess.log. Re-running skips scans already cached from the same files "
        "with the same settings.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="INPUT | key=value",
        help="INPUT: a folder of NIfTI files (searched recursively), a folder of DICOM series (one folder per "
        "series), a BIDS dataset, or a CSV manifest with a 'path' column (other columns are labels; "
        "'label_path' names a segmentation mask; relative paths are relative to the CSV). "
        "key=value: override a config key, e.g. preprocess.size=[64,64,64] preprocess.crop=foreground",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder (cache, manifests, log)")
    p.add_argument("--kind", choices=KINDS, default="auto", help="input kind (default: detected from INPUT)")
    p.add_argument(
        "--bundled",
        choices=sorted(BUNDLED),
        help="use a bundled real dataset instead of INPUT: its CSV manifest is written into OUT and preprocessed "
        "(msd volumes are small crops: use e.g. preprocess.size=[48,48,48])",
    )
    p.add_argument(
        "--shared-data",
        type=Path,
        default=None,
        help="folder holding the bundled data (default: ../shared/data relative to the current directory)",
    )
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="config file merged onto the defaults (bundled name such as tiny-cpu, or a path); repeatable",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="parallel worker processes, one scan each (default: 1)"
    )
    p.add_argument(
        "--shard",
        default=None,
        metavar="i/n",
        help="process only shard i of n (0 <= i < n; scans assigned by a hash of their source path) and write "
        "manifest.shard-i-of-n.csv; afterwards run --merge, or run again without --shard",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="only assemble OUT/manifest.csv and rejected.csv from finished shard parts (no INPUT needed)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    overrides = [s for s in args.overrides if "=" in s]
    inputs = [s for s in args.overrides if "=" not in s]
    if len(inputs) > 1:
        raise InputError(f"give one INPUT, got {len(inputs)}: {' '.join(inputs)}")
    from volta3d.data.preprocess import (  # MONAI and torch: only now
        merge_shards,
        parse_shard,
        preprocess_dataset,
    )

    log = setup_logging()
    if args.merge:
        if inputs or args.bundled or args.shard:
            raise InputError("--merge takes no INPUT, --bundled or --shard")
        manifest, rejected = merge_shards(args.output)
        log.info("merged shard parts into %s and %s", manifest, rejected)
        return 0
    if args.workers < 1:
        raise InputError(f"--workers must be >= 1, got {args.workers}")
    shard = parse_shard(args.shard) if args.shard else None
    if args.bundled and inputs:
        raise InputError("give either INPUT or --bundled, not both")
    cfg = load_config(args.config, overrides)
    settings = to_kwargs(cfg.preprocess)
    if args.bundled:
        shared = args.shared_data if args.shared_data is not None else default_shared_data()
        source: Path = write_bundled_manifests(shared, args.output)[args.bundled]
        kind = "csv"
    elif inputs:
        source, kind = Path(inputs[0]), args.kind
        if not source.exists():
            raise InputFileNotFound(f"input not found: {source}")
    else:
        raise InputError("give an INPUT folder or CSV manifest (or --bundled ixi|msd)")
    save_config(cfg, args.output)
    summary = preprocess_dataset(
        source,
        args.output,
        settings,
        workers=args.workers,
        shard=shard,
        kind=kind,
        progress=not args.no_progress,
    )
    log.info(
        "%d accepted, %d rejected (%d computed, %d cached) in %.1f s -> %s",
        summary.accepted, summary.rejected, summary.processed, summary.skipped, summary.seconds, summary.manifest,
    )  # fmt: skip
    if summary.errors:
        log.error(
            "%d scan(s) failed for a reason other than their data (see %s; a re-run retries them)",
            summary.errors, summary.rejected_csv,
        )  # fmt: skip
        return 1
    return 0
