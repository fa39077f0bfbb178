"""volta3d.evaluation: subject-grouped splits, metrics, paired statistics and results files."""

from volta3d.evaluation.comparison import compare_results, format_comparison
from volta3d.evaluation.statistics import bootstrap_ci, delong_test, paired_difference
from volta3d.protocol.results import FoldStore, load_run, save_run
from volta3d.protocol.splits import load_splits, make_holdout_split, make_kfold_splits, save_splits

__all__ = [
    "FoldStore",
    "bootstrap_ci",
    "compare_results",
    "delong_test",
    "format_comparison",
    "load_run",
    "load_splits",
    "make_holdout_split",
    "make_kfold_splits",
    "paired_difference",
    "save_run",
    "save_splits",
]
