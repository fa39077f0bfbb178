"""One self-contained HTML report of a volta3d run (issue 7), plus the same tables in Markdown.

Inputs: any number of downstream ``results.json`` files (fine-tuning, probes, segmentation), an
optional pretraining run folder (``metrics.csv`` + ``config.yaml``) and an optional ``stages.json``
(``{"stages": [{"name", "status", "seconds"}], "settings": {...}, "data": {...}}``). Runs are grouped
by task = (task, kind, label) as recorded in results.json. Within a task the reference is the
VolTA-3D-initialised model (an encoder export that is not a random-init embedding) unless a name is
given; every other model is compared with it by ``compare_results`` (paired over the same folds).

The headline is derived from those comparisons only: which model is better on the primary metric,
by how much, and whether the 95 % bootstrap CI of the difference excludes 0.

Outputs in ``out_dir``: ``report.html`` (every figure embedded as a base64 PNG, inline CSS, no
script, no external URL), ``figures/*.png`` and ``summary.md``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from volta3d.evaluation import report_plots
from volta3d.evaluation.comparison import compare_results
from volta3d.evaluation.results import RESULTS_NAME, load_run

STAGES_NAME = "stages.json"
PRETRAIN_FILES = ("metrics.csv", "config.yaml")
REPORT_NAME, SUMMARY_NAME, FIGURES_DIR = "report.html", "summary.md", "figures"
LOWER_IS_BETTER = ("mae", "hd95")
METRIC_LABELS = {
    "auroc": "AUROC", "balanced_accuracy": "bal. acc.", "sensitivity": "sens.", "specificity": "spec.",
    "balanced_accuracy_youden": "bal. acc. (Youden)", "sensitivity_youden": "sens. (Youden)",
    "specificity_youden": "spec. (Youden)", "mae": "MAE", "r2": "R²", "dice": "Dice", "hd95": "HD95 (mm)",
    "dice_mean": "Dice (per subject)", "hd95_mean": "HD95 (mm, per subject)",
}  # fmt: skip
TABLE_METRICS = {
    "binary": ["auroc", "balanced_accuracy", "sensitivity", "specificity", "balanced_accuracy_youden",
               "sensitivity_youden", "specificity_youden"],
    "multiclass": ["auroc", "balanced_accuracy"],
    "regression": ["mae", "r2"],
    "segmentation": ["dice", "hd95"],
}  # fmt: skip
COMPARE_METRICS = {
    "binary": ["auroc", "balanced_accuracy_youden"], "multiclass": ["auroc", "balanced_accuracy"],
    "regression": ["mae", "r2"], "segmentation": ["dice", "hd95"],
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
SMALL_SUBJECTS, SMALL_FOLDS = 20, 5  # below these, a 'significant' bootstrap CI is flagged as indicative


# ----------------------------------------------------------------------------- inputs


@dataclass
class Run:
    """One downstream results file (``load_run`` dictionary, with ``predictions`` and ``dir``)."""

    name: str
    results: dict[str, Any]

    @property
    def dir(self) -> Path:
        return Path(self.results["dir"])

    @property
    def kind(self) -> str:
        return str(self.results.get("kind", "?"))

    @property
    def pretrained(self) -> bool:
        """Initialised from a VolTA-3D encoder export (a random-init embedding of one does not count)."""
        return bool(self.results.get("encoder")) and self.results.get("embedding_init") != "random-init"

    @property
    def task_key(self) -> tuple[str, str, str]:
        r = self.results
        return str(r.get("task", "?")), self.kind, str(r.get("label", "?"))

    @property
    def primary(self) -> str:
        return str(self.results.get("primary_metric") or COMPARE_METRICS.get(self.kind, ["auroc"])[0])


@dataclass
class ReportInputs:
    runs: list[Run]
    pretrain: Path | None = None
    stages: Path | None = None


def default_name(results: Mapping[str, Any]) -> str:
    """``vit-pretrained``, ``unet-scratch``; probes add the embedding's initialisation."""
    name = str(results.get("model", "model"))
    return f"{name} ({results['embedding_init']})" if results.get("embedding_init") else name


