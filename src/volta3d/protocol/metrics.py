"""Per-fold metrics, computed with scikit-learn (classification, regression) and MONAI
(segmentation). The Youden-J threshold is always chosen on training-side predictions and then
applied, unchanged, to the test fold: choosing it on the test fold would flatter sensitivity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    roc_curve,
)


def youden_threshold(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """Score threshold maximising J = sensitivity + specificity - 1 (ties: the highest threshold).

    ``roc_curve`` puts +inf first (predict nothing positive); it is skipped so the threshold is a
    real score. A prediction is positive when ``score >= threshold``.
    """
    fpr, tpr, thr = roc_curve(np.asarray(y_true), np.asarray(scores, dtype=float))
    finite = np.isfinite(thr)
    j = np.where(finite, tpr - fpr, -np.inf)
    # thresholds decrease along the curve: the first (near-)maximum is the highest threshold
    best = int(np.flatnonzero(j >= j.max() - 1e-12)[0])
    return float(thr[best])


def sensitivity_specificity(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray
) -> tuple[float, float]:
    tn, fp, fn, tp = confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=[0, 1]).ravel()
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return float(sens), float(spec)


def binary_metrics(
    y_true: Sequence[int], scores: Sequence[float], train_true: Sequence[int], train_scores: Sequence[float]
) -> dict[str, float]:
    """AUROC, and sensitivity / specificity / balanced accuracy at 0.5 and at the Youden-J
    threshold fitted on the training-side predictions (``train_*``) of the same fold."""
    y, s = np.asarray(y_true, dtype=int), np.asarray(scores, dtype=float)
    out = {"auroc": float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan")}
    thr = youden_threshold(train_true, train_scores)
    for name, t in (("", 0.5), ("_youden", thr)):
        pred = (s >= t).astype(int)
        sens, spec = sensitivity_specificity(y, pred)
        out[f"sensitivity{name}"] = sens
        out[f"specificity{name}"] = spec
        out[f"balanced_accuracy{name}"] = float(balanced_accuracy_score(y, pred))
    out["youden_threshold"] = thr
    return out


def multiclass_metrics(y_true: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Macro one-vs-rest AUROC and balanced accuracy of the arg-max class. ``probs``: (N, K)."""
    y, p = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    k = p.shape[1]
    present = np.unique(y)
    if len(present) == k:
        auroc = float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=list(range(k))))
    else:  # a class absent from the test fold: average the one-vs-rest AUROCs that are defined
        aucs = [roc_auc_score(y == c, p[:, c]) for c in present if 0 < (y == c).sum() < len(y)]
        auroc = float(np.mean(aucs)) if aucs else float("nan")
    return {"auroc": auroc, "balanced_accuracy": float(balanced_accuracy_score(y, p.argmax(1)))}


def regression_metrics(y_true: Sequence[float], pred: Sequence[float]) -> dict[str, float]:
    y, p = np.asarray(y_true, dtype=float), np.asarray(pred, dtype=float)
    return {"mae": float(mean_absolute_error(y, p)), "r2": float(r2_score(y, p))}


def segmentation_metrics(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, np.ndarray]:
    """Dice and HD95 (mm) per subject and foreground structure, background excluded.

    ``pred``, ``target``: integer label maps (B, 1, D, H, W). Returns ``dice`` and ``hd95`` arrays of
    shape (B, num_classes - 1); NaN where a structure is absent from both (Dice) or either (HD95).
    """
    p = one_hot(pred.long(), num_classes, dim=1)  # (B, 1, D, H, W) -> (B, K, D, H, W)
    t = one_hot(target.long(), num_classes, dim=1)
    # MONAI's metric __call__ is annotated for lists of batches too; one tensor batch gives one tensor
    dice = cast(torch.Tensor, DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t))
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    hd95 = cast(torch.Tensor, hd(p, t, spacing=list(spacing)))
    # MONAI returns inf when one side is empty; NaN means "undefined", which aggregation skips.
    hd95 = torch.where(torch.isfinite(hd95), hd95, torch.full_like(hd95, float("nan")))
    return {"dice": dice.cpu().numpy(), "hd95": hd95.cpu().numpy()}


def aggregate(per_fold: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample SD (ddof = 1, as '0.98 +- 0.01' over folds) of each metric, NaNs skipped."""
    keys = sorted({k for m in per_fold for k in m})
    out = {}
    for k in keys:
        v = np.asarray([m[k] for m in per_fold if k in m and m[k] is not None], dtype=float)
        v = v[np.isfinite(v)]
        out[k] = {
            "mean": float(v.mean()) if len(v) else float("nan"),
            "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
            "n": int(len(v)),
        }
    return out
