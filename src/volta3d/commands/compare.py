"""``volta3d compare``: paired statistics between two runs evaluated on the same folds."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="paired difference, bootstrap 95 %% CI, Wilcoxon and DeLong tests between two runs",
        description="Compare run A with run B (results.json files or their folders; both must use the same "
        "folds). Per metric: mean paired difference A - B over folds with a seeded bootstrap 95 % CI and a "
        "Wilcoxon signed-rank test; per-subject metrics (Dice, HD95) paired by subject; for binary tasks, "
        "DeLong's test on pooled out-of-fold AUROC with a bootstrap CI over subjects.",
    )
    p.add_argument("run_a", metavar="RESULTS_A", help="results.json (or run folder) of model A")
    p.add_argument("run_b", metavar="RESULTS_B", help="results.json (or run folder) of model B")
    p.add_argument("--metrics", nargs="+", default=None, help="metrics to compare (default: all shared)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--output", default=None, help="write the comparison to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from volta3d.evaluation.comparison import compare_results, format_comparison
    from volta3d.protocol.results import write_json

    cmp = compare_results(args.run_a, args.run_b, metrics=args.metrics, n_boot=args.n_boot, seed=args.seed)
    print(format_comparison(cmp))
    if args.output:
        write_json(args.output, cmp)
    return 0