def _unique_names(runs: list[Run]) -> list[Run]:
    """Two runs of one task with the same name (e.g. two pretraining configs) get their folder appended."""
    by_task: dict[tuple, list[Run]] = {}
    for r in runs:
        by_task.setdefault((r.task_key, r.name), []).append(r)
    for group in by_task.values():
        if len(group) > 1:
            for r in group:
                r.name = f"{r.name} [{r.dir.parent.name}/{r.dir.name}]"
    return runs


def discover_inputs(paths: Sequence[str | Path]) -> ReportInputs:
    """Find results.json files, pretraining folders and stages.json under each path (a file or a folder,
    searched recursively)."""
    results: dict[Path, None] = {}
    pretrain: list[Path] = []
    stages: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"report input not found: {p}")
        if p.is_file():
            if p.name == STAGES_NAME:
                stages.append(p)
            elif p.suffix == ".json":
                results[p.resolve()] = None
            else:
                raise ValueError(f"report input {p} is neither a results.json, a stages.json nor a folder")
            continue
        results.update((f.resolve(), None) for f in sorted(p.rglob(RESULTS_NAME)))
        pretrain += [m.parent for m in sorted(p.rglob(PRETRAIN_FILES[0])) if (m.parent / PRETRAIN_FILES[1]).exists()]
        stages += sorted(p.rglob(STAGES_NAME), key=lambda s: len(s.parts))
    if not (results or pretrain or stages):
        raise ValueError(f"no {RESULTS_NAME}, pretraining run (metrics.csv + config.yaml) or {STAGES_NAME} found in "
                         + ", ".join(str(p) for p in paths))  # fmt: skip
    runs = []
    for f in results:
        r = load_run(f)
        runs.append(Run(default_name(r), r))
    return ReportInputs(_unique_names(runs), pretrain[0] if pretrain else None, stages[0] if stages else None)


def named_inputs(runs: Mapping[str, Sequence[str | Path]]) -> list[Run]:
    """``{model name: [results.json or run folder, ...]}`` (one file per task) -> runs."""
    out = [Run(name, load_run(p)) for name, files in runs.items() for p in files]
    seen: dict[tuple, Path] = {}
    for r in out:
        key = (r.task_key, r.name)
        if key in seen:
            raise ValueError(f"model '{r.name}' has two results for task {'/'.join(r.task_key)}: {seen[key]} and {r.dir}")
        seen[key] = r.dir
    return out


# ----------------------------------------------------------------------------- document model


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Note:
    """A one-line remark (an omitted part, a caveat), set apart from findings."""

    text: str


