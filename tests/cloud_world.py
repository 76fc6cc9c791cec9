"""Shared by the tests/test_cloud_*.py files: tiny images and a deterministic real backend.

``ColourBoxes`` is a genuine (if simple) detector: it finds the bounding box of every
pure-coloured blob of a known colour and names it; images are black with coloured
rectangles, so its answers are exactly checkable.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from coin_ray.cloud.base import CloudAnswer

COLOURS = {"car": (255, 0, 0), "bus": (0, 0, 255), "tree": (0, 255, 0)}  # tree: no category
CATEGORIES = ["car", "bus"]


class ColourBoxes:
    """Detect red 'car', blue 'bus' and green 'tree' rectangles (one box per colour)."""

    name = "colour-boxes"

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        boxes, phrases = [], []
        for phrase, rgb in COLOURS.items():
            ys, xs = np.nonzero(np.all(image == np.asarray(rgb, np.uint8), axis=-1))
            if len(xs):
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                phrases.append(phrase)
        return CloudAnswer(np.asarray(boxes, np.float32).reshape(-1, 4), phrases,
                           np.full(len(phrases), 0.9, np.float32))


def draw(seed: int, size: tuple[int, int] = (24, 32), with_tree: bool = True) -> tuple[np.ndarray, dict]:
    """A black (H, W, 3) uint8 image with one rectangle per colour; returns boxes by phrase."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    truth = {}
    for i, (phrase, rgb) in enumerate(COLOURS.items()):
        if phrase == "tree" and not with_tree:
            continue
        x1, y1 = int(rng.integers(0, w - 6)), int(rng.integers(0, h - 6))
        x2, y2 = x1 + int(rng.integers(2, 6)), y1 + int(rng.integers(2, 6))
        if i:  # keep rectangles apart: later colours go on the right half when they overlap
            image_region = image[y1:y2, x1:x2]
            if image_region.any():
                continue
        image[y1:y2, x1:x2] = rgb
        truth[phrase] = [x1, y1, x2, y2]
    return image, truth


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path, n: int, size: tuple[int, int] = (24, 32)) -> list[str]:
    """n distinct PNG files in ``folder``; returns their paths (sorted)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image, _ = draw(i, size)
        image[0, 0] = (i % 251, i // 251, 7)  # a unique pixel: distinct bytes, distinct cache keys
        path = folder / f"img_{i:04d}.png"
        path.write_bytes(png_bytes(image))
        out.append(str(path))
    return out
