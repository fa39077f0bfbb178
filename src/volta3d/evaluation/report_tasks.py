"""The report's per-task sections: what each downstream task scored, and how the models compare.

One section per task (``task_sections``): every model's metrics over folds and every paired
comparison with the reference model (differences are reference - other, paired over the same folds
or subjects; DeLong's test on pooled AUROC), pooled out-of-fold ROC curves for binary tasks,
reduced-data curves with a 95 % CI of the mean, and, for segmentation, Dice and HD95 per structure
with overlays of the worst, median and best test subjects. Figures get one panel per group of
comparable models, coloured by initialisation, so that a panel never mixes models that should not be
read against each other. Kept apart from ``report`` (which assembles the page) because these blocks
are the bulk of the report and depend only on the runs and their comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from volta3d import layout
from volta3d.errors import InputError
from volta3d.evaluation import report_plots
from volta3d.evaluation.report_doc import (
    Block,
    Figure,
    Heading,
    Line,
    Note,
    Section,
    Table,
    digits_for,
    fmt_num,
    fmt_p,
    fmt_signed,
    mean_sd,
    metric_label,
    omitted,
    slug,
)
from volta3d.evaluation.report_runs import (
    COMPARE_METRICS,
    Run,
    comparable_group,
    initialisation,
    is_probe,
    task_title,
    top_predictions,
    variant,
)

TABLE_METRICS = {
    "binary": ["auroc", "balanced_accuracy", "sensitivity", "specificity", "balanced_accuracy_youden",
               "sensitivity_youden", "specificity_youden"],
    "multiclass": ["auroc", "balanced_accuracy"],
    "regression": ["mae", "r2", "pearson_r", "gap_age_r", "gap_age_r_corrected"],
    "segmentation": ["dice", "hd95"],
}  # fmt: skip
OVERLAY_CASES = 3


# ----------------------------------------------------------------------------- paired comparisons


def comparison_rows(ref: Run, other: Run, cmp: Mapping[str, Any] | str) -> list[list[str]]:
    """Rows of a task's paired-comparison table (differences are reference - other): every compared
    metric over folds, the per-subject metrics and DeLong's test on pooled AUROC."""
    if isinstance(cmp, str):
        return [[ref.name, other.name, f"not comparable: {cmp}", *["—"] * 7]]
    rows = []
    for m in COMPARE_METRICS.get(ref.kind, []):
        r = cmp["fold_level"].get(m)
        if r:
            dg = digits_for(m)
            tested = r["n"] >= 2  # one fold: a difference, but nothing to resample or rank
            rows.append(
                [
                    ref.name,
                    other.name,
                    metric_label(m),
                    f"folds ({r['n']})",
                    fmt_num(r["mean_a"], dg),
                    fmt_num(r["mean_b"], dg),
                    fmt_signed(r["estimate"], dg),
                    f"[{r['ci_low']:+.{dg}f}, {r['ci_high']:+.{dg}f}]" if tested else "—",
                    "Wilcoxon" if tested else "—",
                    fmt_p(r["wilcoxon_p"]) if tested else "—",
                ]
            )
    rows += _fraction_rows(ref, other, cmp)
    for m, r in cmp["subject_level"].items():
        if m in ("dice_mean", "hd95_mean"):
            dg = digits_for(m)
            rows.append(
                [
                    ref.name,
                    other.name,
                    metric_label(m),
                    f"subjects ({r['n']})",
                    fmt_num(r["mean_a"], dg),
                    fmt_num(r["mean_b"], dg),
                    fmt_signed(r["estimate"], dg),
                    f"[{r['ci_low']:+.{dg}f}, {r['ci_high']:+.{dg}f}]",
                    "Wilcoxon",
                    fmt_p(r["wilcoxon_p"]),
                ]
            )
    d = cmp.get("delong")
    if d:
        rows.append(
            [
                ref.name,
                other.name,
                "AUROC (pooled)",
                f"subjects ({d['n']})",
                fmt_num(d["auroc_a"]),
                fmt_num(d["auroc_b"]),
                fmt_signed(d["diff"]),
                f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                "DeLong",
                fmt_p(d["p"]),
            ]
        )
    return rows


def _fraction_rows(ref: Run, other: Run, cmp: Mapping[str, Any]) -> list[list[str]]:
    """The reduced-data curve's paired differences, one row per training fraction below the largest (the
    largest is the per-fold row above): whether pretraining helped fine-tuning where labels are scarce."""
    curve = {} if is_probe(ref) else cmp.get("fraction_level") or {}  # probes: the curve figure says it
    rows = []
    for frac, r in list(curve.items())[:-1]:
        dg = digits_for(r["metric"])
        rows.append([ref.name, other.name, f"{metric_label(r['metric'])}, {float(frac):.0%} of the training labels",
                     f"folds ({r['n']})", fmt_num(r["mean_a"], dg), fmt_num(r["mean_b"], dg),
                     fmt_signed(r["estimate"], dg), f"[{r['ci_low']:+.{dg}f}, {r['ci_high']:+.{dg}f}]", "Wilcoxon",
                     fmt_p(r["wilcoxon_p"])])  # fmt: skip
    return rows


