"""Representation-health statistics against their formulas, and the collapse alarm's logic."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from volta3d.engine.health import (
    CollapseMonitor,
    RollingRank,
    cross_volume_cosine,
    effective_rank,
    entropy_stats,
)


def test_effective_rank_matches_rankme_formula():
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_effective_rank_limits():
    assert effective_rank(torch.ones(10, 5)) == pytest.approx(1.0, abs=1e-3)  # every row the same
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-4)  # orthogonal rows


def test_rolling_rank_keeps_only_the_last_rows():
    ranks = RollingRank(capacity=4)
    ranks.add(torch.eye(4))
    assert ranks.add(torch.ones(4, 4)) == pytest.approx(1.0, abs=1e-3)  # the eye rows have left the buffer


def test_cross_volume_cosine_ignores_same_volume_pairs():
    same = torch.ones(2, 3, 4)  # (views, batch, dim): every volume identical
    assert cross_volume_cosine(same).item() == pytest.approx(1.0)
    orthogonal = torch.eye(3).expand(2, 3, 3)  # different volumes orthogonal, both views equal
    assert cross_volume_cosine(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(cross_volume_cosine(torch.ones(2, 1, 4)).item())


def test_entropy_gap_is_zero_when_every_sample_gets_the_same_target():
    p = torch.softmax(torch.randn(1, 7), -1).expand(5, 7)
    stats = entropy_stats(p, "teacher_")
    assert stats["teacher_entropy_gap"].item() == pytest.approx(0.0, abs=1e-6)
    one_hot = torch.eye(4)  # four samples, four different prototypes: the gap is log 4
    assert entropy_stats(one_hot, "x_")["x_entropy_gap"].item() == pytest.approx(math.log(4), abs=1e-5)


def _row(entropy=2.0, marginal=4.0, cosine=0.5):
    return {"teacher_entropy": entropy, "teacher_marginal_entropy": marginal, "student_cls_cosine": cosine}


@pytest.mark.parametrize("row, sign", [
    (_row(entropy=0.99 * math.log(64)), "uniform"),
    (_row(marginal=0.01), "one prototype"),
    (_row(cosine=0.999), "same embedding"),
])  # fmt: skip
def test_alarm_fires_after_patience_and_logs_once(row, sign, caplog):
    monitor = CollapseMonitor(math.log(64), patience=3, logger=logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        flags = [monitor.observe(s, row) for s in range(1, 6)]
    assert flags == [0, 0, 1, 1, 1]
    assert sum("collapse alarm" in r.message for r in caplog.records) == 1
    assert sign in caplog.records[0].message


def test_alarm_needs_consecutive_steps():
    monitor = CollapseMonitor(math.log(64), patience=2, logger=logging.getLogger("t"))
    rows = [_row(cosine=0.999), _row(), _row(cosine=0.999), _row()]
    assert [monitor.observe(s, r) for s, r in enumerate(rows)] == [0, 0, 0, 0]
