"""The EMA teacher of knowledge distillation.

The teacher starts as the disseminated CLIP detector and detects on every training batch
(its detections are the "CLIP det" side of the separation). Before the burn-up step it is
frozen; after it, every step moves it toward the student:

    theta_teacher <- keep_rate * theta_teacher + (1 - keep_rate) * theta_student

for every floating-point parameter and buffer (the prototypes included); integer buffers
are copied. The teacher is a plain module, never wrapped in DDP: under DDP pass the
student's ``.module``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode (no parameter requires grad)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float) -> None:
    """Move ``teacher`` toward ``student`` by ``1 - keep_rate`` (same architecture).

    Raises ``KeyError`` if the two state dicts do not hold the same entries.
    """
    if not 0.0 <= keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be in [0, 1], got {keep_rate}")
    student_state = student.state_dict()
    teacher_state = teacher.state_dict()
    missing = set(teacher_state) ^ set(student_state)
    if missing:
        raise KeyError(f"teacher and student differ in entries: {sorted(missing)[:5]}")
    seen: set[int] = set()
    for name, value in teacher_state.items():
        # A tensor shared by two modules (the trunk and a crop head share CLIP's tower)
        # appears under both names: move it once.
        if value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        source = student_state[name].detach()
        if value.is_floating_point():
            value.mul_(keep_rate).add_(source.to(value.dtype), alpha=1.0 - keep_rate)
        else:
            value.copy_(source)
