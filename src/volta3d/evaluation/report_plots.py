"""Figures of the run report, drawn with Matplotlib's Agg backend (no display, no GUI toolkit).

Each function writes one small PNG (dpi 100, so the self-contained HTML stays a few MB) and returns
its path. Inputs are plain tables and arrays; the report module decides what to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless, identical output everywhere

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

DPI = 100
# Okabe-Ito: distinguishable with the common colour-vision deficiencies
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
TRUTH_COLOUR, PREDICTION_COLOUR = "#00E5FF", "#FF8C00"


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path) -> Path:
    """ROC curves of pooled out-of-fold predictions; ``curves``: model -> (y_true (N,), score (N,))."""
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="chance")
    for i, (name, (y, s)) in enumerate(curves.items()):
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, color=PALETTE[i % len(PALETTE)], lw=1.8,
                label=f"{name} (AUROC {roc_auc_score(y, s):.3f}, n={len(y)})")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title=title)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5, frameon=True)
    return _save(fig, path)


def fraction_figure(points: Mapping[str, pd.DataFrame], metric_label: str, title: str, path: Path) -> Path:
    """Metric vs training fraction with +- SD error bars; ``points``: model -> columns fraction, mean, sd."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for i, (name, df) in enumerate(points.items()):
        df = df.sort_values("fraction")
        ax.errorbar(df["fraction"] * 100, df["mean"], yerr=df["sd"].fillna(0.0), marker="o", ms=4, capsize=3,
                    lw=1.6, color=PALETTE[i % len(PALETTE)], label=name)
    ax.set(xlabel="training data used (% of each training fold)", ylabel=metric_label, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pretraining_figure(metrics: pd.DataFrame, path: Path, log_k: float | None = None) -> Path:
    """Losses, teacher entropies, learning rate and gradient norm vs optimiser step (metrics.csv).
    ``log_k``: log of the number of prototypes, the entropy of a uniform (collapsed) teacher."""
    panels = [
        ("losses", ["loss", "loss_global", "loss_local", "loss_rec"]),
        ("teacher entropy (nats)", ["teacher_entropy", "teacher_marginal_entropy", "teacher_patch_entropy"]),
        ("learning rate", ["lr"]),
        ("gradient norm", ["grad_norm"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(9.0, 5.6))
    step = metrics["step"]
    for ax, (title, cols) in zip(axes.ravel(), panels, strict=True):
        drawn = 0
        for i, c in enumerate(cols):
            if c in metrics.columns and metrics[c].notna().any():
                ax.plot(step, metrics[c], lw=1.3, color=PALETTE[i % len(PALETTE)], label=c)
                drawn += 1
        if title.startswith("teacher") and log_k is not None and drawn:
            ax.axhline(log_k, color="#999999", ls="--", lw=1, label=f"log K = {log_k:.2f} (uniform)")
        if title == "losses" and drawn and (metrics[[c for c in cols if c in metrics.columns]] > 0).all().all():
            ax.set_yscale("log")  # the weighted reconstruction term dwarfs the others
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="#777777")
        ax.set(title=title, xlabel="optimiser step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn > 1 or (drawn and title.startswith("teacher")):
            ax.legend(fontsize=7, loc="best", framealpha=0.85)
    fig.tight_layout()
    return _save(fig, path)


def _slices(vol: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal and axial slices of a RAS (D, H, W) = (x, y, z) volume, transposed so that
    superior (or anterior, for axial) is up with ``origin='lower'``."""
    x, y, z = centre
    return [vol[x, :, :].T, vol[:, y, :].T, vol[:, :, z].T]


def overlay_figure(cases: Sequence[dict], title: str, path: Path) -> Path:
    """One row per case (``image``, ``truth``, ``prediction``: (D, H, W) arrays, ``label``: text):
    three orthogonal slices through the centre of the true structure, the scan in grey, the ground
    truth and the prediction outlined in two colours (each structure label outlined separately)."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        truth, pred = case["truth"], case["prediction"]
        fg = np.argwhere(truth > 0)
        centre = np.round(fg.mean(0)).astype(int) if len(fg) else np.array(truth.shape) // 2
        labels = sorted((set(np.unique(truth).tolist()) | set(np.unique(pred).tolist())) - {0})
        for ax, img, t, p, view in zip(row, _slices(case["image"], centre), _slices(truth, centre),
                                       _slices(pred, centre), ("sagittal", "coronal", "axial"), strict=True):
            ax.imshow(img, cmap="gray", origin="lower", vmin=0.0, vmax=1.0, interpolation="nearest")
            for v in labels:
                for mask, colour in ((t == v, TRUTH_COLOUR), (p == v, PREDICTION_COLOUR)):
                    if mask.any() and not mask.all():
                        ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1.1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(view, fontsize=8)
        row[0].set_ylabel(case["label"], fontsize=8)
    handles = [plt.Line2D([], [], color=TRUTH_COLOUR, lw=2, label="ground truth"),
               plt.Line2D([], [], color=PREDICTION_COLOUR, lw=2, label="prediction")]
    fig.legend(handles=handles, loc="upper center", ncol=2, fontsize=8, bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10, y=1.03)
    fig.tight_layout()
    return _save(fig, path)
