"""Representation-health statistics against their formulas, and the collapse alarm's logic."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from volta3d.engine.health import (
    GAP_MIN,
    CollapseMonitor,
    HealthTracker,
    RollingRank,
    cls_spread,
    cross_volume_cosine,
    effective_rank,
    entropy_stats,
    per_volume,
    view_agreement,
)
from volta3d.engine.meta_arch import _rank_rows, rank_token_indices

from ..config_kwargs import section

LOG_K = math.log(64)
LOGGER = logging.getLogger("t")
MAX_COSINE = section("train")["collapse_max_cosine"]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_effective_rank_matches_rankme_formula():
    x = torch.randn(40, 12, generator=_gen(), dtype=torch.float64)
    s = np.linalg.svd(x.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)


def test_effective_rank_limits():
    assert effective_rank(torch.ones(10, 5)) == pytest.approx(1.0, abs=1e-3)  # every row the same
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-4)  # orthogonal rows


def test_rolling_rank_keeps_only_the_last_rows_and_reports_its_ceiling():
    ranks = RollingRank(capacity=4)
    assert ranks.ceiling == 0
    ranks.add(torch.eye(6)[:3])
    assert ranks.ceiling == 3  # min(rows held, embedding dim)
    ranks.add(torch.eye(6))
    assert ranks.ceiling == 4  # the buffer is full
    assert ranks.add(torch.ones(4, 6)) == pytest.approx(1.0, abs=1e-3)  # the eye rows have left the buffer


def test_cross_volume_cosine_ignores_same_volume_pairs():
    same = torch.ones(2, 3, 4)  # (views, batch, dim): every volume identical
    assert cross_volume_cosine(same).item() == pytest.approx(1.0)
    orthogonal = torch.eye(3).expand(2, 3, 3)  # different volumes orthogonal, both views equal
    assert cross_volume_cosine(orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(cross_volume_cosine(torch.ones(2, 1, 4)).item())


# ----------------------------------------------------------------------------- per-volume entropy gap


def _views(view0: torch.Tensor, view1: torch.Tensor) -> torch.Tensor:
    """Two views' (B, [N,] K) targets -> the view-major (2B, [N,] K) rows of compute_losses."""
    return torch.cat([view0, view1])


def test_per_volume_averages_each_volumes_views_in_view_major_order():
    view0, view1 = torch.eye(4)[:3], torch.eye(4)[[1, 2, 3]]
    expected = (view0 + view1) / 2  # volume b: rows b and B + b
    assert torch.equal(per_volume(_views(view0, view1), 2), expected)
    with pytest.raises(ValueError, match="do not split into 2 views"):
        per_volume(torch.eye(4)[:3], 2)