@dataclass
class Section:
    title: str
    anchor: str
    blocks: list[Table | Figure | Note | str] = field(default_factory=list)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def _general(v: Any) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _p(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def _digits(metric: str) -> int:
    return 2 if metric.startswith("hd95") else 3


def mean_sd(agg: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 ± 0.031`` (SD over folds); just the mean when there is one fold."""
    if not agg or not agg.get("n"):
        return "—"
    sd = agg.get("sd")
    if sd is None or not math.isfinite(sd):
        return _num(agg["mean"], digits)
    return f"{_num(agg['mean'], digits)} ± {_num(sd, digits)}"


def metric_label(metric: str) -> str:
    m = re.fullmatch(r"(dice|hd95)_label(\d+)", metric)
    if m:
        return f"{METRIC_LABELS[m.group(1)]} label {m.group(2)}"
    return METRIC_LABELS.get(metric, metric)


def task_title(key: tuple[str, str, str]) -> str:
    task, kind, label = key
    if kind == "segmentation":
        return "segmentation" if label in ("label_path", "?") else f"segmentation of {label}"
    how = {"classify": "fine-tuning", "probe": "frozen-feature probes"}.get(task, task)
    return f"{label} ({kind}, {how})"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def _omitted(section: Section, why: str) -> Section:
    section.blocks.append(Note(f"Omitted: {why}."))
    return section


# ----------------------------------------------------------------------------- comparisons


def better_when_lower(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


def pair_runs(group: list[Run], reference: str | None) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """References of a task and the (reference, other) pairs to compare. A baseline meets the
    reference with the same underlying model (e.g. the same probe on random-init features), else
    the first reference by name."""
    refs = [r for r in group if r.name == reference] if reference else []
    if not refs:
        refs = sorted((r for r in group if r.pretrained), key=lambda r: r.name)
    if not refs:
        return [], []
    pairs = []
    for other in sorted((r for r in group if r not in refs), key=lambda r: r.name):
        same = [r for r in refs if r.results.get("model") == other.results.get("model")]
        pairs.append(((same or refs)[0], other))
    return refs, pairs


def evidence(cmp: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    """The strongest paired evidence on ``metric`` in a comparison: DeLong on pooled AUROC, else
    per-subject values (segmentation), else folds (needs at least 2). None when nothing is testable."""
    d = cmp.get("delong")
    if metric == "auroc" and d:
        return {"a": d["auroc_a"], "b": d["auroc_b"], "diff": d["diff"], "low": d["ci_low"], "high": d["ci_high"],
                "test": f"DeLong p = {_p(d['p'])}", "basis": f"pooled out-of-fold AUROC, bootstrap over {d['n']} subjects",
                "n": d["n"], "unit": "subjects"}
    sub = cmp.get("subject_level", {}).get(f"{metric}_mean")
    if sub:
        return {"a": sub["mean_a"], "b": sub["mean_b"], "diff": sub["estimate"], "low": sub["ci_low"],
                "high": sub["ci_high"], "test": f"Wilcoxon p = {_p(sub['wilcoxon_p'])}",
                "basis": f"per subject, bootstrap over {sub['n']} subjects", "n": sub["n"], "unit": "subjects"}
    fold = cmp.get("fold_level", {}).get(metric)
    if fold and fold["n"] >= 2:
        return {"a": fold["mean_a"], "b": fold["mean_b"], "diff": fold["estimate"], "low": fold["ci_low"],
                "high": fold["ci_high"], "test": f"Wilcoxon p = {_p(fold['wilcoxon_p'])}",
                "basis": f"mean over {fold['n']} folds, bootstrap over folds", "n": fold["n"], "unit": "folds"}
    return None


def headline_sentence(title: str, ref: Run, other: Run, cmp: Mapping[str, Any] | str) -> str:
    """One sentence: did the reference beat ``other`` on the task's primary metric, and is the
    difference significant (95 % CI of the paired difference excludes 0)? ``cmp`` is a
    ``compare_results`` dictionary or the reason the runs could not be compared."""
    who = f"the VolTA-3D-initialised model ({ref.name})" if ref.pretrained else ref.name
    lead = f"{title[0].upper()}{title[1:]}: {who}"
    if isinstance(cmp, str):
        return f"{lead} could not be compared with {other.name} (not comparable: {cmp})."
    metric = ref.primary
    ev = evidence(cmp, metric)
    if ev is None:
        return f"{lead} vs {other.name}: no paired {metric_label(metric)} values to test (one fold, no per-subject values)."
    dg = _digits(metric)
    numbers = (f"{metric_label(metric)} {_num(ev['a'], dg)} vs {_num(ev['b'], dg)}, difference {ev['diff']:+.{dg}f} "
               f"(95 % CI {ev['low']:+.{dg}f} to {ev['high']:+.{dg}f}; {ev['test']}; {ev['basis']})")
    significant = ev["low"] > 0 or ev["high"] < 0
    few = ev["n"] < (SMALL_SUBJECTS if ev["unit"] == "subjects" else SMALL_FOLDS)
    caveat = f" Only {ev['n']} {ev['unit']}: indicative at best." if few else ""
    if ev["diff"] == 0:
        return f"{lead} tied with {other.name}: {numbers}.{caveat}"
    won = ev["diff"] < 0 if better_when_lower(metric) else ev["diff"] > 0
    if won:
        verdict = ("the difference is significant (the CI excludes 0)" if significant
                   else "but the difference is not significant (the CI includes 0)")
        return f"{lead} beat {other.name}: {numbers}; {verdict}.{caveat}"
    verdict = (f"{other.name} is significantly better (the CI excludes 0)" if significant
               else "the difference is not significant (the CI includes 0)")
    plain = " Pretraining did not help here." if ref.pretrained else ""
    return f"{lead} did not beat {other.name}: {numbers}; {verdict}.{plain}{caveat}"


def comparison_rows(ref: Run, other: Run, cmp: Mapping[str, Any] | str) -> list[list[str]]:
    """Rows of the paired-comparison table (differences are reference - other)."""
    if isinstance(cmp, str):
        return [[ref.name, other.name, f"not comparable: {cmp}", *["—"] * 7]]
    rows = []
    for m in COMPARE_METRICS.get(ref.kind, []):
        r = cmp["fold_level"].get(m)
        if r:
            dg = _digits(m)
            tested = r["n"] >= 2  # one fold: a difference, but nothing to resample or rank
            rows.append([ref.name, other.name, metric_label(m), f"folds ({r['n']})", _num(r["mean_a"], dg),
                         _num(r["mean_b"], dg), f"{r['estimate']:+.{dg}f}",
                         f"[{r['ci_low']:+.{dg}f}, {r['ci_high']:+.{dg}f}]" if tested else "—",
                         "Wilcoxon" if tested else "—", _p(r["wilcoxon_p"]) if tested else "—"])
    for m, r in cmp["subject_level"].items():
        if m in ("dice_mean", "hd95_mean"):
            dg = _digits(m)
            rows.append([ref.name, other.name, metric_label(m), f"subjects ({r['n']})", _num(r["mean_a"], dg),
                         _num(r["mean_b"], dg), f"{r['estimate']:+.{dg}f}",
                         f"[{r['ci_low']:+.{dg}f}, {r['ci_high']:+.{dg}f}]", "Wilcoxon", _p(r["wilcoxon_p"])])
    d = cmp.get("delong")
    if d:
        rows.append([ref.name, other.name, "AUROC (pooled)", f"subjects ({d['n']})", _num(d["auroc_a"]),
                     _num(d["auroc_b"]), f"{d['diff']:+.3f}", f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]",
                     "DeLong", _p(d["p"])])
    return rows


COMPARISON_COLUMNS = ["reference", "compared with", "metric", "paired over", "reference value", "other value",
                      "difference", "95 % CI", "test", "p"]


# ----------------------------------------------------------------------------- sections


def _top_predictions(run: Run) -> pd.DataFrame | None:
    pred = run.results.get("predictions")
    if pred is None or pred.empty:
        return None
    if "fraction" in pred.columns:
        pred = pred[pred["fraction"] == pred["fraction"].max()]
    return pred


def results_section(tasks: dict[tuple, list[Run]], comparisons: dict[tuple, list[tuple]]) -> Section:
    sec = Section("Results per task", "results")
    if not tasks:
        return _omitted(sec, "no downstream results.json among the inputs")
    sec.blocks.append("Mean ± SD over folds (the aggregate in each results.json). Differences in the "
                      "comparison tables are reference − other, paired over the same folds or subjects.")
    for key, group in tasks.items():
        metrics = [m for m in TABLE_METRICS.get(key[1], []) if any(m in r.results["aggregate"] for r in group)]
        rows = []
        for r in group:
            agg = r.results["aggregate"]
            init = "VolTA-3D" if r.pretrained else ("random init" if r.results.get("embedding_init") else "scratch")
            rows.append([r.name, init, str(len(r.results["folds"])),
                         *[mean_sd(agg.get(m), _digits(m)) for m in metrics]])
        sec.blocks.append(Table(["model", "initialisation", "folds", *map(metric_label, metrics)], rows,
                                f"{task_title(key)}: metrics over folds"))
        pairs = comparisons.get(key, [])
        if pairs:
            cmp_rows = [row for ref, other, cmp in pairs for row in comparison_rows(ref, other, cmp)]
            sec.blocks.append(Table(COMPARISON_COLUMNS, cmp_rows, f"{task_title(key)}: paired comparisons"))
        else:
            sec.blocks.append(Note(f"{task_title(key)}: no VolTA-3D-initialised model (or named reference) to compare against."))
    return sec


def roc_section(tasks: dict[tuple, list[Run]], fig_dir: Path) -> Section:
    sec = Section("ROC curves", "roc")
    for key, group in tasks.items():
        if key[1] != "binary":
            continue
        curves = {}
        for r in group:
            pred = _top_predictions(r)
            if pred is not None and {"y_true", "score"} <= set(pred.columns) and pred["y_true"].nunique() == 2:
                curves[r.name] = (pred["y_true"].to_numpy(int), pred["score"].to_numpy(float))
        if curves:
            path = report_plots.roc_figure(curves, task_title(key), fig_dir / f"roc_{_slug(task_title(key))}.png")
            sec.blocks.append(Figure(path, f"{task_title(key)}: ROC of out-of-fold predictions pooled over folds "
                                           "(largest training fraction)"))
    if not sec.blocks:
        return _omitted(sec, "no binary classification run with predictions.csv among the inputs")
    return sec


def fractions_section(tasks: dict[tuple, list[Run]], fig_dir: Path) -> Section:
    sec = Section("Reduced-data curves", "fractions")
    for key, group in tasks.items():
        with_fractions = [r for r in group if r.results.get("fractions")]
        if not with_fractions:
            continue
        metric = with_fractions[0].primary
        points, rows = {}, []
        for r in with_fractions:
            recs = []
            for frac, entry in r.results["fractions"].items():
                agg = entry["aggregate"].get(metric, {})
                recs.append({"fraction": float(frac), "mean": agg.get("mean"), "sd": agg.get("sd")})
                rows.append([r.name, f"{float(frac):g}", mean_sd(agg, _digits(metric)), str(agg.get("n", 0))])
            points[r.name] = pd.DataFrame(recs, dtype=float)
        path = report_plots.fraction_figure(points, metric_label(metric), task_title(key),
                                            fig_dir / f"fractions_{_slug(task_title(key))}.png")
        sec.blocks.append(Figure(path, f"{task_title(key)}: {metric_label(metric)} vs training fraction (mean ± SD over folds)"))
        sec.blocks.append(Table(["model", "training fraction", metric_label(metric), "folds"], rows,
                                f"{task_title(key)}: reduced-data curve"))
    if not sec.blocks:
        return _omitted(sec, "no run with several training fractions among the inputs")
    return sec


def _load_case(row: Any, pred_dir: Path, label: str) -> dict[str, Any]:
    image = np.load(row.image).astype(np.float32)
    truth, pred = np.load(row.label), np.load(pred_dir / row.prediction)
    image, truth = image.reshape(image.shape[-3:]), truth.reshape(truth.shape[-3:])  # (1, D, H, W) -> (D, H, W)
    if not image.shape == truth.shape == pred.shape:
        raise ValueError(f"shapes differ: scan {image.shape}, mask {truth.shape}, prediction {pred.shape}")
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


def segmentation_section(tasks: dict[tuple, list[Run]], fig_dir: Path) -> Section:
    sec = Section("Segmentation", "segmentation")
    seg = [r for key, group in tasks.items() if key[1] == "segmentation" for r in group]
    if not seg:
        return _omitted(sec, "no segmentation run among the inputs")
    rows = []
    for r in seg:
        agg = r.results["aggregate"]
        for c in [c for c in r.results.get("classes", []) if c != 0]:
            rows.append([r.name, f"label {c}", mean_sd(agg.get(f"dice_label{c}")),
                         mean_sd(agg.get(f"hd95_label{c}"), 2)])
    sec.blocks.append(Table(["model", "structure", "Dice", "HD95 (mm)"], rows,
                            "Per structure: mean ± SD over folds (each fold: mean over its test subjects)"))
    drawn = False
    for r in seg:
        if not (r.dir / "predictions" / "index.csv").exists():
            continue
        cases, notes = overlay_cases(r)
        sec.blocks.extend(map(Note, notes))
        if cases:
            path = report_plots.overlay_figure(cases, r.name, fig_dir / f"overlay_{_slug(r.name)}.png")
            sec.blocks.append(Figure(path, f"{r.name}: test subjects with the lowest, median and highest Dice; "
                                           "ground truth in cyan, prediction in orange"))
            drawn = True
    if not drawn:
        sec.blocks.append(Note("Overlays omitted: no segmentation run saved its test predictions (predictions/index.csv)."))
    return sec


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    return out


def _read_config(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def pretraining_section(pretrain: Path | None, fig_dir: Path) -> Section:
    sec = Section("Pretraining", "pretraining")
    if pretrain is None:
        return _omitted(sec, "no pretraining run folder (metrics.csv + config.yaml) among the inputs")
    metrics = pd.read_csv(pretrain / "metrics.csv").apply(pd.to_numeric, errors="coerce")
    if metrics.empty or "step" not in metrics.columns:
        return _omitted(sec, f"{pretrain / 'metrics.csv'} holds no logged steps")
    out_dim = _flatten(_read_config(pretrain / "config.yaml")).get("head.out_dim")
    log_k = math.log(out_dim) if out_dim else None
    path = report_plots.pretraining_figure(metrics, fig_dir / "pretraining.png", log_k)
    sec.blocks.append(Figure(path, f"Pretraining ({pretrain.name}): losses, teacher entropies (dashed: log K, "
                                   "the entropy of a collapsed, uniform teacher), learning rate and gradient norm"))
    cols = [c for c in ("loss", "loss_global", "loss_local", "loss_rec", "teacher_entropy", "teacher_marginal_entropy",
                        "teacher_patch_entropy", "lr", "grad_norm", "seconds_per_step") if c in metrics.columns]
    first, last = metrics.iloc[0], metrics.iloc[-1]
    rows = [[c, _general(first[c]), _general(last[c])] for c in cols]
    sec.blocks.append(Table(["quantity", f"step {int(first['step'])}", f"step {int(last['step'])}"], rows,
                            "First and last logged values"))
    return sec


def _versions() -> list[list[str]]:
    rows = [["python", platform.python_version()]]
    for pkg in SOFTWARE:
        try:
            rows.append([pkg, metadata.version(pkg)])
        except metadata.PackageNotFoundError:
            rows.append([pkg, "not installed"])
    return rows


def _hms(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def settings_section(runs: list[Run], pretrain: Path | None, stages: Path | None) -> Section:
    sec = Section("Run settings, data and software", "settings")
    info: dict[str, Any] = json.loads(stages.read_text()) if stages else {}
    if pretrain is not None:
        cfg = _flatten(_read_config(pretrain / "config.yaml"))
        rows = [[k, str(cfg[k])] for k in PRETRAIN_HIGHLIGHTS if k in cfg]
        sec.blocks.append(Table(["setting", "value"], rows, f"Pretraining configuration highlights ({pretrain / 'config.yaml'})"))
    if runs:
        rows = []
        for r in runs:
            task = r.task_key[0]
            conf = r.results.get("config", {}).get(task, {})
            splits = r.results.get("splits", {})
            subjects = {s for f in splits.get("folds", []) for s in f.get("test", [])}
            settings = ", ".join(f"{k}={conf[k]}" for k in DOWNSTREAM_SETTINGS.get(task, []) if k in conf)
            rows.append([r.name, task_title(r.task_key), f"{splits.get('method', '?')} ({len(r.results['folds'])})",
                         str(len(subjects)), settings or "—"])
        sec.blocks.append(Table(["model", "task", "split (folds)", "test subjects", "settings"], rows, "Downstream runs"))
    for key, caption in (("settings", "Demo settings (stages.json)"), ("data", "Data counts (stages.json)")):
        if isinstance(info.get(key), Mapping) and info[key]:
            sec.blocks.append(Table(["item", "value"], [[k, str(v)] for k, v in _flatten(info[key]).items()], caption))
    stage_rows = [[str(s.get("name", "?")), str(s.get("status", "?")), _hms(s.get("seconds"))]
                  for s in info.get("stages", []) if isinstance(s, Mapping)]
    if stage_rows:
        total = sum(s.get("seconds") or 0 for s in info["stages"] if isinstance(s, Mapping))
        sec.blocks.append(Table(["stage", "status", "wall time (h:mm:ss)"], [*stage_rows, ["total", "", _hms(total)]],
                                "Wall time per stage"))
    else:
        sec.blocks.append(Note("Wall time per stage omitted: no stages.json among the inputs."))
    sec.blocks.append(Table(["package", "version"], _versions(), "Software (the environment that built this report)"))
    return sec


def headline_section(tasks: dict[tuple, list[Run]], comparisons: dict[tuple, list[tuple]]) -> Section:
    sec = Section("Headline", "headline")
    if not tasks:
        return _omitted(sec, "no downstream results.json among the inputs, so there is nothing to compare")
    for key in tasks:
        pairs = comparisons.get(key, [])
        if not pairs:
            sec.blocks.append(Note(f"{task_title(key)[0].upper()}{task_title(key)[1:]}: no VolTA-3D-initialised model "
                                   "among the inputs, so nothing to compare."))
        sec.blocks.extend(headline_sentence(task_title(key), ref, other, cmp) for ref, other, cmp in pairs)
    sec.blocks.append(Note("Significant means the 95 % bootstrap CI of the paired difference excludes 0. With few "
                           "folds or subjects these intervals are wide, and no correction for multiple comparisons "
                           "is applied."))
    return sec


# ----------------------------------------------------------------------------- rendering

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 32px 48px;background:#fff;min-height:100vh}
h1{font-size:1.7em;margin:0 0 4px} h2{font-size:1.3em;border-bottom:2px solid #e3e6ec;padding-bottom:4px;margin-top:36px}
.meta{color:#5b6474;font-size:.9em;margin-bottom:12px} nav{font-size:.92em;margin:8px 0 16px}
nav a{margin-right:14px;color:#0a58a8;text-decoration:none} p{line-height:1.5;margin:8px 0}
.headline p.finding{background:#f1f6fd;border-left:4px solid #0a58a8;padding:8px 12px;margin:8px 0}
p.caption{font-weight:600;font-size:.9em;color:#333a47;margin:18px 0 4px}
.table-wrap{overflow-x:auto;margin:0 0 16px}
table{border-collapse:collapse;font-size:.86em;min-width:40%}
th,td{border:1px solid #d9dde4;padding:4px 9px;text-align:left;white-space:nowrap}
th{background:#eef1f5} tr:nth-child(even) td{background:#fafbfc}
figure{margin:14px 0 24px} figure img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{font-size:.86em;color:#4a5262;margin-top:4px} p.note{color:#5b6474;font-style:italic;font-size:.92em}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def render_html(title: str, sections: list[Section], generated: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{e(title)}</h1>", f'<div class="meta">{e(generated)}</div>',
             "<nav>" + "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        parts.append(f'<section id="{s.anchor}" class="{s.anchor}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, Table):
                head = "".join(f"<th>{e(c)}</th>" for c in b.columns)
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
                parts.append(f'<p class="caption">{e(b.caption)}</p><div class="table-wrap"><table>'
                             f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")
            elif isinstance(b, Figure):
                parts.append(f'<figure><img src="{_data_uri(b.path)}" alt="{e(b.caption)}">'
                             f"<figcaption>{e(b.caption)}</figcaption></figure>")
            elif isinstance(b, Note):
                parts.append(f'<p class="note">{e(b.text)}</p>')
            else:
                parts.append(f'<p class="finding">{e(b)}</p>')
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def render_markdown(title: str, sections: list[Section], generated: str, out_dir: Path) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"# {title}", "", generated, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                lines += [f"**{cell(b.caption)}**", "", "| " + " | ".join(map(cell, b.columns)) + " |",
                          "|" + "---|" * len(b.columns)]
                lines += ["| " + " | ".join(map(cell, row)) + " |" for row in b.rows]
            elif isinstance(b, Figure):
                lines.append(f"![{cell(b.caption)}]({b.path.relative_to(out_dir).as_posix()})")
            elif isinstance(b, Note):
                lines.append(f"*{b.text}*")
            else:
                lines.append(b)
            lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


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
    if isinstance(runs, Mapping):
        inputs = ReportInputs(named_inputs(runs))
    else:
        inputs = discover_inputs([runs] if isinstance(runs, (str, Path)) else list(runs))
    if pretrain is not None:
        if not all((Path(pretrain) / f).is_file() for f in PRETRAIN_FILES):
            raise FileNotFoundError(f"pretraining folder {pretrain} needs {' and '.join(PRETRAIN_FILES)}")
        inputs.pretrain = Path(pretrain)
    if stages is not None:
        if not Path(stages).is_file():
            raise FileNotFoundError(f"stages file not found: {stages}")
        inputs.stages = Path(stages)
    if reference is not None and reference not in {r.name for r in inputs.runs}:
        raise ValueError(f"--reference '{reference}' names no model (models: {', '.join(sorted({r.name for r in inputs.runs}))})")

    out = Path(out_dir)
    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # figures of an earlier report of other runs must not linger
        old.unlink()
    tasks: dict[tuple, list[Run]] = {}
    for r in inputs.runs:
        tasks.setdefault(r.task_key, []).append(r)
    tasks = {k: sorted(v, key=lambda r: (not r.pretrained, r.name)) for k, v in sorted(tasks.items())}
    comparisons: dict[tuple, list[tuple]] = {}
    for key, group in tasks.items():
        for ref, other in pair_runs(group, reference)[1]:
            try:
                cmp: dict[str, Any] | str = compare_results(ref.results, other.results, n_boot=n_boot, seed=seed)
            except ValueError as err:
                cmp = str(err)
            comparisons.setdefault(key, []).append((ref, other, cmp))

    sections = [
        headline_section(tasks, comparisons),
        results_section(tasks, comparisons),
        roc_section(tasks, fig_dir),
        fractions_section(tasks, fig_dir),
        segmentation_section(tasks, fig_dir),
        pretraining_section(inputs.pretrain, fig_dir),
        settings_section([r for group in tasks.values() for r in group], inputs.pretrain, inputs.stages),
    ]
    generated = (f"Generated {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by volta3d report from "
                 f"{len(inputs.runs)} results file(s); bootstrap: {n_boot} resamples, seed {seed}.")
    (out / SUMMARY_NAME).write_text(render_markdown(title, sections, generated, out))
    path = out / REPORT_NAME
    path.write_text(render_html(title, sections, generated))
    return path
