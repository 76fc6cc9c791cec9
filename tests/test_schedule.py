"""Distillation's schedule: the reference's learning-rate shape and phases as fractions of the run, and
the length of a training stage in epochs."""

import pytest
import torch

from coin_ray.config import Config, DistillConfig, from_dict
from coin_ray.train.schedule import (build_distill_scheduler, burn_up_step, lr_factor, phase_at, resolve_length,
                                     steps_for_epochs)


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


# -- the length: epochs -> steps -----------------------------------------------------------------

def test_steps_for_epochs_rounds_the_last_partial_batch_up_and_never_gives_zero():
    assert steps_for_epochs(8, 300, 4) == 600  # exact: 8 x 300 / 4
    assert steps_for_epochs(21.33, 300, 4) == 1600  # 1599.75: the last, partial batch is a step
    assert steps_for_epochs(65, 2975, 3) == 64_459  # the reference's data at 65 epochs (64458.3)
    assert steps_for_epochs(65, 8, 4) == 130
    assert steps_for_epochs(2, 10, 4) == 5  # 20 images at 4 a step
    assert steps_for_epochs(0.1, 30, 3) == 1  # the decimal 0.1, not the float product 1.0000000000000002
    assert steps_for_epochs(1e-6, 10, 4) == 1  # a stage always trains
    assert steps_for_epochs(3, 0, 4) == 1


def test_the_default_length_is_the_references_epochs_and_steps_override_it():
    cfg, length = resolve_length(Config(), "distill", images=300)
    assert (cfg.train.distill.steps, cfg.train.distill.epochs) == (4875, None)  # 65 x 300 / 4
    assert (length.epochs, length.images, length.batch_size, length.source) == (65.0, 300, 4, "the default")
    assert length.describe() == "[distill] 65 epochs (the default) = 4875 steps of 4 images over 300 images"
    assert resolve_length(Config(), "disseminate", images=300)[0].train.disseminate.steps == 3750  # 50 epochs
    # Two workers take a batch each per step: half the steps for the same epochs.
    two = resolve_length(from_dict({}, ["train.distill.epochs=2"]), "distill", images=300, world_size=2)[1]
    assert (two.steps, two.batch_size, two.source) == (75, 8, "train.distill.epochs")
    explicit, length = resolve_length(from_dict({}, ["train.distill.steps=150"]), "distill", images=300)
    assert explicit.train.distill.steps == 150 and length.epochs == 2.0
    assert length.describe() == "[distill] 150 steps (train.distill.steps) of 4 images over 300 images = 2 epochs"
    assert resolve_length(cfg, "distill", images=300)[0] == cfg  # resolving again changes nothing


def test_every_fraction_of_the_schedule_follows_the_derived_length():
    derived = resolve_length(from_dict({}, ["train.distill.epochs=2"]), "distill", images=300)[0].train.distill
    written = from_dict({}, ["train.distill.steps=150"]).train.distill
    assert derived == written
    assert burn_up_step(derived) == 105 and derived.eta == written.eta and derived.teacher_keep_rate < 1.0
    assert [phase_at(s, derived).prototypes_update for s in (11, 12)] == [False, True]  # 0.077 x 150 = 11.55


def test_an_unresolved_length_is_a_clear_error_not_a_type_error():
    with pytest.raises(ValueError, match="train.distill.steps: not resolved yet"):
        DistillConfig().eta
    with pytest.raises(ValueError, match="train.distill.steps: not resolved yet"):
        build_distill_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), DistillConfig())
