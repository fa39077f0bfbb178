"""The report's pretraining section: did the self-supervised run train, and did it collapse.

Read from the pretraining run folder (``metrics.csv`` and ``config.yaml``, with the optional
``online_eval.csv``): the training curves and the first / last logged values, the health table
(alignment losses against log K, entropy gaps, embedding spread and effective rank; computed by
``pretrain_health``) with its curves, the online-probe curve against the initial weights and the
raw-volume floor, and a boxed collapse alarm when the health check fired. Kept apart from ``report``
so that the page assembly does not carry the pretraining diagnostics, and the downstream sections do
not depend on them.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from volta3d import layout
from volta3d.engine.loss_terms import LOSS_COLUMNS
from volta3d.evaluation import pretrain_health as health
from volta3d.evaluation import report_plots
from volta3d.evaluation.report_doc import (
    Alert,
    Block,
    Figure,
    Note,
    Section,
    Table,
    fmt_general,
    fmt_num,
    metric_label,
    omitted,
)
from volta3d.evaluation.report_runs import better_when_lower, flatten, read_config


def _curve_blocks(pretrain: Path, metrics: pd.DataFrame, logk: float | None, fig_dir: Path) -> list[Block]:
    """The training curves and the first / last logged values."""
    path = report_plots.pretraining_figure(metrics, fig_dir / layout.PRETRAINING_PLOT, logk)
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
            *LOSS_COLUMNS,
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
        path = report_plots.health_figure(metrics, fig_dir / layout.HEALTH_PLOT, alarm[0] if alarm else None)
        blocks.append(
            Figure(
                path,
                "Pretraining health: entropy gaps on per-volume targets (what the targets say about which "
                "volume they came from; 0 = collapse, at most log B), mean pairwise cosine and centred spread of "
                "different volumes' CLS-style embeddings, and effective ranks (RankMe)",
            )
        )
    return blocks


def _online_blocks(pretrain: Path, fig_dir: Path) -> list[Block]:
    """The online-probe curve per (label, metric) and its first / last values against the references."""
    table = health.read_online_eval(pretrain)
    if table is None:
        return [Note(f"Online-probe curve not shown: no {layout.ONLINE_EVAL} in {pretrain}.")]
    if isinstance(table, str):
        return [Note(f"Online-probe curve not shown: {table}.")]
    panels = {}
    for (label, metric), rows in table.groupby(["label", "metric"], sort=True):
        better = "lower" if better_when_lower(metric) else "higher"
        panels[f"{label + ': ' if label else ''}{metric_label(metric)} ({better} is better)"] = rows
    path = report_plots.online_probe_figure(panels, fig_dir / layout.ONLINE_PROBE_PLOT)
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
    metrics = pd.read_csv(pretrain / layout.METRICS).apply(pd.to_numeric, errors="coerce")
    if metrics.empty or "step" not in metrics.columns:
        return omitted(sec, f"{pretrain / layout.METRICS} holds no logged steps")
    logk = health.log_k(metrics, flatten(read_config(pretrain / layout.CONFIG)).get("head.out_dim"))
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
