"""The report's first screen: did pretraining help, on which task, by how much, how sure are we.

One table with a row per (task, baseline): the primary metric of the VolTA-3D reference and of the
baseline (the aggregates in results.json), their paired difference (VolTA-3D - baseline) with its 95 %
bootstrap CI and Wilcoxon p, and a one-word verdict read from the CI; one sentence generated from
those rows; a forest plot of the same differences; and a provenance line (how many volumes were
pretrained on, transductive or external, wall time, hardware).

The difference is paired over folds when there are several (so it equals the difference of the two
means shown), else over the hold-out's subjects. One VolTA-3D reference per task keeps the table to
a few rows: the VolTA-3D-initialised model for fine-tuning, the linear probe on the CLS-style summary
for frozen probes. That probe is fixed in advance, not the best of the VolTA-3D probes: picking the
best on the test folds would flatter VolTA-3D. The full pairwise tables stay in the per-task sections.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from volta3d import layout
from volta3d.evaluation import pretrain_health as health
from volta3d.evaluation import report_plots
from volta3d.evaluation.report_doc import (
    Figure,
    Line,
    Note,
    Section,
    Table,
    digits_for,
    fmt_hms,
    fmt_num,
    fmt_p,
    fmt_signed,
    metric_label,
    omitted,
)
from volta3d.evaluation.report_runs import (
    Run,
    better_when_lower,
    is_probe,
    read_config,
    short_name,
    task_title,
    test_subjects,
)

HEADLINE_PROBE = "probe-linear-cls"  # the frozen-probe reference: fixed in advance, see the module docstring
FINE_TUNING, PROBES = "fine-tuning", "frozen probes"
NOT_TESTED, NOT_COMPARABLE = "not tested", "not comparable"
SMALL = {"subjects": 20, "folds": 5}  # below these, a CI that excludes 0 is indicative at best
TABLE_ID, FOREST_ID, PROVENANCE_ID = (
    "headline-table",
    "forest-plot",
    "provenance",
)  # element ids: the page test finds them


@dataclass
class HeadlineRow:
    """One comparison of the headline: the reference against one baseline on the task's primary metric.
    Values absent for a task without a VolTA-3D model or a pair that could not be compared are NaN."""

    key: tuple[str, str, str]
    metric: str
    ref: Run | None
    other: Run | None
    ref_value: float = math.nan
    other_value: float = math.nan
    diff: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p: float = math.nan
    n: int = 0
    unit: str = ""
    verdict: str = NOT_TESTED
    reason: str = ""
    fraction: float | None = None  # a reduced-data point of a fine-tuning curve (None: all training labels)

    @property
    def group(self) -> str:
        return PROBES if self.key[0] == "probe" else FINE_TUNING

    @property
    def task(self) -> str:
        """The task in a word or two: the label, or 'segmentation'."""
        return task_title(self.key) if self.key[1] == "segmentation" else self.key[2]

    @property
    def label(self) -> str:
        """The row's name in the forest plot and the sentence: task, how it was evaluated, baseline."""
        how = " probe" if self.group == PROBES else ("" if self.key[1] == "segmentation" else " fine-tuned")
        labels = "" if self.fraction is None else f" ({self.fraction:.0%} of labels)"
        return f"{self.task}{how}{labels} vs {short_name(self.other) if self.other else '—'}"


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    """better / worse when the 95 % CI of (reference - baseline) excludes 0 on the reference's good /
    bad side (for MAE or HD95 a negative difference is the good side), else no difference; not
    tested without a CI."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return NOT_TESTED
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "no difference"


def paired_evidence(cmp: Mapping[str, Any], metric: str) -> dict[str, Any] | None:
    """The paired difference behind a headline row: over folds when there are at least 2, else over
    the subjects' per-subject values (a hold-out). One pair gives a difference but no CI or p."""
    fold = cmp.get("fold_level", {}).get(metric)
    sub = cmp.get("subject_level", {}).get(f"{metric}_mean")
    source, unit = (fold, "folds") if fold and (fold["n"] >= 2 or not sub) else (sub, "subjects")
    if not source:
        return None
    tested = source["n"] >= 2  # one value: the bootstrap CI collapses onto the point, which proves nothing
    return {"diff": source["estimate"], "low": source["ci_low"] if tested else math.nan,
            "high": source["ci_high"] if tested else math.nan, "p": source["wilcoxon_p"] if tested else math.nan,
            "n": source["n"], "unit": unit}  # fmt: skip


