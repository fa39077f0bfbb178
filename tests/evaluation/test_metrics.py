from __future__ import annotations

import numpy as np
import pytest
import torch

from volta3d.protocol.metrics import (
    aggregate,
    binary_metrics,
    multiclass_metrics,
    regression_metrics,
    segmentation_metrics,
    youden_threshold,
)


def test_youden_threshold_hand_checked():
    # scores sorted: negatives 0.1 0.3 0.6, positives 0.4 0.7 0.9.
    # threshold 0.4: TPR 1, FPR 1/3 -> J 2/3; 0.7: TPR 2/3, FPR 0 -> J 2/3 (tie: higher threshold).
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.3, 0.6, 0.4, 0.7, 0.9]
    assert youden_threshold(y, s) == pytest.approx(0.7)


def test_binary_metrics_uses_training_threshold_not_test():
    train_y = [0, 0, 0, 1, 1, 1]
    train_s = [0.1, 0.2, 0.3, 0.8, 0.85, 0.9]  # J maximal at threshold 0.8
    test_y = [0, 0, 1, 1]
    test_s = [0.2, 0.6, 0.65, 0.95]  # its own Youden threshold would be 0.65 (perfect)
    m = binary_metrics(test_y, test_s, train_y, train_s)
    assert m["youden_threshold"] == pytest.approx(0.8)
    assert m["youden_threshold"] != pytest.approx(youden_threshold(test_y, test_s))
    # at 0.8 only 0.95 is positive: sensitivity 1/2, specificity 2/2
    assert m["sensitivity_youden"] == pytest.approx(0.5)
    assert m["specificity_youden"] == pytest.approx(1.0)
    # at 0.5: predicted positive 0.6, 0.65, 0.95 -> sens 1, spec 1/2, balanced 0.75
    assert (m["sensitivity"], m["specificity"], m["balanced_accuracy"]) == pytest.approx((1.0, 0.5, 0.75))
    assert m["auroc"] == pytest.approx(1.0)  # 0.65 > 0.6: every positive outranks every negative


def test_multiclass_and_regression_match_hand_values():
    y = [0, 1, 2, 2]
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.1, 0.4]])
    m = multiclass_metrics(y, p)
    # argmax 0, 1, 2, 0 -> recalls 1, 1, 1/2 -> balanced accuracy 5/6
    assert m["balanced_accuracy"] == pytest.approx(5 / 6)
    # one-vs-rest AUROCs by hand: class 0: pos score 0.8 vs 0.2, 0.1, 0.5 -> 1; class 1: 0.7 vs rest -> 1;
    # class 2: pos 0.7, 0.4 vs neg 0.1, 0.1 -> 1
    assert m["auroc"] == pytest.approx(1.0)
    r = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert r["mae"] == pytest.approx(2 / 3)
    # R^2 = 1 - SS_res / SS_tot = 1 - 4 / 2 = -1
    assert r["r2"] == pytest.approx(-1.0)


def test_segmentation_metrics_hand_checked():
    target = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    target[0, 0, 2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = torch.zeros_like(target)
    pred[0, 0, 2:6, 2:6, 2:5] = 1  # 48 voxels, all inside
    pred[0, 0, 8:10, 8:10, 8:10] = 2  # class 2 predicted but absent from target
    target[0, 0, 8:10, 8:10, 2:4] = 2
    m = segmentation_metrics(pred, target, num_classes=3, spacing=(2.0, 2.0, 2.0))
    assert m["dice"].shape == (1, 2)
    assert m["dice"][0, 0] == pytest.approx(2 * 48 / (64 + 48))
    assert m["dice"][0, 1] == pytest.approx(0.0)
    # class 2: two 2x2x2 cubes (every voxel on the surface) offset by 6 voxels in the last axis:
    # each voxel's nearest counterpart is 5 or 6 voxels away (10 or 12 mm at 2 mm spacing), four of
    # each, so the 95th percentile (linear interpolation) is 12 mm.
    assert m["hd95"][0, 1] == pytest.approx(12.0)
    # class 1: missing face of the cube lies 1 voxel (2 mm) from the prediction's surface
    assert m["hd95"][0, 0] == pytest.approx(2.0)


def test_aggregate_mean_and_sample_sd():
    agg = aggregate([{"auroc": 0.8}, {"auroc": 0.9}, {"auroc": float("nan")}])
    assert agg["auroc"]["mean"] == pytest.approx(0.85)
    assert agg["auroc"]["sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert agg["auroc"]["n"] == 2
