"""Figures of the run report, drawn with Matplotlib's Agg backend (no display, no GUI toolkit).

Each function writes one small PNG (dpi 100, so the self-contained HTML stays a few MB) and returns
its path. Inputs are plain tables and arrays; the report module decides what to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, identical output everywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from volta3d.engine.loss_terms import LOSS_COLUMNS  # noqa: E402

DPI = 100
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
TRUTH_COLOUR, PREDICTION_COLOUR = "#00E5FF", "#FF8C00"


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


# initialisation -> colour, so a model keeps its colour in every panel: VolTA-3D blue, the baselines
# in contrasting hues (Okabe-Ito); a second model of one initialisation differs by its dash
SOURCE_COLOURS = {
    "VolTA-3D": "#0072B2",
    "imported encoder": "#56B4E9",
    "scratch": "#D55E00",
    "random init": "#D55E00",
    "raw volume": "#009E73",
}
OTHER_COLOUR = "#CC79A7"
DASHES = ["-", "--", ":", "-."]
VERDICT_COLOURS = {"better": "#0072B2", "worse": "#D55E00"}  # anything else (no difference): grey
VERDICT_MARKERS = {"better": "o", "worse": "s"}


@dataclass(frozen=True)
class Trace:
    """How one model is drawn: its legend label, colour (its initialisation) and dash (its variant)."""

    label: str
    colour: str
    dash: str = "-"


@dataclass
class ForestPanel:
    """One metric of the forest plot: ``rows`` has columns label, diff, low, high, verdict."""

    title: str
    xlabel: str
    rows: pd.DataFrame


def source_colour(initialisation: str) -> str:
    """``raw volume (16^3)`` -> the raw-volume colour; unknown initialisations share one colour."""
    return next((c for k, c in SOURCE_COLOURS.items() if initialisation.startswith(k)), OTHER_COLOUR)


def _grid(n: int, width: float, height: float, max_cols: int = 3) -> tuple[plt.Figure, np.ndarray]:
    ncols = min(n, max_cols)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()[:n]


def roc_figure(
    panels: Mapping[str, Sequence[tuple[Trace, np.ndarray, np.ndarray]]], title: str, path: Path
) -> Path:
    """ROC curves of pooled out-of-fold predictions, one panel per group of comparable models
    (``panels``: title -> (trace, y_true (N,), score (N,))): a handful of curves per panel stays legible."""
    fig, axes = _grid(len(panels), 4.3, 4.4)
    for ax, (name, curves) in zip(axes, panels.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls=(0, (1, 3)), label="chance")
        for trace, y, s in curves:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(
                fpr,
                tpr,
                color=trace.colour,
                ls=trace.dash,
                lw=2.0,
                label=f"{trace.label} (AUROC {roc_auc_score(y, s):.3f}, n={len(y)})",
            )
        ax.set(
            xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=name
        )
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7, frameon=True, framealpha=0.9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def fraction_figure(
    panels: Mapping[str, Sequence[tuple[Trace, pd.DataFrame]]], metric_label: str, title: str, path: Path
) -> Path:
    """Metric vs training fraction, one panel per group of comparable models; each model's mean as a
    line and its 95 % CI (columns fraction, mean, low, high) as a shaded band, not error bars."""
    fig, axes = _grid(len(panels), 4.6, 3.4)
    for ax, (name, lines) in zip(axes, panels.items(), strict=True):
        for trace, df in lines:
            df = df.sort_values("fraction")
            x = df["fraction"] * 100
            ax.plot(
                x,
                df["mean"],
                color=trace.colour,
                ls=trace.dash,
                lw=1.8,
                marker="o",
                ms=3.5,
                label=trace.label,
            )
            band = df[["low", "high"]].notna().all(axis=1).to_numpy()
            if band.any():
                ax.fill_between(
                    x[band], df["low"][band], df["high"][band], color=trace.colour, alpha=0.13, lw=0
                )
        ax.set(xlabel="training data used (% of each training fold)", ylabel=metric_label, title=name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, framealpha=0.9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _forest_panel(ax: plt.Axes, panel: ForestPanel) -> None:
    rows = panel.rows.reset_index(drop=True)
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows.itertuples(index=False), strict=True):
        colour = VERDICT_COLOURS.get(r.verdict, "#555555")
        if np.isfinite(r.low) and np.isfinite(r.high):
            ax.plot([r.low, r.high], [yi, yi], color=colour, lw=2.2, solid_capstyle="butt")
        ax.plot(
            r.diff,
            yi,
            marker=VERDICT_MARKERS.get(r.verdict, "D"),
            ms=6,
            color=colour,
            mfc=colour if r.verdict in VERDICT_COLOURS else "white",
            mew=1.5,
        )
    ax.axvline(0.0, color="#1d2330", lw=1.1)
    span = np.concatenate([rows[c].to_numpy(float) for c in ("diff", "low", "high")] + [np.zeros(1)])
    lo, hi = np.nanmin(span), np.nanmax(span)
    pad = 0.08 * (hi - lo) if hi > lo else 0.05
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_yticks(y, rows["label"], fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)


def forest_figure(panels: Sequence[ForestPanel], path: Path, width: float = 12.4) -> Path:
    """The headline's paired differences with their 95 % CIs, one panel per metric (each on its own
    scale, the zero line marked); filled markers where the CI excludes 0. Kept short so that it
    shares the first screen with the headline table."""
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    most = max(len(p.rows) for p in panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, nrows * (0.9 + 0.27 * most)), squeeze=False)
    for ax, panel in zip(axes.ravel(), panels, strict=False):
        _forest_panel(ax, panel)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.tight_layout(w_pad=1.5)
    return _save(fig, path)


def _plot_columns(ax: plt.Axes, metrics: pd.DataFrame, cols: Sequence[str]) -> int:
    """Each logged column of ``cols`` vs step, over its non-empty rows only (a quantity logged
    every few steps still draws a line); returns how many were drawn."""
    drawn = 0
    for i, c in enumerate(cols):
        if c in metrics.columns and metrics[c].notna().any():
            rows = metrics[["step", c]].dropna()
            ax.plot(rows["step"], rows[c], lw=1.3, color=PALETTE[i % len(PALETTE)], label=c)
            drawn += 1
    return drawn


def _step_axis(ax: plt.Axes, title: str, drawn: int) -> None:
    if not drawn:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set(title=title, xlabel="optimiser step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def pretraining_figure(metrics: pd.DataFrame, path: Path, log_k: float | None = None) -> Path:
    """Losses, teacher entropies, learning rate and gradient norm vs optimiser step (metrics.csv).
    ``log_k``: log of the number of prototypes, the entropy of a uniform (collapsed) teacher."""
    panels = [
        ("losses", ["loss", *LOSS_COLUMNS]),
        ("teacher entropy (nats)", ["teacher_entropy", "teacher_marginal_entropy", "teacher_patch_entropy"]),
        ("learning rate", ["lr"]),
        ("gradient norm", ["grad_norm"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 5.6))
    for ax, (title, cols) in zip(axes.ravel(), panels, strict=True):
        drawn = _plot_columns(ax, metrics, cols)
        if title.startswith("teacher") and log_k is not None and drawn:
            ax.axhline(log_k, color="#999999", ls="--", lw=1, label=f"log K = {log_k:.2f} (uniform)")
        if (
            title == "losses"
            and drawn
            and (metrics[[c for c in cols if c in metrics.columns]] > 0).all().all()
        ):
            ax.set_yscale("log")  # the weighted reconstruction term dwarfs the others
        _step_axis(ax, title, drawn)
        if drawn > 1 or (drawn and title.startswith("teacher")):
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


# the health panels and the columns each draws (metrics.csv of `volta3d pretrain`)
HEALTH_PANELS = [
    ("entropy gap (nats; 0 = collapse)", ["teacher_entropy_gap", "teacher_patch_entropy_gap"]),
    ("mean pairwise cosine (1 = collapse)", ["student_cls_cosine", "teacher_cls_cosine"]),
    ("centred spread (0 = collapse, 1 = isotropic)", ["student_cls_spread", "teacher_cls_spread"]),
    ("effective rank (RankMe; 1 = collapse)", ["cls_rank", "patch_rank"]),
]
ALARM_COLOUR = "#C00000"


def health_figure(metrics: pd.DataFrame, path: Path, alarm_step: int | None = None) -> Path:
    """Entropy gaps, pairwise cosines, centred spreads and effective ranks vs step (the ranks'
    ceilings are in the table: on this axis they would flatten the ranks); ``alarm_step``: where
    the collapse alarm first fired, marked in every panel."""
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 5.6))
    for ax, (title, cols) in zip(axes.ravel(), HEALTH_PANELS, strict=True):
        drawn = _plot_columns(ax, metrics, cols)
        if alarm_step is not None:
            ax.axvline(
                alarm_step, color=ALARM_COLOUR, ls=":", lw=1.5, label=f"collapse alarm (step {alarm_step})"
            )
        _step_axis(ax, title, drawn)
        if drawn:
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


# ten lines at most (teacher and init on cls / mean x linear / knn, raw x linear / knn): Okabe-Ito + Tol
ONLINE_COLOURS = [*PALETTE[:6], "#000000", "#882255", "#999933", "#44AA99"]
SOURCE_ORDER = {"teacher": 0, "student": 1, "init": 2, "raw": 3}


def _online_label(source: str, feature: str, probe: str) -> str:
    if source == "raw":
        return f"raw volume, {probe} (floor)"
    return f"{source if source in ('teacher', 'student') else 'initial weights'}, {feature} {probe}"


def online_probe_figure(panels: Mapping[str, pd.DataFrame], path: Path) -> Path:
    """One panel per title (``panels``: title -> rows with step, source, feature, probe, value): the
    teacher's curve per (feature, probe), solid with markers; every other source (the initial
    weights, the raw-volume floor) a dashed horizontal line at its first logged value. A line keeps
    its colour in every panel."""
    keys = sorted(
        {k for df in panels.values() for k in df[["source", "feature", "probe"]].itertuples(index=False)},
        key=lambda k: (SOURCE_ORDER.get(k[0], 3), *k),
    )
    colour = {k: ONLINE_COLOURS[i % len(ONLINE_COLOURS)] for i, k in enumerate(keys)}
    ncols = min(len(panels), 3)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.9 * ncols, 3.0 * nrows), squeeze=False)
    handles: dict[tuple, plt.Artist] = {}
    for ax, (title, df) in zip(axes.ravel()[: len(panels)], panels.items(), strict=True):
        for key, rows in df.sort_values("step").groupby(["source", "feature", "probe"]):
            if key[0] in ("teacher", "student"):
                style = (
                    {"marker": "o", "lw": 1.6}
                    if key[0] == "teacher"
                    else {"marker": "x", "lw": 1.0, "ls": ":"}
                )
                (line,) = ax.plot(rows["step"], rows["value"], ms=3, color=colour[key], **style)
            else:
                line = ax.axhline(rows["value"].iloc[0], ls="--", lw=1.4, color=colour[key])
            handles.setdefault(key, line)
        ax.set(title=title, xlabel="optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    order = [k for k in keys if k in handles]
    fig.legend(
        [handles[k] for k in order],
        [_online_label(*k) for k in order],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(len(order), 3),
        fontsize=7.5,
        frameon=False,
    )
    return _save(fig, path)


def _slices(vol: np.ndarray, center: Sequence[int] | np.ndarray) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices of a RAS (D, H, W) = (x, y, z) volume, transposed so that
    superior (or anterior, for axial) is up with ``origin='lower'``."""
    x, y, z = center
    return [vol[x, :, :].T, vol[:, y, :].T, vol[:, :, z].T]


