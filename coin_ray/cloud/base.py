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


class DetectorBackend(Protocol):
    """A cloud (or self-hosted) detector: one image plus text prompts in, raw boxes out."""

    name: str

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """Detect ``prompts`` in one image.

        Args:
            image_bytes: the original encoded file (what a remote API is sent).
            image: the same image decoded, (H, W, 3) uint8 RGB.
            prompts: text prompts (one or more per category).
        """
        ...
