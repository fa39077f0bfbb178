import math

import numpy as np
import pytest

from volta3d.engine.schedules import (
    build_schedules,
    cosine_schedule,
    initial_share,
    scaled_lr,
    teacher_momentum_schedule,
    warmup_constant_schedule,
)

from ..config_kwargs import kwargs_for


def test_cosine_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.1, total_steps=20, warmup_steps=5, warmup_start=0.0)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], [0.0, 0.2, 0.4, 0.6, 0.8])  # linear ramp, excluding the base
    assert s[5] == pytest.approx(1.0)  # first post-warm-up step is the base value
    assert s[-1] == pytest.approx(0.1)  # ends exactly at the final value
    # half cosine: value at step 5 + k is final + (base - final) * (1 + cos(pi k / 14)) / 2
    k = 7
    assert s[5 + k] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 14)))
    assert np.all(np.diff(s[5:]) <= 1e-12)  # monotone decay


def test_warmup_longer_than_run_is_truncated():
    s = cosine_schedule(1.0, 0.0, total_steps=4, warmup_steps=10)
    np.testing.assert_allclose(s, [0.0, 0.1, 0.2, 0.3])
    t = warmup_constant_schedule(0.04, 0.07, warmup_steps=30, total_steps=10)
    assert len(t) == 10 and t[0] == pytest.approx(0.04) and t[-1] < 0.07
    np.testing.assert_allclose(t, np.linspace(0.04, 0.07, 30)[:10])


def test_teacher_temperature_reaches_final_value():
    t = warmup_constant_schedule(0.04, 0.07, warmup_steps=3, total_steps=6)
    np.testing.assert_allclose(t, [0.04, 0.055, 0.07, 0.07, 0.07, 0.07])


def test_single_step_run():
    s = cosine_schedule(0.5, 0.1, total_steps=1)
    np.testing.assert_allclose(s, [0.5])


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, total_steps=0)
    with pytest.raises(ValueError, match="no optimiser steps"):
        build_schedules(
            steps_per_epoch=0, epochs=3, lr=1, min_lr=0, warmup_epochs=0, weight_decay=0, weight_decay_end=0,
            momentum_teacher=0.9, momentum_teacher_end=1, teacher_max_init_share=1.0, teacher_temp=0.07, warmup_teacher_temp=0.04,
            warmup_teacher_temp_epochs=1, teacher_patch_temp=0.07, warmup_teacher_patch_temp=0.04,
            freeze_last_layer_epochs=1, **kwargs_for(build_schedules, "train"),
        )  # fmt: skip


def test_build_schedules_by_optimiser_step():
    s = build_schedules(
        steps_per_epoch=5, epochs=4, lr=1e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04,
        weight_decay_end=0.4, momentum_teacher=0.996, momentum_teacher_end=1.0, teacher_max_init_share=1.0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=2, teacher_patch_temp=0.06,
        warmup_teacher_patch_temp=0.03, freeze_last_layer_epochs=1, **kwargs_for(build_schedules, "train"),
    )  # fmt: skip
    assert s.total_steps == 20
    assert s.lr[5] == pytest.approx(1e-3) and s.lr[-1] == pytest.approx(1e-6) and s.lr[0] == 0.0
    assert s.weight_decay[0] == pytest.approx(0.04) and s.weight_decay[-1] == pytest.approx(0.4)
    assert s.momentum[0] == pytest.approx(0.996) and s.momentum[-1] == pytest.approx(1.0)
    assert s.teacher_temp[9] == pytest.approx(0.07) and s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_patch_temp[-1] == pytest.approx(0.06)
    assert s.freeze_last_layer.tolist() == [True] * 5 + [False] * 15


def test_lr_scaling_rules():
    assert scaled_lr(5e-4, 8, "linear") == pytest.approx(1.5625e-5)  # DINO: lr * B / 256
    assert scaled_lr(4e-3, 8, "sqrt") == pytest.approx(4e-3 * math.sqrt(8 / 1024))  # DINOv2
    assert scaled_lr(5e-4, 8, "none") == 5e-4
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        scaled_lr(1e-3, 8, "cubic")


def test_teacher_momentum_keeps_at_most_the_allowed_initial_share():
    # the share left after T steps is the product of the per-step momenta, computed here by a loop
    def share(momenta: np.ndarray) -> float:
        kept = 1.0
        for m in momenta:
            kept *= m
        return kept

    dino = cosine_schedule(0.996, 1.0, 688)
    assert share(dino) == pytest.approx(math.exp(-0.002 * 688 / 1.0), rel=0.05)  # ~25 % (DINO, 688 steps)
    for steps in (50, 172, 688, 5000):
        m = teacher_momentum_schedule(0.996, 1.0, steps, max_initial_share=0.01)
        kept = share(m)
        assert kept <= 0.01 + 1e-9
        assert kept > 0.0099 or m[0] == pytest.approx(0.996)  # lowered only as far as needed
        assert m[-1] == pytest.approx(1.0) and np.all(np.diff(m) >= -1e-12)  # still a cosine to 1
        np.testing.assert_allclose(initial_share(m)[-1], kept, rtol=1e-9)
    # a long run keeps DINO's base: its share is already negligible
    np.testing.assert_allclose(
        teacher_momentum_schedule(0.996, 1.0, 5000, 0.01), cosine_schedule(0.996, 1.0, 5000)
    )
    np.testing.assert_allclose(teacher_momentum_schedule(0.996, 1.0, 688, 1.0), dino)
    with pytest.raises(ValueError, match="teacher_max_init_share"):
        teacher_momentum_schedule(0.996, 1.0, 10, 0.0)


def test_schedules_report_the_running_initial_share():
    s = build_schedules(
        steps_per_epoch=10, epochs=3, lr=1e-3, min_lr=1e-6, warmup_epochs=0, weight_decay=0.04,
        weight_decay_end=0.4, momentum_teacher=0.996, momentum_teacher_end=1.0, teacher_max_init_share=0.05,
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, teacher_patch_temp=0.07,
        warmup_teacher_patch_temp=0.04, freeze_last_layer_epochs=0, **kwargs_for(build_schedules, "train"),
    )  # fmt: skip
    assert s.teacher_init_share[0] == pytest.approx(s.momentum[0])
    assert s.teacher_init_share[-1] == pytest.approx(0.05, rel=1e-6)
