"""One self-contained HTML report of a volta3d run, plus the same tables in Markdown.

Inputs: any number of downstream ``results.json`` files (fine-tuning, probes, segmentation), an
optional pretraining run folder (``metrics.csv`` + ``config.yaml``; read with its optional
``online_eval.csv``, ``pretrain_data.json`` and ``log.txt``) and an optional ``stages.json``
(``{"stages": [{"name", "status", "seconds"}], "settings": {...}, "data": {...}}``). Runs are grouped
by task; within a task every model is compared with the VolTA-3D-initialised one (``report_runs``).

The page answers the reader's question first: the first screen holds the headline table, its
sentence, the forest plot and the provenance line (``report_headline``). Below it come the
pretraining health (a collapse alarm is also boxed at the page top), one section per task (tables,
with the long ones folded; ROC curves and reduced-data curves with one panel per group of
comparable models; segmentation overlays) and the settings, data counts, versions and stage times.

Outputs in ``out_dir``: ``report.html`` (every figure embedded as a base64 PNG, inline CSS, no
script, no external URL), ``figures/*.png`` and ``summary.md`` (``report_doc`` renders both).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from volta3d.errors import InputError, InputFileNotFound
from volta3d.evaluation import pretrain_health as health
from volta3d.evaluation import report_plots
from volta3d.evaluation.comparison import compare_results
from volta3d.evaluation.report_doc import (
    Alert,
    Block,
    Figure,
    Heading,
    Line,
    Note,
    Section,
    Table,
    digits_for,
    fmt_general,
    fmt_hms,
    fmt_num,
    fmt_p,
    fmt_signed,
    mean_sd,
    metric_label,
    omitted,
    render_html,
    render_markdown,
    slug,
)
from volta3d.evaluation.report_headline import headline_rows, headline_section, provenance_line
from volta3d.evaluation.report_runs import (
    COMPARE_METRICS,
    PRETRAIN_FILES,
    ReportInputs,
    Run,
    better_when_lower,
    comparable_group,
    default_name,
    discover_inputs,
    flatten,
    initialisation,
    named_inputs,
    pair_runs,
    read_config,
    task_title,
    test_subjects,
    top_predictions,
    variant,
)

__all__ = [
    "Run",
    "build_report",
    "default_name",
    "initialisation",
    "pair_runs",
]  # what other modules import here

REPORT_NAME, SUMMARY_NAME, FIGURES_DIR = "report.html", "summary.md", "figures"
TABLE_METRICS = {
    "binary": ["auroc", "balanced_accuracy", "sensitivity", "specificity", "balanced_accuracy_youden",
               "sensitivity_youden", "specificity_youden"],
    "multiclass": ["auroc", "balanced_accuracy"],
    "regression": ["mae", "r2"],
    "segmentation": ["dice", "hd95"],
}  # fmt: skip
PRETRAIN_HIGHLIGHTS = [
    "seed", "model.img_size", "model.patch_size", "model.hidden_size", "model.num_layers", "model.num_heads",
    "head.out_dim", "views.global_size", "views.local_size", "views.n_local", "masking.ratio",
    "loss.global_weight", "loss.local_weight", "loss.rec_weight", "loss.teacher_temp", "optim.epochs",
    "optim.batch_size", "optim.accum_steps", "optim.lr", "optim.warmup_epochs", "optim.momentum_teacher",
    "train.max_steps", "train.precision", "device",
]  # fmt: skip
DOWNSTREAM_SETTINGS = {
    "classify": ["mode", "pooling", "epochs", "batch_size", "lr", "img_size"],
    "segment": ["epochs", "batch_size", "lr", "crop_size", "feature_size", "split"],
    "probe": ["logreg_c", "knn_k", "ridge_alpha"],
}
SOFTWARE = ["torch", "monai", "volta3d", "numpy", "scikit-learn", "scipy", "pandas", "matplotlib"]
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
    index = pd.read_csv(pred_dir / "index.csv", dtype={"subject_id": str})
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
        if not (r.dir / "predictions" / "index.csv").exists():
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


# ----------------------------------------------------------------------------- pretraining


def _curve_blocks(pretrain: Path, metrics: pd.DataFrame, logk: float | None, fig_dir: Path) -> list[Block]:
    """The training curves and the first / last logged values."""
    path = report_plots.pretraining_figure(metrics, fig_dir / "pretraining.png", logk)
    blocks: list[Block] = [
        Figure(
            path,
            f"Pretraining ({pretrain.name}): losses, teacher entropies (dashed: log K, "
            "the entropy of a collapsed, uniform teacher), learning rate and gradient norm",
        )
    ]
    cols = [
        c
        for c in (
            "loss",
            "loss_global",
            "loss_local",
            "loss_rec",
            "teacher_entropy",
            "teacher_marginal_entropy",
            "teacher_patch_entropy",
            "lr",
            "grad_norm",
            "seconds_per_step",
        )
        if c in metrics.columns
    ]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    rows = [[c, fmt_general(first[c]), fmt_general(last[c])] for c in cols]
    blocks.append(
        Table(
            ["quantity", f"step {int(first['step'])}", f"step {int(last['step'])}"],
            rows,
            "First and last logged values",
        )
    )
    return blocks


def _health_blocks(
    metrics: pd.DataFrame, rows: list[health.HealthRow], alarm: tuple[int, int] | None, fig_dir: Path
) -> list[Block]:
    """The health table and, when any health quantity was logged, its curves."""
    n = health.HEALTH_WINDOW
    if not rows:
        return [
            Note("Pretraining health table not shown: metrics.csv logs no alignment loss or health quantity.")
        ]
    table = [
        [
            r.quantity,
            fmt_general(r.first),
            fmt_general(r.last),
            fmt_general(r.log_k),
            r.verdict or health.HEALTH_READINGS.get(r.quantity, ""),
        ]
        for r in rows
    ]
    blocks: list[Block] = [
        Table(
            [
                "quantity",
                f"mean, first {n} logged steps",
                f"mean, last {n} logged steps",
                "log K",
                "verdict / reading",
            ],
            table,
            f"Pretraining health: means over the first and last {n} logged steps (an alignment loss "
            "below log K shows a teacher that is not uniform)",
        )
    ]
    health_cols = [c for _, cols in report_plots.HEALTH_PANELS for c in cols]
    if any(c in metrics.columns and metrics[c].notna().any() for c in health_cols):
        path = report_plots.health_figure(
            metrics, fig_dir / "pretraining_health.png", alarm[0] if alarm else None
        )
        blocks.append(
            Figure(
                path,
                "Pretraining health: entropy gaps (marginal minus per-sample entropy), mean pairwise "
                "cosine of different volumes' CLS-style embeddings and effective ranks (RankMe)",
            )
        )
    return blocks


def _online_blocks(pretrain: Path, fig_dir: Path) -> list[Block]:
    """The online-probe curve per (label, metric) and its first / last values against the references."""
    table = health.read_online_eval(pretrain)
    if table is None:
        return [Note(f"Online-probe curve not shown: no {health.ONLINE_EVAL_NAME} in {pretrain}.")]
    if isinstance(table, str):
        return [Note(f"Online-probe curve not shown: {table}.")]
    panels = {}
    for (label, metric), rows in table.groupby(["label", "metric"], sort=True):
        better = "lower" if better_when_lower(metric) else "higher"
        panels[f"{label + ': ' if label else ''}{metric_label(metric)} ({better} is better)"] = rows
    path = report_plots.online_probe_figure(panels, fig_dir / "online_probe.png")
    blocks: list[Block] = [
        Figure(
            path,
            "Online probes during pretraining: the teacher's features (solid) against the "
            "initial weights and the raw-volume floor (dashed)",
        )
    ]
    rows = [
        [
            r["label"] or "—",
            metric_label(r["metric"]),
            r["probe"],
            r["feature"],
            fmt_num(r["first"]),
            f"{fmt_num(r['last'])} (step {r['last_step']})",
            fmt_num(r["init"]),
            fmt_num(r["raw"]),
        ]
        for r in health.online_summary(table)
    ]
    blocks.append(
        Table(
            [
                "label",
                "metric",
                "probe",
                "feature",
                "teacher, first",
                "teacher, last",
                "initial weights",
                "raw volume",
            ],
            rows,
            "Online probes: the teacher at its first and last evaluation",
        )
    )
    return blocks


def pretraining_section(pretrain: Path | None, fig_dir: Path) -> Section:
    """Pretraining health: losses against log K, entropies, spread, the online probe and the alarm."""
    sec = Section("Pretraining", "pretraining")
    if pretrain is None:
        return omitted(sec, "no pretraining run folder (metrics.csv + config.yaml) among the inputs")
    metrics = pd.read_csv(pretrain / "metrics.csv").apply(pd.to_numeric, errors="coerce")
    if metrics.empty or "step" not in metrics.columns:
        return omitted(sec, f"{pretrain / 'metrics.csv'} holds no logged steps")
    logk = health.log_k(metrics, flatten(read_config(pretrain / "config.yaml")).get("head.out_dim"))
    rows, alarm = health.health_rows(metrics, logk), health.first_alarm(metrics)
    if alarm:
        sec.blocks.append(
            Alert(
                f"Collapse alarm: the pretraining health check fired first at step {alarm[0]} "
                f"({alarm[1]} logged step(s) in all). The encoder may have collapsed; read the "
                "Pretraining section before trusting any result built on it."
            )
        )
    sec.blocks.append(health.health_sentence(rows, alarm, "collapse_alarm" in metrics.columns))
    sec.blocks += _curve_blocks(pretrain, metrics, logk, fig_dir)
    sec.blocks += _health_blocks(metrics, rows, alarm, fig_dir)
    sec.blocks += _online_blocks(pretrain, fig_dir)
    return sec


# ----------------------------------------------------------------------------- settings


def _versions() -> list[list[str]]:
    rows = [["python", platform.python_version()]]
    for pkg in SOFTWARE:
        try:
            rows.append([pkg, metadata.version(pkg)])
        except metadata.PackageNotFoundError:
            rows.append([pkg, "not installed"])
    return rows


def _downstream_rows(runs: list[Run]) -> list[list[str]]:
    rows = []
    for r in runs:
        task = r.task_key[0]
        conf = r.results.get("config", {}).get(task, {})
        settings = ", ".join(f"{k}={conf[k]}" for k in DOWNSTREAM_SETTINGS.get(task, []) if k in conf)
        rows.append([r.name, task_title(r.task_key), f"{r.results.get('splits', {}).get('method', '?')} "
                     f"({len(r.results['folds'])})", str(len(test_subjects(r))), settings or "—"])  # fmt: skip
    return rows


def settings_section(runs: list[Run], pretrain: Path | None, info: Mapping[str, Any]) -> Section:
    """Configuration highlights, downstream settings, stages.json's settings, data counts and stage
    times, and the software versions."""
    sec = Section("Run settings, data and software", "settings")
    if pretrain is not None:
        cfg = flatten(read_config(pretrain / "config.yaml"))
        rows = [[k, str(cfg[k])] for k in PRETRAIN_HIGHLIGHTS if k in cfg]
        sec.blocks.append(
            Table(
                ["setting", "value"],
                rows,
                f"Pretraining configuration highlights ({pretrain / 'config.yaml'})",
            )
        )
    if runs:
        sec.blocks.append(
            Table(
                ["model", "task", "split (folds)", "test subjects", "settings"],
                _downstream_rows(runs),
                "Downstream runs",
            )
        )
    for key, caption in (("settings", "Demo settings (stages.json)"), ("data", "Data counts (stages.json)")):
        if isinstance(info.get(key), Mapping) and info[key]:
            sec.blocks.append(
                Table(["item", "value"], [[k, str(v)] for k, v in flatten(info[key]).items()], caption)
            )
    stages = [s for s in info.get("stages", []) if isinstance(s, Mapping)]
    if stages:
        total = sum(s.get("seconds") or 0 for s in stages)
        rows = [
            [str(s.get("name", "?")), str(s.get("status", "?")), fmt_hms(s.get("seconds"))] for s in stages
        ]
        sec.blocks.append(
            Table(
                ["stage", "status", "wall time (h:mm:ss)"],
                [*rows, ["total", "", fmt_hms(total)]],
                "Wall time per stage",
            )
        )
    else:
        sec.blocks.append(Note("Wall time per stage omitted: no stages.json among the inputs."))
    sec.blocks.append(
        Table(["package", "version"], _versions(), "Software (the environment that built this report)")
    )
    return sec


# ----------------------------------------------------------------------------- entry point


def _resolve_inputs(
    runs: Mapping[str, Sequence[str | Path]] | Sequence[str | Path] | str | Path,
    pretrain: str | Path | None,
    stages: str | Path | None,
    reference: str | None,
) -> ReportInputs:
    """Discovered or named runs, with an explicit pretraining folder / stages.json overriding discovery."""
    if isinstance(runs, Mapping):
        inputs = ReportInputs(named_inputs(runs))
    else:
        inputs = discover_inputs([runs] if isinstance(runs, (str, Path)) else list(runs))
    if pretrain is not None:
        if not all((Path(pretrain) / f).is_file() for f in PRETRAIN_FILES):
            raise InputFileNotFound(f"pretraining folder {pretrain} needs {' and '.join(PRETRAIN_FILES)}")
        inputs.pretrain = Path(pretrain)
    if stages is not None:
        if not Path(stages).is_file():
            raise InputFileNotFound(f"stages file not found: {stages}")
        inputs.stages = Path(stages)
    if reference is not None and reference not in {r.name for r in inputs.runs}:
        raise InputError(
            f"--reference '{reference}' names no model (models: {', '.join(sorted({r.name for r in inputs.runs}))})"
        )
    return inputs


def _compare(
    tasks: dict[tuple, list[Run]], reference: str | None, n_boot: int, seed: int
) -> dict[tuple, list[tuple]]:
    """Per task, (reference, other, compare_results dictionary or the reason they are not comparable)."""
    comparisons: dict[tuple, list[tuple]] = {}
    for key, group in tasks.items():
        for ref, other in pair_runs(group, reference)[1]:
            try:
                cmp: dict[str, Any] | str = compare_results(
                    ref.results, other.results, n_boot=n_boot, seed=seed
                )
            except ValueError as err:
                cmp = str(err)
            comparisons.setdefault(key, []).append((ref, other, cmp))
    return comparisons


def _fresh_figures(out: Path) -> Path:
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of an earlier report of other runs must not linger
        old.unlink()
    return fig_dir


def build_report(
    runs: Mapping[str, Sequence[str | Path]] | Sequence[str | Path] | str | Path,
    out_dir: str | Path,
    *,
    title: str = "volta3d run report",
    reference: str | None = None,
    pretrain: str | Path | None = None,
    stages: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> Path:
    """Write ``report.html``, ``figures/`` and ``summary.md`` into ``out_dir``; return the HTML path.

    ``runs``: ``{model name: [results.json or run folder, ...]}``, or paths (files or folders) in which
    results.json files, a pretraining folder and stages.json are discovered. ``pretrain`` / ``stages``
    override what discovery finds. ``reference``: the model name every other model of a task is
    compared with (default: the VolTA-3D-initialised model)."""
    inputs = _resolve_inputs(runs, pretrain, stages, reference)
    out = Path(out_dir)
    fig_dir = _fresh_figures(out)
    tasks: dict[tuple, list[Run]] = {}
    for r in inputs.runs:
        tasks.setdefault(r.task_key, []).append(r)
    tasks = {k: sorted(v, key=lambda r: (not r.pretrained, r.name)) for k, v in sorted(tasks.items())}
    comparisons = _compare(tasks, reference, n_boot, seed)
    info: dict[str, Any] = json.loads(inputs.stages.read_text()) if inputs.stages else {}
    all_runs = [r for group in tasks.values() for r in group]
    who = "VolTA-3D" if all(r.pretrained for r in inputs.runs if r.name == reference) else "reference"
    sections = [
        headline_section(
            headline_rows(tasks, comparisons, reference),
            provenance_line(inputs.pretrain, all_runs, info),
            fig_dir,
            who,
        ),
        pretraining_section(inputs.pretrain, fig_dir),
        *task_sections(tasks, comparisons, fig_dir),
        settings_section(all_runs, inputs.pretrain, info),
    ]
    generated = (
        f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by volta3d report from "
        f"{len(inputs.runs)} results file(s); bootstrap: {n_boot} resamples, seed {seed}."
    )
    (out / SUMMARY_NAME).write_text(render_markdown(title, sections, generated, out))
    path = out / REPORT_NAME
    path.write_text(render_html(title, sections, generated))
    return path
