"""Are two demo output folders the same results? For a change meant to keep behaviour (a refactor):

    .venv/bin/volta3d demo --quick --output /tmp/before   # at the old commit (e.g. a git worktree)
    .venv/bin/volta3d demo --quick --output /tmp/after    # at the new one
    .venv/bin/python benchmarks/compare_demo_outputs.py /tmp/before /tmp/after

Compares every results.json's folds / aggregate / fractions, every predictions and metrics CSV (timing
and absolute-path columns aside), every embeddings array, and report/summary.md with the folder paths,
dates and durations normalised. Prints the differing files; exit status 1 when any differs.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

CSV_NAMES = ("predictions.csv", "metrics.csv", "online_eval.csv", "manifest.csv")
TIMING = re.compile(
    r"\d+(\.\d+)? (min|s)\b|\d+:\d\d:\d\d|\d{4}-\d\d-\d\d \d\d:\d\d|seconds_per_step \| [\d.| ]+"
)


def _results(a: Path, b: Path) -> list[str]:
    bad = []
    for fa in sorted(a.rglob("results.json")):
        ra, rb = json.loads(fa.read_text()), json.loads((b / fa.relative_to(a)).read_text())
        bad += [
            f"{fa.relative_to(a)} {k}" for k in ("folds", "aggregate", "fractions") if ra.get(k) != rb.get(k)
        ]
    return bad


def _tables(a: Path, b: Path) -> list[str]:
    bad = []
    for fa in sorted(f for name in CSV_NAMES for f in a.rglob(name)):
        da, db = pd.read_csv(fa), pd.read_csv(b / fa.relative_to(a))
        drop = [c for c in da.columns if "seconds" in c or c in ("path", "source", "label_path")]
        if not da.drop(columns=drop).equals(db.drop(columns=drop, errors="ignore")):
            bad.append(str(fa.relative_to(a)))
    return bad


def _arrays(a: Path, b: Path) -> list[str]:
    bad = []
    for fa in sorted(a.rglob("*.npz")):
        za, zb = np.load(fa, allow_pickle=True), np.load(b / fa.relative_to(a), allow_pickle=True)
        bad += [f"{fa.relative_to(a)}:{k}" for k in za.files if k not in ("path", "paths", "meta")
                and not np.array_equal(za[k], zb[k])]  # fmt: skip
    return bad


def _summaries(a: Path, b: Path) -> list[str]:
    def text(path: Path, root: Path) -> str:
        return TIMING.sub("T", path.read_text().replace(str(root), "ROOT"))

    return [str(f.relative_to(a)) for f in sorted(a.rglob("summary.md"))
            if text(f, a) != text(b / f.relative_to(a), b)]  # fmt: skip


def main() -> int:
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    bad = _results(a, b) + _tables(a, b) + _arrays(a, b) + _summaries(a, b)
    n = sum(1 for p in ("results.json", *CSV_NAMES, "*.npz", "summary.md") for _ in a.rglob(p))
    print(f"compared {n} files; {len(bad)} differ", *bad, sep="\n  ")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