COMPARISON_COLUMNS = [
    "reference",
    "compared with",
    "metric",
    "paired over",
    "reference value",
    "other value",
    "difference",
    "95 % CI",
    "test",
    "p",
]


# ----------------------------------------------------------------------------- per task


def _trace(run: Run, dashes: dict[str, str]) -> report_plots.Trace:
    """Colour by initialisation, dash by variant (feature or architecture), the same in every panel."""
    dash = dashes.setdefault(variant(run), report_plots.DASHES[len(dashes) % len(report_plots.DASHES)])
    return report_plots.Trace(run.name, report_plots.source_colour(initialisation(run)), dash)


def _panels(group: Sequence[Run]) -> dict[str, list[Run]]:
    panels: dict[str, list[Run]] = {}
    for r in group:
        panels.setdefault(comparable_group(r), []).append(r)
    return panels


def metrics_blocks(key: tuple, group: list[Run], pairs: list[tuple]) -> list[Block]:
    """The metrics over folds of every model, and every paired comparison (folded when long)."""
    metrics = [m for m in TABLE_METRICS.get(key[1], []) if any(m in r.results["aggregate"] for r in group)]
    rows = [
        [
            r.name,
            initialisation(r),
            str(len(r.results["folds"])),
            *[mean_sd(r.results["aggregate"].get(m), digits_for(m)) for m in metrics],
        ]
        for r in group
    ]
    blocks: list[Block] = [
        Heading("Metrics and paired comparisons"),
        Line("Mean ± SD over folds (the aggregate in each results.json). Differences in the comparison table are "
             "reference − other, paired over the same folds or subjects."),
        Table(["model", "initialisation", "folds", *map(metric_label, metrics)], rows,
              f"{task_title(key)}: metrics over folds")]  # fmt: skip
    if pairs:
        cmp_rows = [row for ref, other, cmp in pairs for row in comparison_rows(ref, other, cmp)]
        blocks.append(Table(COMPARISON_COLUMNS, cmp_rows, f"{task_title(key)}: paired comparisons"))
    else:
        blocks.append(
            Note(f"{task_title(key)}: no VolTA-3D-initialised model (or named reference) to compare against.")
        )
    return blocks


def roc_blocks(key: tuple, group: list[Run], fig_dir: Path) -> list[Block]:
    """Pooled out-of-fold ROC curves, one panel per group of comparable models."""
    dashes: dict[str, str] = {}
    panels: dict[str, list] = {}
    for name, runs in _panels(group).items():
        for r in runs:
            pred = top_predictions(r)
            if (
                pred is not None
                and {"y_true", "score"} <= set(pred.columns)
                and pred["y_true"].nunique() == 2
            ):
                curve = (_trace(r, dashes), pred["y_true"].to_numpy(int), pred["score"].to_numpy(float))
                panels.setdefault(name, []).append(curve)
    if not panels:
        return [
            Heading("ROC curves"),
            Note("ROC curves omitted: no run of this task saved predictions.csv with both classes."),
        ]
    path = report_plots.roc_figure(panels, task_title(key), fig_dir / f"roc_{slug(task_title(key))}.png")
    return [Heading("ROC curves"),
            Figure(path, f"{task_title(key)}: ROC of out-of-fold predictions pooled over folds (largest training "
                         "fraction); colour: initialisation, line style: feature or architecture")]  # fmt: skip


def mean_ci(agg: Mapping[str, Any]) -> tuple[float, float]:
    """95 % t interval of the mean over folds from (mean, SD, n); NaN with fewer than 2 folds."""
    n, sd, mean = agg.get("n") or 0, agg.get("sd"), agg.get("mean")
    if n < 2 or sd is None or mean is None or not math.isfinite(sd):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def fraction_blocks(key: tuple, group: list[Run], fig_dir: Path) -> list[Block]:
    """The reduced-data curve: mean and shaded 95 % CI per model and training fraction, one panel per
    group of comparable models, and its table (folded: one row per model and fraction)."""
    with_fractions = [r for r in group if r.results.get("fractions")]
    if not with_fractions:
        return []
    metric, dg = with_fractions[0].primary, digits_for(with_fractions[0].primary)
    dashes: dict[str, str] = {}
    panels: dict[str, list] = {}
    rows = []
    for name, runs in _panels(with_fractions).items():
        for r in runs:
            recs = []
            for frac, entry in r.results["fractions"].items():
                agg = entry["aggregate"].get(metric, {})
                low, high = mean_ci(agg)
                recs.append({"fraction": float(frac), "mean": agg.get("mean"), "low": low, "high": high})
                ci = f"[{fmt_num(low, dg)}, {fmt_num(high, dg)}]" if math.isfinite(low) else "—"
                rows.append([r.name, f"{float(frac):g}", mean_sd(agg, dg), ci, str(agg.get("n", 0))])
            panels.setdefault(name, []).append((_trace(r, dashes), pd.DataFrame(recs, dtype=float)))
    title = task_title(key)
    path = report_plots.fraction_figure(
        panels, metric_label(metric), title, fig_dir / f"fractions_{slug(title)}.png"
    )
    return [Heading("Reduced-data curves"),
            Figure(path, f"{title}: {metric_label(metric)} vs training fraction; line: mean over folds, shaded: 95 % "
                         "CI of that mean (t interval over folds)"),
            Table(["model", "training fraction", metric_label(metric), "95 % CI of the mean", "folds"], rows,
                  f"{title}: reduced-data curve")]  # fmt: skip


