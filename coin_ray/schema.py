"""The one record that crosses every stage boundary: detections of one image.

Shapes (N detections, K categories, index K is background):
    boxes   (N, 4) float32, xyxy in pixels of the original image
    labels  (N,)   int64 in [0, K)
    scores  (N,)   float32 in [0, 1]
    probs   (N, K+1) float32, rows sum to 1 (background last)

A record with a non-empty ``error`` is an error record: the image could not be read or
the backend failed for it; its arrays are empty and the reason is kept, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

# Source names used across the pipeline (the paper's Table 1 rows plus the raw sets).
SOURCE_CLOUD = "cloud"
SOURCE_CLIP = "clip"  # cloud boxes re-classified by CLIP crops (paper's "CLIP" row)
SOURCE_CLIP_DET = "clip_det"  # the pre-trained CLIP detector
SOURCE_COIN = "coin"  # the distilled target detector

DETECTION_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("labels", pa.list_(pa.int64()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
        pa.field("probs", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)


@dataclass
class Detections:
    """Detections of one image from one source (see the module docstring for shapes)."""

    image_id: str
    uri: str
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    source: str
    error: str = ""

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        n = len(self.boxes)
        probs = np.asarray(self.probs, dtype=np.float32)
        self.probs = probs.reshape(n, -1) if probs.size else probs.reshape(n, 0)
        if not (len(self.labels) == len(self.scores) == n == len(self.probs)):
            raise ValueError(
                f"image {self.image_id!r}: boxes {self.boxes.shape}, labels {self.labels.shape}, "
                f"scores {self.scores.shape} and probs {self.probs.shape} disagree on N"
            )

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def empty(cls, image_id: str, uri: str, width: int, height: int, source: str,
              num_classes: int, error: str = "") -> "Detections":
        """A record with no boxes (probs shaped (0, num_classes + 1))."""
        return cls(image_id, uri, width, height, np.zeros((0, 4), np.float32),
                   np.zeros(0, np.int64), np.zeros(0, np.float32),
                   np.zeros((0, num_classes + 1), np.float32), source, error)

    @classmethod
    def from_class_only(cls, image_id: str, uri: str, width: int, height: int,
                        boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                        num_classes: int, source: str) -> "Detections":
        """Build a record from a backend that returns only label and score per box."""
        probs = class_only_probs(np.asarray(labels), np.asarray(scores), num_classes)
        return cls(image_id, uri, width, height, boxes, labels, scores, probs, source)

    def to_row(self) -> dict[str, Any]:
        """A plain dict matching DETECTION_SCHEMA (lists, not arrays)."""
        return {
            "image_id": self.image_id, "uri": self.uri,
            "width": int(self.width), "height": int(self.height),
            "boxes": self.boxes.tolist(), "labels": self.labels.tolist(),
            "scores": self.scores.tolist(), "probs": self.probs.tolist(),
            "source": self.source, "error": self.error,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Detections":
        """Inverse of ``to_row``; accepts lists, numpy object arrays or nested arrays."""
        boxes = _stack(row["boxes"], 4)
        probs = row["probs"]
        width = len(probs[0]) if len(probs) else 0
        return cls(str(row["image_id"]), str(row["uri"]), int(row["width"]), int(row["height"]),
                   boxes, np.asarray(row["labels"], np.int64),
                   np.asarray(row["scores"], np.float32), _stack(probs, width),
                   str(row["source"]), str(row.get("error") or ""))


def _stack(rows: Any, width: int) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros((0, width), np.float32)
    return np.stack([np.asarray(r, np.float32) for r in rows]).reshape(len(rows), -1)


def class_only_probs(labels: np.ndarray, scores: np.ndarray, num_classes: int) -> np.ndarray:
    """K+1 probabilities from (label, score) pairs, the rule of DESIGN.md section 2.

    probs[label] = score; the other K-1 foreground entries share (1 - score) equally;
    background (index K) is 0. With K == 1 the single entry is the score.

    Args:
        labels: (N,) int in [0, K).
        scores: (N,) float in [0, 1].
        num_classes: K.
    Returns:
        (N, K+1) float32.
    """
    labels = np.asarray(labels, np.int64).reshape(-1)
    scores = np.clip(np.asarray(scores, np.float32).reshape(-1), 0.0, 1.0)
    n = len(labels)
    probs = np.zeros((n, num_classes + 1), np.float32)
    if n == 0:
        return probs
    if num_classes > 1:
        probs[:, :num_classes] = ((1.0 - scores) / (num_classes - 1))[:, None]
    probs[np.arange(n), labels] = scores
    return probs


def records_to_table(records: Iterable[Detections]) -> pa.Table:
    """An Arrow table in DETECTION_SCHEMA."""
    rows = [r.to_row() for r in records]
    return pa.Table.from_pylist(rows, schema=DETECTION_SCHEMA)


def table_to_records(table: pa.Table) -> list[Detections]:
    """Inverse of ``records_to_table``."""
    return [Detections.from_row(row) for row in table.to_pylist()]


@dataclass
class ImageRecord:
    """One decoded input image or the reason it could not be decoded.

    ``image`` is (H, W, 3) uint8 RGB with EXIF orientation applied, or None when ``error``.
    """

    image_id: str
    uri: str
    image: np.ndarray | None
    error: str = ""
    width: int = 0
    height: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error
