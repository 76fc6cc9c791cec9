"""Distillation's schedule: the reference's learning-rate shape and phases as fractions of the run."""

import pytest
import torch

from coin_ray.config import DistillConfig
from coin_ray.train.schedule import build_distill_scheduler, lr_factor, phase_at


def test_lr_follows_the_reference_milestones_on_its_own_run_length():
    # 65k steps, burn-up at 45k: warm-up, 1x to 40k, 0.1x to 45k, 0.5x to 60k, 0.1x to 65k.
    steps, burn_up = 65_000, 45 / 65
    expected = {0: 1 / 3250, 3249: 1.0, 3250: 1.0, 39_999: 1.0, 40_000: 0.1, 44_999: 0.1, 45_000: 0.5,
                59_999: 0.5, 60_000: 0.1, 64_999: 0.1}
    for step, factor in expected.items():
        assert lr_factor(step, steps, burn_up) == pytest.approx(factor), step


def test_the_same_shape_on_a_short_run():
    # 1000 steps, burn-up 0.7: warm-up 50 steps, 0.1x from 700 - 1000 * 5/65 = 623.1, 0.5x 700-924.
    got = [lr_factor(s, 1000, 0.7) for s in (49, 50, 623, 624, 699, 700, 924, 925, 999)]
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.1, 0.5, 0.5, 0.1, 0.1])


def test_scheduler_applies_the_factor_to_every_group():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.1}])
    sched = build_distill_scheduler(opt, DistillConfig(steps=100, burn_up=0.5))
    for _ in range(50):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 0.05])


def test_phases_burn_up_and_prototype_warm_up():
    cfg = DistillConfig(steps=100, burn_up=0.7, prototype_start=0.08)
    phases = {s: phase_at(s, cfg) for s in (0, 7, 8, 69, 70)}
    assert [p.prototypes_update for p in phases.values()] == [False, False, True, True, True]
    assert [p.after_burn_up for p in phases.values()] == [False, False, False, False, True]
