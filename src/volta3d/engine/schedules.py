"""Per-optimiser-step schedules, built once as arrays and indexed by step (as DINOv2's
``CosineScheduler``).

Indexing by optimiser step, never by loader iteration, keeps every schedule correct under
gradient accumulation (with K micro-batches per step, a schedule indexed by loader iteration would
run K times too fast). Every builder clamps to the run length, so a warm-up longer than the run
(30 teacher-temperature epochs in a 10-epoch run) is truncated instead of indexing past the end
of the array. The arrays hold only the steps that will run (``train.max_steps`` may stop a run long
before its last epoch), each value as in the whole run's schedule, so a run of 20 million epochs
stopped after one step costs one value, not gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from volta3d.errors import InputError

# A run of more optimiser steps would hold ~41 bytes of schedules per step (400 MB at this limit) and
# not finish: at 0.1 s a step, 10^7 steps take 12 days.
MAX_RUN_STEPS = 10**7
# Runs longer than this take the teacher's final share by quadrature (final_share).
SHARE_BLOCK = 2**20


def _ramp(start: float, end: float, steps: int, length: int, endpoint: bool) -> np.ndarray:
    """The first ``length`` values of ``np.linspace(start, end, steps, endpoint)``, computed as numpy
    does but without building the ``steps`` values that no step will read."""
    n = max(0, min(steps, length))
    div = steps - 1 if endpoint else steps
    i = np.arange(n, dtype=np.float64)
    delta = end - start
    if div > 0:
        step = delta / div
        y = i / div * delta if step == 0 else i * step  # numpy's order for denormal steps
    else:
        y = i * delta
    y = y + start
    if endpoint and steps > 1 and n == steps:
        y[-1] = end
    return y


def _cosine_decay(base: float, final: float, n: int, first: int, last: int) -> np.ndarray:
    """Values ``first .. last - 1`` of a half cosine ``base -> final`` over ``n`` steps."""
    t = np.arange(first, last) / max(n - 1, 1)
    return final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * t))


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    length: int | None = None,
) -> np.ndarray:
    """Linear warm-up ``warmup_start -> base`` over ``warmup_steps``, then a half cosine ``base -> final``.

    Returns the first ``length`` (default ``total_steps``) values of the ``total_steps``-step schedule;
    value ``i`` is used for optimiser step ``i``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    length = total_steps if length is None else min(length, total_steps)
    warmup_steps = max(0, int(warmup_steps))
    warm = _ramp(warmup_start, base, warmup_steps, length, endpoint=False)
    if warmup_steps >= total_steps:
        return warm
    decay = _cosine_decay(base, final, total_steps - warmup_steps, 0, max(length - warmup_steps, 0))
    return np.concatenate([warm, decay]).astype(np.float64)


