"""The interface every cloud detector backend implements, and its raw answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class CloudAnswer:
    """What a backend said about one image, before phrases are mapped to categories.

    boxes:   (N, 4) float32, xyxy in pixels of the image as given to ``detect``
    phrases: N label strings as the backend names them ("car", "Traffic light", ...)
    scores:  (N,) float32 in [0, 1]
    probs:   (N, K+1) float32 in the run's category order (background last), only from
             backends that return full class distributions; None for class-only backends.
    """

    boxes: np.ndarray
    phrases: list[str]
    scores: np.ndarray
    probs: np.ndarray | None = None


def at_least(answer: CloudAnswer, threshold: float) -> CloudAnswer:
    """``answer`` without its boxes scoring below ``threshold`` (a request's minimum score;
    a box scoring exactly ``threshold`` stays)."""
    scores = np.asarray(answer.scores, np.float32).reshape(-1)
    # Compared in float32, as the scores travel: a box sent at 0.25 must not fall to rounding.
    keep = scores >= np.float32(threshold)
    if keep.all():
        return answer
    probs = None if answer.probs is None else np.asarray(answer.probs)[keep]
    return CloudAnswer(np.asarray(answer.boxes, np.float32).reshape(-1, 4)[keep],
                       [p for p, k in zip(answer.phrases, keep) if k], scores[keep], probs)


def request_threshold(value: float | None) -> float:
    """The minimum score a request asks for (absent: 0, every box); ValueError outside [0, 1]."""
    threshold = 0.0 if value is None else float(value)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold:g} is outside [0, 1]")
    return threshold


class DetectorBackend(Protocol):
    """A cloud (or self-hosted) detector: one image plus text prompts in, raw boxes out."""

    name: str

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """Detect ``prompts`` in one image.

        Args:
            image_bytes: the original encoded file (``imageio.upload_bytes`` turns it into
                what a remote API is sent: the file, or a re-encoding of ``image``).
            image: the same image decoded, (H, W, 3) uint8 RGB, EXIF orientation applied:
                the frame every returned box is in.
            prompts: text prompts (one or more per category).
        """
        ...


class TaskBackend(DetectorBackend, Protocol):
    """A backend whose service answers through a task: create it (the paid call), then poll.

    The client keeps the task's handle in the cache while it runs, so a timeout, a retry or
    a killed run polls the same task instead of paying for a new one.
    """

    def create_task(self, image_bytes: bytes, image: np.ndarray, prompts: list[str],
                    idempotency_key: str) -> dict:
        """Create the task; returns a JSON-serialisable handle (task id, box scale, ...).

        ``idempotency_key`` is the same for every retry of one creation, so a service that
        honours it never runs (or bills) a retried creation twice.
        """
        ...

    def poll_task(self, handle: dict, image: np.ndarray) -> CloudAnswer:
        """Poll until done (under the backend's deadline); boxes in pixels of ``image``.

        Raises:
            TransientError: not finished within the deadline, or a flaky status call.
            TaskFailed: the service says the task failed. TaskGone: it no longer knows it.
        """
        ...


def is_task_backend(backend: DetectorBackend) -> bool:
    return callable(getattr(backend, "create_task", None)) and callable(
        getattr(backend, "poll_task", None))
