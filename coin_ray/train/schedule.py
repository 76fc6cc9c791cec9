"""Distillation's schedule: the learning rate and when each part of COIN starts.

The reference's foggy run (65k steps, burn-up at 45k) is the model, with its milestones
expressed as fractions of the run so that one schedule fits runs of any length:

    learning rate   1x (after a short linear warm-up) until 5k steps before burn-up,
                    0.1x until burn-up, back up to 0.5x for the first three quarters of
                    the phase after burn-up, 0.1x to the end   (40k / 45k / 60k / 65k)
    prototypes      updated from ``prototype_start`` of the run on (5k / 65k = 0.077): the
                    student's region features are noise before that
    CKG, L_inc      the CKG trains once prototype updates have begun (its attention reads
                    the prototypes); L_inc is on after burn-up

``DistillPlan`` is decided per step from the config, in one place, and passed as a value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coin_ray.config import DistillConfig
from coin_ray.train.loop import WARMUP_FRACTION  # the same linear warm-up as dissemination

PRE_BURN_UP_DECAY = 5 / 65  # the reference drops to 0.1x this fraction of the run before burn-up
POST_BURN_UP_HIGH = 0.75  # 0.5x for this share of the phase after burn-up (15k of 20k steps)
LOW, RAISED = 0.1, 0.5


def lr_factor(step: int, steps: int, burn_up: float) -> float:
    """The multiplier of every group's base rate at ``step`` (0-based) of a ``steps``-step run."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    burn = burn_up * steps
    if step < burn - PRE_BURN_UP_DECAY * steps:
        return 1.0
    if step < burn:
        return LOW
    if step < burn + POST_BURN_UP_HIGH * (steps - burn):
        return RAISED
    return LOW


def build_distill_scheduler(optimizer: torch.optim.Optimizer, cfg: DistillConfig
                            ) -> torch.optim.lr_scheduler.LambdaLR:
    """The reference's step schedule (see the module docstring) for ``cfg.steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg.steps, cfg.burn_up))


@dataclass(frozen=True)
class Phase:
    """What is on at one step: after burn-up the teacher moves (EMA), pairs take the fused
    box and L_inc is on; once prototypes update, the CKG trains too."""

    after_burn_up: bool
    prototypes_update: bool = True


def burn_up_step(cfg: DistillConfig) -> int:
    return int(round(cfg.burn_up * cfg.steps))


def phase_at(step: int, cfg: DistillConfig) -> Phase:
    """The one place the training phase of ``step`` (0-based) is decided."""
    return Phase(after_burn_up=step >= burn_up_step(cfg),
                 prototypes_update=step >= int(round(cfg.prototype_start * cfg.steps)))