def headline_reference(group: Sequence[Run], reference: str | None = None) -> Run | None:
    """The one reference of a task: the named model; else, among VolTA-3D-initialised models (by name),
    the linear probe on the CLS-style summary for probes (any linear probe next), else the first."""
    named = [r for r in group if r.name == reference]
    if named:
        return named[0]
    pretrained = sorted((r for r in group if r.pretrained), key=lambda r: r.name)
    for wanted in (
        lambda r: r.results.get("model") == HEADLINE_PROBE,
        lambda r: str(r.results.get("model", "")).startswith("probe-linear-"),
    ):
        hits = [r for r in pretrained if is_probe(r) and wanted(r)]
        if hits:
            return hits[0]
    return pretrained[0] if pretrained else None


def _aggregate_mean(run: Run, metric: str) -> float:
    agg = run.results.get("aggregate", {}).get(metric) or {}
    mean = agg.get("mean")
    return float(mean) if mean is not None else math.nan


def _row(key: tuple, ref: Run, other: Run, cmp: Mapping[str, Any] | str) -> HeadlineRow:
    metric = ref.primary
    row = HeadlineRow(key, metric, ref, other, _aggregate_mean(ref, metric), _aggregate_mean(other, metric))
    if isinstance(cmp, str):
        row.verdict, row.reason = NOT_COMPARABLE, cmp
        return row
    ev = paired_evidence(cmp, metric)
    if ev is None:
        row.reason = f"no paired {metric_label(metric)} values"
        return row
    row.diff, row.low, row.high, row.p, row.n, row.unit = (
        ev[k] for k in ("diff", "low", "high", "p", "n", "unit")
    )
    row.verdict = verdict(row.low, row.high, better_when_lower(metric))
    return row


def headline_rows(
    tasks: Mapping[tuple, list[Run]], comparisons: Mapping[tuple, list[tuple]], reference: str | None = None
) -> list[HeadlineRow]:
    """Fine-tuning tasks first, then frozen probes; per task the reference against each of its
    baselines (a row without values when the task has no VolTA-3D model). The reference is chosen
    among the models that were compared with a baseline, so a preferred probe without one gives way."""
    rows = []
    for key in sorted(tasks, key=lambda k: (k[0] == "probe", k)):
        compared = [r for r in tasks[key] if any(r is p[0] for p in comparisons.get(key, []))]
        ref = headline_reference(compared, reference) or headline_reference(tasks[key], reference)
        pairs = [(r, o, c) for r, o, c in comparisons.get(key, []) if ref is not None and r is ref]
        if ref is None or not pairs:
            metric = (ref or tasks[key][0]).primary
            rows.append(HeadlineRow(key, metric, ref, None, reason="no VolTA-3D-initialised model to compare"
                                    if ref is None else "no baseline to compare with"))  # fmt: skip
            continue
        for r, o, c in pairs:
            rows += [*_fraction_rows(key, r, o, c), _row(key, r, o, c)]
    return rows


def _fraction_mean(run: Run, frac: str, metric: str) -> float:
    agg = run.results.get("fractions", {}).get(frac, {}).get("aggregate", {}).get(metric) or {}
    return float(agg["mean"]) if agg.get("mean") is not None else math.nan


def _fraction_rows(key: tuple, ref: Run, other: Run, cmp: Mapping[str, Any] | str) -> list[HeadlineRow]:
    """A fine-tuning comparison's reduced-data points below the largest fraction: does pretraining help
    when labels are scarce (paired over folds; probes keep their curves in the task sections)."""
    if isinstance(cmp, str) or key[0] == "probe":
        return []
    rows = []
    for frac, r in list((cmp.get("fraction_level") or {}).items())[:-1]:
        ref_value, other_value = (_fraction_mean(run, frac, r["metric"]) for run in (ref, other))
        row = HeadlineRow(key, r["metric"], ref, other, ref_value, other_value)
        row.diff, row.p, row.n, row.unit, row.fraction = (
            r["estimate"],
            r["wilcoxon_p"],
            r["n"],
            "folds",
            float(frac),
        )
        if r["n"] >= 2:
            row.low, row.high = r["ci_low"], r["ci_high"]
        row.verdict = verdict(row.low, row.high, better_when_lower(r["metric"]))
        rows.append(row)
    return rows