def overlay_figure(cases: Sequence[dict], title: str, path: Path) -> Path:
    """One row per case (``image``, ``truth``, ``prediction``: (D, H, W) arrays, ``label``: text):
    three orthogonal slices through the center of the true structure, the scan in grey, the ground
    truth and the prediction outlined in two colours (each structure label outlined separately)."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        truth, pred = case["truth"], case["prediction"]
        fg = np.argwhere(truth > 0)
        center = np.round(fg.mean(0)).astype(int) if len(fg) else np.array(truth.shape) // 2
        labels = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
        for ax, img, t, p, view in zip(
            row,
            _slices(case["image"], center),
            _slices(truth, center),
            _slices(pred, center),
            ("sagittal", "coronal", "axial"),
            strict=True,
        ):
            ax.imshow(img, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, interpolation="nearest")
            for v in labels:
                for mask, colour in ((t == v, TRUTH_COLOUR), (p == v, PREDICTION_COLOUR)):
                    if mask.any() and not mask.all():
                        ax.contour(
                            mask.astype(float), levels=[0.5], colors=colour, linewidths=1.1, origin="lower"
                        )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(view, fontsize=8)
        row[0].set_ylabel(case["label"], fontsize=8)
    handles = [
        plt.Line2D([], [], color=TRUTH_COLOUR, lw=2, label="ground truth"),
        plt.Line2D([], [], color=PREDICTION_COLOUR, lw=2, label="prediction"),
    ]
    fig.legend(
        handles=handles, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 1.0), frameon=False
    )
    fig.suptitle(title, fontsize=10, y=1.03)
    fig.tight_layout()
    return _save(fig, path)
