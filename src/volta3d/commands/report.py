"""``volta3d report``: one self-contained HTML report (plus summary.md) of a volta3d run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report (tables, paired statistics, figures) of finished runs",
        description="Collect downstream results.json files (fine-tuning, probes, segmentation), an optional "
        "pretraining run folder (metrics.csv + config.yaml) and an optional stages.json from the given files "
        "and folders (searched recursively), and write OUTPUT/report.html (figures embedded, opens offline), "
        "OUTPUT/figures/*.png and OUTPUT/summary.md. Per task, every model is compared with the "
        "VolTA-3D-initialised one (paired over the same folds: difference, bootstrap 95 % CI, Wilcoxon, DeLong).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="RUN_DIR_OR_RESULTS",
        help="results.json files, run folders or a folder holding several runs",
    )
    p.add_argument("--output", required=True, help="folder for report.html, figures/ and summary.md")
    p.add_argument("--title", default="volta3d run report", help="report title")
    p.add_argument(
        "--reference",
        default=None,
        help="model name to compare the others with (default: the VolTA-3D-initialised model)",
    )
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.evaluation.report import build_report
    from volta3d.evaluation.statistics import check_n_boot

    check_n_boot(args.n_boot)  # here: inside the report a failed comparison becomes a "not comparable" row
    path = build_report(
        args.inputs,
        args.output,
        title=args.title,
        reference=args.reference,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    print(f"wrote {path} (and summary.md, figures/)")
    return 0