def _ci(row: HeadlineRow) -> str:
    if not (math.isfinite(row.low) and math.isfinite(row.high)):
        return "—"
    dg = digits_for(row.metric)
    return f"[{fmt_signed(row.low, dg)}, {fmt_signed(row.high, dg)}]"


def headline_table(rows: Sequence[HeadlineRow], who: str) -> Table:
    """The headline table; ``who`` names the reference in the column titles (VolTA-3D by default)."""
    body = []
    for r in rows:
        dg = digits_for(r.metric)
        arrow = "↓" if better_when_lower(r.metric) else "↑"
        task = r.task if r.fraction is None else f"{r.task}, {r.fraction:.0%} of labels"
        body.append([r.group, task, f"{metric_label(r.metric)} {arrow}", short_name(r.ref) if r.ref else "none",
                     fmt_num(r.ref_value, dg), short_name(r.other) if r.other else "—", fmt_num(r.other_value, dg),
                     fmt_signed(r.diff, dg), _ci(r), fmt_p(r.p), f"{r.n} {r.unit}" if r.n else "—",
                     r.verdict if r.other else "—"])  # fmt: skip
    columns = ["group", "task", "metric", f"{who} model", who, "baseline", "baseline value",
               f"{who} − baseline", "95 % CI", "p", "paired over", "verdict"]  # fmt: skip
    caption = f"{who} against each baseline on the task's primary metric (↑ higher, ↓ lower is better)"
    return Table(columns, body, caption, anchor=TABLE_ID)


def headline_summary(rows: Sequence[HeadlineRow], who: str) -> str:
    """One sentence from the verdicts: how many comparisons went each way, naming the decided ones."""
    compared = [r for r in rows if r.other is not None]
    if not compared:
        return f"No {who} model had a baseline to be compared with, so the inputs cannot say whether pretraining helped."
    parts = []
    for word, phrase in (("better", "better than"), ("worse", "worse than")):
        hits = [r.label for r in compared if r.verdict == word]
        parts.append(f"{phrase} the baseline in {len(hits)}" + (f" ({'; '.join(hits)})" if hits else ""))
    same = sum(r.verdict == "no difference" for r in compared)
    rest = len(compared) - same - sum(r.verdict in ("better", "worse") for r in compared)
    tail = f", and not tested or not comparable in {rest}" if rest else ""
    return (
        f"Of {len(compared)} paired comparisons, {who} is {parts[0]}, {parts[1]}, and not distinguishable "
        f"from it in {same}{tail}."
    )


def forest_panels(rows: Sequence[HeadlineRow], who: str) -> list[report_plots.ForestPanel]:
    """One panel per primary metric (each on its own scale), rows in the table's order."""
    by_metric: dict[str, list[HeadlineRow]] = {}
    for r in rows:
        if math.isfinite(r.diff):
            by_metric.setdefault(r.metric, []).append(r)
    panels = []
    for metric, group in by_metric.items():
        lower = better_when_lower(metric)
        table = pd.DataFrame([{"label": r.label, "diff": r.diff, "low": r.low, "high": r.high, "verdict": r.verdict}
                              for r in group])  # fmt: skip
        panels.append(
            report_plots.ForestPanel(
                f"{metric_label(metric)} ({'lower' if lower else 'higher'} is better)",
                f"{who} − baseline ({'←' if lower else '→'} {who} better)",
                table,
            )
        )
    return panels


def _rule_notes(rows: Sequence[HeadlineRow], who: str) -> list[Note]:
    """How to read the table, and its caveats, generated from the rows it holds."""
    notes = [
        Note(
            f"Difference = {who} − baseline, paired over the same folds (or, for a one-fold hold-out, the "
            "same test subjects); values are the means in results.json. Verdict: better / worse when the 95 % "
            f"bootstrap CI excludes 0 on {who}'s good / bad side (for ↓ metrics, such as MAE and HD95, a "
            "negative difference is the good side), no difference otherwise; p: Wilcoxon signed-rank. "
            f"{who} reference per task: the VolTA-3D-initialised model (fine-tuning) and the linear probe on "
            "the CLS-style summary (frozen probes), fixed in advance rather than the best VolTA-3D probe; "
            "every pair is in the per-task tables. No correction for multiple comparisons."
        )
    ]
    coarse = sorted({r.n for r in rows if r.unit == "folds" and 2 <= r.n <= 5 and math.isfinite(r.p)})
    if coarse:
        floors = ", ".join(f"{2 / 2**n:.3g} with {n} folds" for n in coarse)
        notes.append(
            Note(
                f"The smallest two-sided Wilcoxon p that few folds allow is {floors}, so p can stay above "
                "0.05 while the bootstrap CI excludes 0; the verdict follows the CI."
            )
        )
    few = [r.label for r in rows if r.verdict in ("better", "worse") and r.n < SMALL.get(r.unit, 0)]
    if few:
        notes.append(
            Note(
                f"Indicative at best (fewer than {SMALL['folds']} folds or {SMALL['subjects']} subjects): "
                + "; ".join(few)
                + "."
            )
        )
    for r in (r for r in rows if r.reason):
        what = f"{r.label}: {r.verdict}" if r.other else f"{r.task} ({r.group}): not compared"
        notes.append(Note(f"{what} ({r.reason})."))
    return notes


