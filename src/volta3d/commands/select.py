"""``volta3d select``: a saved selection split of the labelled subjects (recipes are chosen on it only)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="hold out the labelled subjects that choose recipes, apart from those reported on",
        description="Split a preprocessed folder's manifest (or a manifest CSV) into OUTPUT/selection.csv, a "
        "stratified, subject-grouped share of the subjects with a LABEL value, and OUTPUT/evaluation.csv, every "
        "other row. Give selection.csv to `pretrain --eval-data` and to recipe studies; give evaluation.csv to "
        "`finetune`, `embed` and `probe` for the results you report. Re-running with the same settings keeps "
        "the split; other settings into the same OUTPUT are refused.",
    )
    p.add_argument("data", metavar="DATA", help="preprocessed folder (manifest.csv) or a manifest CSV")
    p.add_argument(
        "--label", required=True, help="label column to stratify by (subjects without it stay out)"
    )
    p.add_argument("--fraction", type=float, default=0.33, help="share of labelled subjects selected (0.33)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--output", required=True, help="output folder")
    p.set_defaults(func=run, claims="folder")


def run(args: argparse.Namespace) -> int:
    from volta3d.protocol.selection import write_selection

    record = write_selection(args.data, args.label, args.fraction, args.seed, args.output)
    print(
        f"selection: {len(record['selection_subjects'])} subjects ({record['n_selection_rows']} scans); "
        f"evaluation: {record['n_evaluation_rows']} scans; in {args.output}"
    )
    return 0