def _load_case(row: Any, pred_dir: Path, label: str) -> dict[str, Any]:
    image = np.load(row.image).astype(np.float32)
    truth, pred = np.load(row.label), np.load(pred_dir / row.prediction)
    image, truth = (
        image.reshape(image.shape[-3:]),
        truth.reshape(truth.shape[-3:]),
    )  # (1, D, H, W) -> (D, H, W)
    if not image.shape == truth.shape == pred.shape:
        raise InputError(f"shapes differ: scan {image.shape}, mask {truth.shape}, prediction {pred.shape}")
    return {"image": image, "truth": truth, "prediction": pred, "label": label}


def overlay_cases(run: Run, n: int = OVERLAY_CASES) -> tuple[list[dict[str, Any]], list[str]]:
    """Worst, median and best test subjects by Dice (when Dice is known), loaded for overlays;
    and notes on subjects that could not be drawn."""
    pred_dir = run.dir / "predictions"
    index = pd.read_csv(pred_dir / layout.SEGMENT_INDEX, dtype={"subject_id": str})
    pred = run.results.get("predictions")
    if pred is not None and "dice_mean" in pred.columns:
        index = index.merge(pred[["subject_id", "fold", "dice_mean"]], on=["subject_id", "fold"], how="left")
        index = index.sort_values("dice_mean", na_position="first").reset_index(drop=True)
        picks = sorted({0, (len(index) - 1) // 2, len(index) - 1})[:n] if len(index) else []
    else:
        picks = list(range(min(n, len(index))))
    cases, notes = [], []
    for i in picks:
        row = index.iloc[i]
        dice = row.get("dice_mean") if "dice_mean" in index.columns else None
        label = f"{row.subject_id}" + (f"\nDice {dice:.3f}" if dice is not None and pd.notna(dice) else "")
        try:
            cases.append(_load_case(row, pred_dir, label))
        except (OSError, ValueError) as err:
            notes.append(f"{run.name}: subject {row.subject_id} not drawn ({err}).")
    return cases, notes


def segmentation_blocks(group: list[Run], fig_dir: Path) -> list[Block]:
    """Dice and HD95 per structure (folded when long) and overlays of saved test predictions."""
    rows = []
    for r in group:
        agg = r.results["aggregate"]
        for c in [c for c in r.results.get("classes", []) if c != 0]:
            rows.append(
                [
                    r.name,
                    f"label {c}",
                    mean_sd(agg.get(f"dice_label{c}")),
                    mean_sd(agg.get(f"hd95_label{c}"), 2),
                ]
            )
    blocks: list[Block] = [
        Heading("Segmentation per structure and overlays"),
        Table(
            ["model", "structure", "Dice", "HD95 (mm)"],
            rows,
            "Per structure: mean ± SD over folds (each fold: mean over its test subjects)",
        ),
    ]
    drawn = False
    for r in group:
        if not (r.dir / "predictions" / layout.SEGMENT_INDEX).exists():
            continue
        cases, notes = overlay_cases(r)
        blocks.extend(map(Note, notes))
        if cases:
            path = report_plots.overlay_figure(cases, r.name, fig_dir / f"overlay_{slug(r.name)}.png")
            blocks.append(
                Figure(
                    path,
                    f"{r.name}: test subjects with the lowest, median and highest Dice; "
                    "ground truth in cyan, prediction in orange",
                )
            )
            drawn = True
    if not drawn:
        blocks.append(
            Note("Overlays omitted: no segmentation run saved its test predictions (predictions/index.csv).")
        )
    return blocks


def task_sections(
    tasks: dict[tuple, list[Run]], comparisons: dict[tuple, list[tuple]], fig_dir: Path
) -> list[Section]:
    """One section per task: its tables, then its figures."""
    if not tasks:
        return [
            omitted(Section("Results per task", "results"), "no downstream results.json among the inputs")
        ]
    out = []
    for key, group in tasks.items():
        title = task_title(key)
        sec = Section(f"{title[0].upper()}{title[1:]}", f"task-{slug(title)}")
        sec.blocks += metrics_blocks(key, group, comparisons.get(key, []))
        if key[1] == "binary":
            sec.blocks += roc_blocks(key, group, fig_dir)
        sec.blocks += fraction_blocks(key, group, fig_dir)
        if key[1] == "segmentation":
            sec.blocks += segmentation_blocks(group, fig_dir)
        out.append(sec)
    return out
