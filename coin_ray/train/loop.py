"""What both training stages share (no Ray): the schedule, the per-step generator, the
step hook, and the ``Training`` shape that ``coin_ray.ray.train.run_training`` drives.

    training = DisseminateTraining(...) or DistillTraining(...)
    training.load_state_dict(blob)            # resume (blob from training.state_dict())
    training.run_steps(on_step)               # steps training.step + 1 .. the end
"""

from __future__ import annotations

import json
import math
from typing import Callable, Protocol

import torch
from torch import nn

from coin_ray import storage

WARMUP_FRACTION = 0.05  # linear warm-up over the first 5% of steps
FINAL_LR_FRACTION = 0.1  # cosine decay ends at 10% of the base rate

StepHook = Callable[[int, dict[str, float]], None]


class Training(Protocol):
    """A resumable training run: ``step`` counts the steps done (1-based once running)."""

    step: int

    def run_steps(self, on_step: StepHook | None = None) -> None:
        """Steps ``step + 1 ..`` to the end; ``on_step(step, metrics)`` after each."""

    def state_dict(self) -> dict:
        """Everything a resumed run needs."""

    def load_state_dict(self, blob: dict) -> None:
        """Inverse of ``state_dict`` (in place)."""


class StepLog(Protocol):
    """Somewhere per-step metrics go: ``add`` each logged step, ``flush`` after it."""

    def add(self, step: int, metrics: dict[str, float]) -> None: ...

    def flush(self) -> None: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a DDP wrapper (or the detector itself)."""
    return getattr(model, "module", model)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to FINAL_LR_FRACTION of each group's rate."""
    warmup = max(1, int(WARMUP_FRACTION * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The RoI sampler's generator for one (rank, step), so a resumed run samples the same.

    torchvision's RPN sampler draws from the global generator, so it is reseeded too.
    """
    step_seed = (seed * 7919 + rank) * 1_000_003 + step
    torch.manual_seed(step_seed)
    return torch.Generator().manual_seed(step_seed)


def view_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator of the student views of one (rank, step)'s batch. The batch loader draws
    them ahead of the step in another thread, so it never touches torch's global generator
    (which ``step_generator`` reseeds for the step itself)."""
    return torch.Generator().manual_seed(((seed * 7919 + rank) * 1_000_003 + step) ^ 0x5EED_F00D)


class MetricsLog:
    """Per-step metrics as JSON lines in one file, rewritten on each flush (local or s3://)."""

    def __init__(self, uri: str, resume_step: int) -> None:
        self.uri = uri
        old = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        self.rows = [row for row in map(json.loads, filter(None, old)) if row["step"] <= resume_step]

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})

    def flush(self) -> None:
        storage.write_text(self.uri, "".join(json.dumps(row) + "\n" for row in self.rows))
