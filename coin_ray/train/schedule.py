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

Both training stages' length is set in epochs (``train.<stage>.epochs``, the reference's by
default) or, as an override, in steps. ``resolve_length`` turns epochs into steps once, where
the stage knows its number of training images, and every fraction above (and the
half-lives in ``coin_ray.config``) then follows that number of steps:

    cfg, length = resolve_length(cfg, "distill", images=300)   # cfg.train.distill.steps is set
    print(length.describe())   # [distill] 65 epochs (the default) = 4875 steps of 4 images over 300 images
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from coin_ray.config import DEFAULT_EPOCHS, Config, DistillConfig, resolved_steps

Stage = Literal["disseminate", "distill"]


def steps_for_epochs(epochs: float, images: int, batch_size: int) -> int:
    """The optimisation steps of ``epochs`` passes over ``images`` images, ``batch_size`` a step.

    ``ceil(epochs * images / batch_size)``, at least 1: the last, partial batch is a step
    too, and a stage always trains. ``epochs`` is taken as the decimal it prints as
    (``Fraction(repr(epochs))``), so 0.1 epoch of 30 images at 3 a step is exactly 1 step,
    not the 2 that the float product 1.0000000000000002 would round up to.
    """
    exact = Fraction(repr(float(epochs))) * images / batch_size
    return max(1, math.ceil(exact))


@dataclass(frozen=True)
class StageLength:
    """How long one training stage trains, and where the number came from.

    ``batch_size`` is the global batch (per worker x workers); ``source`` is the config key
    that fixed the length, or "the default".
    """

    stage: str
    epochs: float
    images: int
    batch_size: int
    steps: int
    source: str

    def describe(self) -> str:
        """One line, e.g. "[distill] 65 epochs (the default) = 4875 steps of 4 images over 300 images"."""
        batch = f"{self.batch_size} image{'' if self.batch_size == 1 else 's'}"
        if self.source.endswith(".steps"):
            return (f"[{self.stage}] {self.steps} steps ({self.source}) of {batch} over {self.images} images "
                    f"= {self.epochs:.3g} epochs")
        return (f"[{self.stage}] {self.epochs:g} epochs ({self.source}) = {self.steps} steps of {batch} "
                f"over {self.images} images")


def resolve_length(cfg: Config, stage: Stage, images: int, world_size: int = 1) -> tuple[Config, StageLength]:
    """``cfg`` with ``train.<stage>.steps`` set (epochs cleared), and the length it stands for.

    Args:
        images: the number of images the stage's training dataset iterates over (its
            records that are not errors; each caller says which).
        world_size: training workers; each step takes ``batch_size`` images on each.
    An explicit ``steps`` is kept as it is; otherwise the steps are ``steps_for_epochs`` of
    ``epochs`` (``DEFAULT_EPOCHS[stage]`` when unset). Resolving a resolved config changes
    nothing, so a caller that cannot tell whether its caller resolved may resolve again.
    """
    length = getattr(cfg.train, stage)
    batch = length.batch_size * max(1, world_size)
    key = f"train.{stage}"
    if length.steps is not None:
        epochs = length.steps * batch / images if images else 0.0
        return cfg, StageLength(stage, epochs, images, batch, length.steps, f"{key}.steps")
    epochs = DEFAULT_EPOCHS[stage] if length.epochs is None else length.epochs
    source = "the default" if length.epochs is None else f"{key}.epochs"
    steps = steps_for_epochs(epochs, images, batch)
    train = dataclasses.replace(cfg.train, **{stage: dataclasses.replace(length, steps=steps, epochs=None)})
    return dataclasses.replace(cfg, train=train), StageLength(stage, epochs, images, batch, steps, source)
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
    """The reference's step schedule (see the module docstring) for ``cfg.steps`` steps (resolved)."""
    steps = resolved_steps(cfg.steps, "train.distill")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, cfg.burn_up))


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