def _pretrain_device(pretrain: Path) -> str:
    """The device pretraining ran on: the config's, or the resolved one its log names when 'auto'."""
    device = str(read_config(pretrain / layout.CONFIG).get("device", "auto"))
    log = pretrain / layout.LOG
    if device == "auto" and log.is_file():
        found = re.findall(r"x (\d+) ranks\), lr \S+, device (\S+)", log.read_text(errors="replace"))
        if found:
            ranks, device = found[-1]
            return device if ranks == "1" else f"{ranks} x {device}"
    return device if device != "auto" else "an unrecorded device (config: auto)"


def _wall_time(pretrain: Path, stages: Mapping[str, Any]) -> str:
    """The pretrain stage's wall time (stages.json), else the sum of the logged step times."""
    for s in stages.get("stages", []):
        if isinstance(s, Mapping) and s.get("name") == "pretrain" and s.get("status") == "done":
            return f"took {fmt_hms(s.get('seconds'))} (wall time)"
    metrics = pd.read_csv(pretrain / layout.METRICS, usecols=lambda c: c == "seconds_per_step")
    if "seconds_per_step" in metrics.columns and metrics["seconds_per_step"].notna().any():
        return (
            f"took about {fmt_hms(float(metrics['seconds_per_step'].sum()))} (sum of the logged step times)"
        )
    return "took an unrecorded time"


def provenance_line(pretrain: Path | None, runs: Sequence[Run], stages: Mapping[str, Any]) -> Line:
    """Volumes pretrained on, transductive or external, wall time and hardware, in two sentences."""
    if pretrain is None:
        return Line(
            "Provenance: no pretraining run folder among the inputs, so the pretraining data, wall time and "
            "hardware are unknown.",
            "provenance",
            PROVENANCE_ID,
        )
    info = health.read_pretrain_data(pretrain)
    if isinstance(info, dict):
        tested: dict[str, set[str]] = {}
        for r in runs:
            tested.setdefault(task_title(r.task_key), set()).update(test_subjects(r))
        data = health.provenance_sentence(info, tested)
    else:
        data = f"Pretraining data not recorded ({info or f'no {layout.PRETRAIN_DATA} in {pretrain}'})."
    machine = (
        stages.get("settings", {}).get("machine") if isinstance(stages.get("settings"), Mapping) else None
    )
    hardware = _pretrain_device(pretrain) + (f" ({machine})" if machine else "")
    return Line(
        f"{data} Pretraining {_wall_time(pretrain, stages)} on {hardware}.", "provenance", PROVENANCE_ID
    )


def headline_section(
    rows: Sequence[HeadlineRow], provenance: Line, fig_dir: Path, who: str = "VolTA-3D"
) -> Section:
    """Everything the first screen shows: provenance, the table, its sentence and the forest plot."""
    sec = Section("Headline: did pretraining help?", "headline")
    if not rows:
        sec.blocks.append(provenance)
        return omitted(sec, "no downstream results.json among the inputs, so there is nothing to compare")
    sec.blocks += [provenance, headline_table(rows, who), headline_summary(rows, who)]
    panels = forest_panels(rows, who)
    if panels:
        path = report_plots.forest_figure(panels, fig_dir / layout.FOREST_PLOT)
        sec.blocks.append(
            Figure(
                path,
                f"Paired differences ({who} − baseline) with 95 % CIs, one panel per metric; "
                "zero line: no difference; filled marker: the CI excludes 0",
                anchor=FOREST_ID,
            )
        )
    sec.blocks += _rule_notes(rows, who)
    return sec