def test_entropy_gap_is_log_b_for_distinct_volumes_whose_views_agree():
    b = 5
    one_hot = torch.eye(8)[:b]
    stats = entropy_stats(_views(one_hot, one_hot), "teacher_", 2)
    assert stats["teacher_entropy_gap"].item() == pytest.approx(math.log(b), abs=1e-6)
    assert stats["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["teacher_marginal_entropy"].item() == pytest.approx(math.log(b), abs=1e-6)
    assert view_agreement(_views(one_hot, one_hot), 2).item() == 1.0


def test_views_that_disagree_do_not_inflate_the_gap():
    b = 4
    view0, view1 = torch.eye(2 * b)[:b], torch.eye(2 * b)[b:]  # volume i: prototype i, then b + i
    probs = _views(view0, view1)
    stats = entropy_stats(probs, "teacher_", 2)
    gap = stats["teacher_entropy_gap"].item()
    over_rows = (stats["teacher_marginal_entropy"] - stats["teacher_entropy"]).item()
    assert over_rows == pytest.approx(math.log(2 * b), abs=1e-6)  # the old gap: beyond log B
    assert gap == pytest.approx(math.log(b), abs=1e-6)  # still each volume's own targets: log B, no more
    assert view_agreement(probs, 2).item() == 0.0  # the disagreement is read here instead
    shuffled = torch.eye(8)[[1, 2, 3, 0]]  # view 1 of volume i on view 0's prototype of volume i + 1
    shuffled_gap = entropy_stats(_views(view0, shuffled), "x_", 2)["x_entropy_gap"].item()
    assert shuffled_gap == pytest.approx(math.log(b) - math.log(2), abs=1e-6)


def test_entropy_gap_is_zero_when_every_volume_gets_the_same_target():
    p = torch.softmax(torch.randn(1, 7, generator=_gen()), -1).expand(10, 7)
    stats = entropy_stats(p, "teacher_", 2)
    assert stats["teacher_entropy_gap"].item() == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(entropy_stats(p[:2], "teacher_", 2)["teacher_entropy_gap"].item())  # one volume


def test_patch_gap_is_per_token():
    """The patch branch's gap is taken per token (each row its own unit): targets set by position, shared by
    every brain, carry log N nats about the token (healthy: brains share anatomy); one target for every token
    carries none."""
    b, n = 3, 4
    by_position = (
        torch.eye(n).expand(2 * b, n, n).flatten(0, 1)
    )  # every volume and view: token j on prototype j
    gap = entropy_stats(by_position, "teacher_patch_", 1)["teacher_patch_entropy_gap"]
    assert gap.item() == pytest.approx(math.log(n), abs=1e-6)
    same = torch.eye(n)[:1].expand(2 * b * n, n)
    assert entropy_stats(same, "teacher_patch_", 1)["teacher_patch_entropy_gap"].item() == pytest.approx(
        0.0, abs=1e-6
    )


# ----------------------------------------------------------------------------- centred spread


def test_spread_is_zero_for_identical_and_about_one_for_isotropic_embeddings():
    same = torch.randn(1, 1, 64, generator=_gen()).expand(2, 16, 64)
    assert cls_spread(same).item() == pytest.approx(0.0, abs=1e-6)
    isotropic = torch.randn(2, 512, 64, generator=_gen(1))
    assert cls_spread(isotropic).item() == pytest.approx(1.0, abs=0.03)
    assert cls_spread(isotropic * 7.0).item() == pytest.approx(cls_spread(isotropic).item(), rel=1e-5)
    assert math.isnan(cls_spread(isotropic[:, :1]).item())


def test_spread_is_bounded_by_the_cosine_and_reads_low_for_variation_in_few_dimensions():
    """spread <= sqrt(1 - mean pairwise cosine), with equality for variation spread over every dimension."""
    g = _gen(2)
    isotropic = torch.randn(2, 256, 64, generator=g)
    shifted = isotropic + 3.0 * torch.ones(64)  # a shared mean direction: cosine near 0.9
    few = torch.zeros(2, 256, 64)
    few[..., 0] = 1.0
    few[..., 1:3] = 0.5 * torch.randn(2, 256, 2, generator=g)  # the volumes vary along two dimensions only
    for x in (isotropic, shifted, few):
        bound = math.sqrt(1.0 - cross_volume_cosine(x).item())
        assert cls_spread(x).item() <= bound + 1e-5
    assert cls_spread(shifted).item() == pytest.approx(
        math.sqrt(1.0 - cross_volume_cosine(shifted).item()), rel=0.05
    )
    assert cls_spread(few).item() < 0.3 * math.sqrt(1.0 - cross_volume_cosine(few).item())


# ----------------------------------------------------------------------------- patch tokens for the rank


@pytest.mark.parametrize("side", [4, 8])
def test_rank_tokens_cover_every_depth_height_and_width(side):
    picked = rank_token_indices(side**3)
    assert len(picked) == 8 and picked.unique().numel() == 8
    depth, height, width = picked // side**2, picked // side % side, picked % side
    for coordinate in (depth, height, width):
        assert set(coordinate.tolist()) == set(range(side)), coordinate


def test_rank_rows_take_the_spread_tokens_of_every_view():
    n, e = 64, 3
    tokens = torch.arange(n, dtype=torch.float32)[None, :, None].expand(4, n, e)  # value = token index
    rows = _rank_rows({"patch_tokens": tokens, "cls_embed": torch.ones(4, e)}, n_global=2)
    assert rows["patch"].shape == (4 * 8, e)
    assert rows["patch"][:8, 0].long().tolist() == rank_token_indices(n).tolist()
    assert rank_token_indices(5).tolist() == [0, 1, 2, 3, 4]  # fewer tokens than asked: all of them
    assert torch.equal(rows["cls"], torch.ones(4, e))


# ----------------------------------------------------------------------------- the collapse alarm


def _healthy_row() -> dict[str, float]:
    return {"teacher_entropy": 0.5, "teacher_entropy_gap": 1.5, "teacher_patch_entropy_gap": 1.0,
            "cls_rank": 20.0, "cls_rank_max": 64, "teacher_cls_spread": 0.6, "student_cls_cosine": 0.3}  # fmt: skip


def _fire_flags(monitor: CollapseMonitor, rows) -> list[int]:
    return [monitor.observe(step, row) for step, row in enumerate(rows, start=1)]


@pytest.mark.parametrize("change, sign", [
    ({"teacher_entropy": 0.99 * LOG_K}, "uniform"),
    ({"teacher_entropy_gap": 0.01}, "targets ignore the volume"),
    ({"teacher_patch_entropy_gap": 0.0}, "patch targets ignore the token"),
    ({"cls_rank": 2.0}, "low rank"),
    ({"teacher_cls_spread": 0.01}, "no spread"),
    ({"student_cls_cosine": 0.999}, "same embedding"),
])  # fmt: skip
def test_each_sign_fires_after_patience_and_logs_once_with_its_values(change, sign, caplog):
    monitor = CollapseMonitor(LOG_K, patience=3, logger=LOGGER, max_cosine=MAX_COSINE)
    row = {**_healthy_row(), **change}
    with caplog.at_level(logging.WARNING):
        assert _fire_flags(monitor, [row] * 5) == [0, 0, 1, 1, 1]
    assert [r.message for r in caplog.records if "collapse alarm" in r.message] == [caplog.records[0].message]
    column = next(iter(change))
    assert f"collapse alarm at step 3: {sign} for 3 steps ({column} " in caplog.records[0].message


def test_healthy_row_and_missing_or_nan_columns_raise_no_sign():
    monitor = CollapseMonitor(LOG_K, patience=1, logger=LOGGER, max_cosine=MAX_COSINE)
    assert monitor.signs(_healthy_row()) == {}
    assert monitor.signs({}) == {}  # a branch switched off logs nothing
    assert monitor.signs({"teacher_entropy_gap": math.nan, "teacher_cls_spread": ""}) == {}


def test_low_rank_waits_for_a_buffer_that_allows_a_higher_rank():
    monitor = CollapseMonitor(LOG_K, patience=1, logger=LOGGER, max_cosine=MAX_COSINE)
    assert monitor.signs({**_healthy_row(), "cls_rank": 1.9, "cls_rank_max": 4}) == {}


def test_alarm_needs_consecutive_steps():
    monitor = CollapseMonitor(LOG_K, patience=2, logger=LOGGER, max_cosine=MAX_COSINE)
    bad = {**_healthy_row(), "student_cls_cosine": 0.999}
    assert _fire_flags(monitor, [bad, _healthy_row(), bad, _healthy_row()]) == [0, 0, 0, 0]


def _target_row(view0: torch.Tensor, view1: torch.Tensor) -> dict[str, float]:
    """A healthy row whose CLS entropies come from these two views' targets."""
    stats = entropy_stats(_views(view0, view1), "teacher_", 2)
    return {**_healthy_row(), **{k: v.item() for k, v in stats.items()}}


def test_alarm_fires_on_targets_collapsed_onto_two_prototypes(caplog):
    """Every volume on the same mixture of prototypes 0 and 1: the marginal entropy is log 2, far above
    the old 0.05 log K "one prototype" floor, yet the targets say nothing about the volume."""
    mixture = torch.zeros(8, 64)
    mixture[:, :2] = 0.5
    row = _target_row(mixture, mixture)
    assert row["teacher_marginal_entropy"] == pytest.approx(math.log(2), abs=1e-6)
    monitor = CollapseMonitor(LOG_K, patience=3, logger=LOGGER, max_cosine=MAX_COSINE)
    with caplog.at_level(logging.WARNING):
        assert _fire_flags(monitor, [row] * 4) == [0, 0, 1, 1]
    assert "targets ignore the volume" in caplog.text
    # so does every volume on one prototype per view: view 0 on prototype 0, view 1 on prototype 1
    split = _target_row(torch.eye(64)[[0] * 8], torch.eye(64)[[1] * 8])
    assert "targets ignore the volume" in monitor.signs(split)


def test_alarm_stays_quiet_on_two_clusters_of_volumes():
    """Half the volumes on prototype 0, half on 1: one bit about the volume (gap log 2), a coarse but
    volume-dependent target; the rank sign is the one that catches a 2-D embedding behind it."""
    clusters = torch.eye(64)[[0, 1] * 4]
    row = _target_row(clusters, clusters)
    assert row["teacher_entropy_gap"] == pytest.approx(math.log(2), abs=1e-6)
    assert row["teacher_entropy_gap"] > GAP_MIN
    assert CollapseMonitor(LOG_K, patience=1, logger=LOGGER, max_cosine=MAX_COSINE).signs(row) == {}


def _tracker(patience: int) -> HealthTracker:
    return HealthTracker(LOG_K, LOGGER, rank_buffer=64, collapse_patience=patience, collapse_max_cosine=0.99)


def test_alarm_fires_on_a_rank_two_embedding(caplog):
    plane = torch.linalg.qr(torch.randn(64, 2, generator=_gen(3)))[0].T  # (2, 64): a 2-D subspace
    tracker, flags, rows = _tracker(patience=3), [], []
    with caplog.at_level(logging.WARNING):
        for step in range(1, 6):
            embeddings = torch.randn(16, 2, generator=_gen(step)) @ plane  # (16, 64) in the plane
            row = _healthy_row()
            tracker.observe(step, row, {"cls": embeddings})
            flags.append(row["collapse_alarm"])
            rows.append(row)
    assert all(r["cls_rank"] <= 2.0 + 1e-3 for r in rows)
    assert [r["cls_rank_max"] for r in rows] == [16, 32, 48, 64, 64]
    assert flags == [0, 0, 1, 1, 1]
    assert "collapse alarm at step 3: low rank" in caplog.text


def test_alarm_stays_quiet_on_healthy_inputs():
    """Volume-specific sharp targets, isotropic full-rank embeddings: no sign at any step."""
    tracker, b = _tracker(patience=2), 8
    for step in range(1, 7):
        g = _gen(step)
        logits = torch.randn(b, 64, generator=g)
        logits[torch.arange(b), torch.randperm(64, generator=g)[:b]] += 5.0  # each volume its prototype
        view0 = torch.softmax(logits / 0.1, -1)
        view1 = torch.softmax((logits + 0.1 * torch.randn(b, 64, generator=g)) / 0.1, -1)
        embeddings = torch.randn(2, b, 64, generator=g)  # (views, batch, dim)
        row = {**_target_row(view0, view1), "teacher_patch_entropy_gap": 1.0,
               "teacher_cls_spread": cls_spread(embeddings).item(),
               "student_cls_cosine": cross_volume_cosine(embeddings).item()}  # fmt: skip
        tracker.observe(
            step, row, {"cls": embeddings.flatten(0, 1), "patch": torch.randn(64, 64, generator=g)}
        )
        assert tracker.alarm.signs(row) == {}, step
        assert row["collapse_alarm"] == 0
        assert row["cls_rank"] > 10 and row["patch_rank_max"] == 64
