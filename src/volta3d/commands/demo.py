"""``volta3d demo``: preprocess, pretrain, transfer, evaluate and report on the bundled real scans."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole path on the bundled IXI and MSD scans (tiny CPU configuration, < 20 min on 2 cores)",
        description="Runs every stage on the bundled real scans with configs tiny-cpu + demo: preprocess IXI T1 "
        "and MSD hippocampus; pretrain VolTA-3D on all volumes (labels unused); sex classification on IXI "
        "(VolTA-3D ViT vs ViT and Swin from scratch, subject-grouped 5-fold CV); frozen-feature probes for sex "
        "and age with a reduced-data curve; hippocampus segmentation on MSD (UNETR from VolTA-3D vs UNETR and "
        "3D U-Net from scratch, hold-out split); the HTML report. Interrupt it and run it again: finished "
        "stages are skipped and each command resumes its own work. Progress, stage times and outcomes go to "
        "OUTPUT/demo.log and OUTPUT/stages.json; the report is OUTPUT/report/report.html.",
    )
    p.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--shared-data", default="../shared/data",
                   help="folder with the bundled data (default: ../shared/data)")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every stage (~2 minutes on 2 cores): 30 + 30 scans, 1 epoch, 3 folds",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="preprocessing / data-loading processes (default 2)"
    )
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.demo import run_demo

    # the entry point the CLI hands over (cli.main), so the demo runs each stage as a user would type it
    return run_demo(args.output, args.shared_data, run_command=args.entry_point, quick=args.quick,
                    workers=args.workers)  # fmt: skip
