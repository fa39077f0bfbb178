"""Per-optimiser-step schedules, built once as arrays and indexed by step (as DINOv2's
``CosineScheduler``).

Indexing by optimiser step, never by loader iteration, keeps every schedule correct under
gradient accumulation (with K micro-batches per step, a schedule indexed by loader iteration would
run K times too fast). Every builder clamps to the run length, so a warm-up longer than the run
(30 teacher-temperature epochs in a 10-epoch run) is truncated instead of indexing past the end
of the array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from volta3d.errors import InputError


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up ``warmup_start -> base`` over ``warmup_steps``, then a half cosine ``base -> final``.

    Returns an array of length ``total_steps``; value ``i`` is used for optimiser step ``i``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, int(warmup_steps))
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.empty(0)
    if warmup_steps >= total_steps:
        return warm[:total_steps].astype(np.float64)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * t))
    return np.concatenate([warm, decay]).astype(np.float64)


def warmup_constant_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear ``start -> end`` over ``warmup_steps`` (inclusive of ``end`` at the last warm-up step), then
    constant ``end``; truncated to ``total_steps`` (DINO's teacher-temperature warm-up)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = max(0, int(warmup_steps))
    ramp = np.linspace(start, end, warmup_steps) if warmup_steps else np.empty(0)
    rest = np.full(max(total_steps - warmup_steps, 0), end)
    return np.concatenate([ramp, rest])[:total_steps].astype(np.float64)


def teacher_momentum_schedule(
    base: float, final: float, total_steps: int, max_initial_share: float
) -> np.ndarray:
    """DINO's cosine ``base -> final`` for the EMA teacher, with ``base`` lowered when needed so that the
    final teacher keeps at most ``max_initial_share`` of its initial (random) weights.

    With momentum m_t at step t the final teacher is ``prod_t m_t`` initial weights plus EMA-weighted
    students. DINO's 0.996 -> 1 suits 100+ epochs; over 688 steps it keeps a quarter of the random
    initialisation (exp(-(1 - base) T / 2) for a cosine to 1). The base is found by bisection on the
    exact product, since the share falls monotonically as the base falls; ``max_initial_share`` 1
    leaves DINO's schedule unchanged.
    """
    if not 0.0 < max_initial_share <= 1.0:
        raise InputError(f"optim.teacher_max_init_share must be in (0, 1], got {max_initial_share}")
    schedule = cosine_schedule(base, final, total_steps)
    if initial_share(schedule)[-1] <= max_initial_share:
        return schedule
    low, high = 0.0, base  # share(low) = 0 <= target < share(high)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if initial_share(cosine_schedule(mid, final, total_steps))[-1] > max_initial_share:
            high = mid
        else:
            low = mid
    return cosine_schedule(low, final, total_steps)


def initial_share(momentum: np.ndarray) -> np.ndarray:
    """Share of the initial weights left in the teacher after each step: the running product of momenta."""
    return np.cumprod(np.asarray(momentum, dtype=np.float64))


@dataclass(frozen=True)
class Schedules:
    """All schedule arrays of a pretraining run, each of length ``total_steps``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    teacher_patch_temp: np.ndarray
    freeze_last_layer: np.ndarray  # bool: the heads' last layers get no update at this step

    @property
    def teacher_init_share(self) -> np.ndarray:
        """Share of the initial weights in the teacher after each step's EMA update."""
        return initial_share(self.momentum)

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def scaled_lr(lr: float, effective_batch: int, rule: str) -> float:
    """DINO scales linearly (lr * B / 256); DINOv2 by square root (lr * sqrt(B / 1024))."""
    if rule == "linear":
        return lr * effective_batch / 256.0
    if rule == "sqrt":
        return lr * float(np.sqrt(effective_batch / 1024.0))
    if rule == "none":
        return lr
    raise InputError(f"optim.lr_scaling must be linear, sqrt or none, got '{rule}'")


def build_schedules(
    *,
    steps_per_epoch: int,
    epochs: int,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    momentum_teacher_end: float,
    teacher_max_init_share: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    teacher_patch_temp: float,
    warmup_teacher_patch_temp: float,
    freeze_last_layer_epochs: float,
) -> Schedules:
    """``lr`` here is already scaled for the effective batch."""
    total = steps_per_epoch * epochs
    if total <= 0:
        raise InputError(
            f"the run has no optimiser steps (steps_per_epoch={steps_per_epoch}, epochs={epochs})"
        )

    def steps(e: float) -> int:
        return int(round(e * steps_per_epoch))

    return Schedules(
        lr=cosine_schedule(lr, min_lr, total, steps(warmup_epochs)),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total),
        momentum=teacher_momentum_schedule(
            momentum_teacher, momentum_teacher_end, total, teacher_max_init_share
        ),
        teacher_temp=warmup_constant_schedule(
            warmup_teacher_temp, teacher_temp, steps(warmup_teacher_temp_epochs), total
        ),
        teacher_patch_temp=warmup_constant_schedule(
            warmup_teacher_patch_temp, teacher_patch_temp, steps(warmup_teacher_temp_epochs), total
        ),
        freeze_last_layer=np.arange(total) < steps(freeze_last_layer_epochs),
    )