def warmup_constant_schedule(
    start: float, end: float, warmup_steps: int, total_steps: int, length: int | None = None
) -> np.ndarray:
    """Linear ``start -> end`` over ``warmup_steps`` (inclusive of ``end`` at the last warm-up step), then
    constant ``end``; truncated to ``total_steps`` (DINO's teacher-temperature warm-up). The first
    ``length`` (default ``total_steps``) values."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    length = total_steps if length is None else min(length, total_steps)
    warmup_steps = max(0, int(warmup_steps))
    ramp = _ramp(start, end, warmup_steps, length, endpoint=True)
    return np.concatenate([ramp, np.full(length - len(ramp), end)]).astype(np.float64)


def teacher_momentum_schedule(
    base: float, final: float, total_steps: int, max_initial_share: float, length: int | None = None
) -> np.ndarray:
    """DINO's cosine ``base -> final`` for the EMA teacher, with ``base`` lowered when needed so that the
    final teacher keeps at most ``max_initial_share`` of its initial (random) weights.

    With momentum m_t at step t the final teacher is ``prod_t m_t`` initial weights plus EMA-weighted
    students. DINO's 0.996 -> 1 suits 100+ epochs; over 688 steps it keeps a quarter of the random
    initialisation (exp(-(1 - base) T / 2) for a cosine to 1). The base is found by bisection on the
    exact product, since the share falls monotonically as the base falls; ``max_initial_share`` 1
    leaves DINO's schedule unchanged. Returns the first ``length`` (default ``total_steps``) values.
    """
    if not 0.0 < max_initial_share <= 1.0:
        raise InputError(f"optim.teacher_max_init_share must be in (0, 1], got {max_initial_share}")
    if final_share(base, final, total_steps) <= max_initial_share:
        return cosine_schedule(base, final, total_steps, length=length)
    low, high = 0.0, base  # share(low) = 0 <= target < share(high)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if final_share(mid, final, total_steps) > max_initial_share:
            high = mid
        else:
            low = mid
    return cosine_schedule(low, final, total_steps, length=length)


def final_share(base: float, final: float, total_steps: int) -> float:
    """Share of the initial weights the teacher keeps after a whole cosine ``base -> final`` run: the
    product of its momenta. Beyond ``SHARE_BLOCK`` steps the sum of their logarithms (a smooth function
    of t = i / (T - 1)) is taken by the trapezoidal rule on ``SHARE_BLOCK`` points plus the end
    correction, so a run of 10^8 steps needs no array of its length (relative error ~ 1e-12)."""
    if total_steps <= SHARE_BLOCK:
        return float(initial_share(_cosine_decay(base, final, total_steps, 0, total_steps))[-1])
    momenta = _cosine_decay(base, final, SHARE_BLOCK, 0, SHARE_BLOCK)
    if momenta.min() <= 0.0:
        return 0.0  # a momentum of 0 keeps nothing of the initialisation
    logs = np.log(momenta)
    ends = 0.5 * (logs[0] + logs[-1])
    return float(np.exp((total_steps - 1) / (SHARE_BLOCK - 1) * (logs.sum() - ends) + ends))


def initial_share(momentum: np.ndarray) -> np.ndarray:
    """Share of the initial weights left in the teacher after each step: the running product of momenta."""
    return np.cumprod(np.asarray(momentum, dtype=np.float64))


@dataclass(frozen=True)
class Schedules:
    """All schedule arrays of a pretraining run, indexed by optimiser step. They hold the steps that
    will run, which ``train.max_steps`` may stop before the run's ``total_steps``."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    teacher_patch_temp: np.ndarray
    freeze_last_layer: np.ndarray  # bool: the heads' last layers get no update at this step
    planned_steps: int = 0  # the whole run's length (epochs x steps per epoch); 0: the arrays' length

    @cached_property
    def teacher_init_share(self) -> np.ndarray:
        """Share of the initial weights in the teacher after each step's EMA update (read at every step:
        computed once)."""
        return initial_share(self.momentum)

    @property
    def total_steps(self) -> int:
        return self.planned_steps or len(self.lr)


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
    max_steps: int,
) -> Schedules:
    """``lr`` here is already scaled for the effective batch; ``max_steps`` (``train.max_steps``, 0: the
    whole run) is where the run stops, and the arrays hold the steps before it."""
    total = steps_per_epoch * epochs
    if total <= 0:
        raise InputError(
            f"the run has no optimiser steps (steps_per_epoch={steps_per_epoch}, epochs={epochs})"
        )
    length = total if max_steps <= 0 else min(max_steps, total)
    if length > MAX_RUN_STEPS:
        raise InputError(
            f"optim.epochs={epochs} x {steps_per_epoch} steps per epoch"
            + (f" (train.max_steps={max_steps})" if max_steps > 0 else "")
            + f" = {length:,} optimiser steps, over the limit of {MAX_RUN_STEPS:,} for one run; "
            "lower optim.epochs or set train.max_steps"
        )

    def steps(e: float) -> int:
        return int(round(e * steps_per_epoch))

    temp_warmup = steps(warmup_teacher_temp_epochs)
    return Schedules(
        lr=cosine_schedule(lr, min_lr, total, steps(warmup_epochs), length=length),
        weight_decay=cosine_schedule(weight_decay, weight_decay_end, total, length=length),
        momentum=teacher_momentum_schedule(
            momentum_teacher, momentum_teacher_end, total, teacher_max_init_share, length=length
        ),
        teacher_temp=warmup_constant_schedule(warmup_teacher_temp, teacher_temp, temp_warmup, total, length),
        teacher_patch_temp=warmup_constant_schedule(
            warmup_teacher_patch_temp, teacher_patch_temp, temp_warmup, total, length
        ),
        freeze_last_layer=np.arange(length) < steps(freeze_last_layer_epochs),
        planned_steps=total,
    )
