"""Do the two sources know different things? Per-class agreement of their labels on cloud boxes.

Among the cloud boxes that hit a ground-truth object (IoU >= ``iou`` with a non-ignored box;
the true class is that of the best-overlapping one), each box falls in one of four outcomes:
CLIP right and cloud wrong, cloud right and CLIP wrong, both right, both wrong. "CLIP" is
either the CLIP record of the collection (the same boxes, ``aligned=True``: its label is the
argmax over K+1, so calling an object background is wrong) or a detector's record such as
the CLIP detector's (``aligned=False``: its label on a cloud box is that of its best box with
IoU >= ``iou``; no such box is wrong). The first two outcomes bound what any fusion of the
two can gain over either source alone.
"""

from __future__ import annotations

import numpy as np
import torch

from coin_ray.boxes import pairwise_iou
from coin_ray.data.datasets import GroundTruth, LabelledSplit
from coin_ray.schema import Detections

OUTCOMES = ("clip_right_cloud_wrong", "cloud_right_clip_wrong", "both_right", "both_wrong")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return pairwise_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def hit_labels(gt: GroundTruth, boxes: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """(N,) int64: the class of the best-overlapping non-ignored object of each xyxy box, or -1 (no hit)."""
    keep = ~np.asarray(gt.ignore, bool) if len(gt.ignore) else np.ones(len(gt.boxes), bool)
    overlap = _iou(boxes, gt.boxes[keep])
    if overlap.shape[1] == 0:
        return np.full(len(boxes), -1, np.int64)
    best = overlap.argmax(1)
    return np.where(overlap.max(1) >= iou, gt.labels[keep][best], -1).astype(np.int64)


def other_labels(cloud: Detections, other: Detections, aligned: bool, iou: float = 0.5) -> np.ndarray:
    """(N,) the other source's label on each cloud box; K means background or no box (see module doc)."""
    k = cloud.probs.shape[1] - 1
    if aligned:
        if len(other) != len(cloud):
            raise ValueError(f"image {cloud.uri}: {len(other)} CLIP boxes for {len(cloud)} cloud boxes")
        return other.probs.argmax(1) if len(other) else np.zeros(0, np.int64)
    overlap = _iou(cloud.boxes, other.boxes)
    if overlap.shape[1] == 0:
        return np.full(len(cloud), k, np.int64)
    best = overlap.argmax(1)
    return np.where(overlap.max(1) >= iou, other.labels[best], k).astype(np.int64)


def agreement_table(split: LabelledSplit, cloud: list[Detections], other: list[Detections], *,
                    aligned: bool = True, iou: float = 0.5, min_score: float = 0.0) -> dict[str, dict[str, int]]:
    """{class name | "all": {outcome: count}} over the split's images (see the module doc).

    Cloud boxes scoring below ``min_score`` are left out; images without a record in both
    sources are skipped.
    """
    table = {name: dict.fromkeys(OUTCOMES, 0) for name in [*split.categories, "all"]}
    by_uri_cloud, by_uri_other = {r.uri: r for r in cloud if r.ok}, {r.uri: r for r in other if r.ok}
    for gt in split.items:
        if gt.uri not in by_uri_cloud or gt.uri not in by_uri_other:
            continue
        c = by_uri_cloud[gt.uri]
        truth = hit_labels(gt, c.boxes, iou)
        theirs = other_labels(c, by_uri_other[gt.uri], aligned, iou)
        for t, mine, yours, score in zip(truth, c.labels, theirs, c.scores):
            if t < 0 or score < min_score:
                continue
            outcome = OUTCOMES[{(False, True): 0, (True, False): 1, (True, True): 2, (False, False): 3}
                               [(bool(mine == t), bool(yours == t))]]
            table[split.categories[t]][outcome] += 1
            table["all"][outcome] += 1
    return table


def background_rates(split: LabelledSplit, cloud: list[Detections], clip: list[Detections],
                     iou: float = 0.5) -> dict[str, float]:
    """Fractions of cloud boxes the aligned CLIP record calls background: on junk boxes (hit no
    object) and on boxes that hit one, with the box counts."""
    by_clip = {r.uri: r for r in clip if r.ok}
    junk = hit = junk_bg = hit_bg = 0
    for gt in split.items:
        c = next((r for r in cloud if r.uri == gt.uri and r.ok), None)
        if c is None or gt.uri not in by_clip or len(c) == 0:
            continue
        background = by_clip[gt.uri].probs.argmax(1) == c.probs.shape[1] - 1
        hits = hit_labels(gt, c.boxes, iou) >= 0
        junk, hit = junk + int((~hits).sum()), hit + int(hits.sum())
        junk_bg, hit_bg = junk_bg + int((background & ~hits).sum()), hit_bg + int((background & hits).sum())
    return {"junk_boxes": junk, "junk_called_background": junk_bg / max(junk, 1),
            "object_boxes": hit, "objects_called_background": hit_bg / max(hit, 1)}


def table_markdown(table: dict[str, dict[str, int]], title: str = "CLIP") -> str:
    """The table as Markdown: one row per class (and "all"), one column per outcome."""
    head = [f"{title} right, cloud wrong", f"cloud right, {title} wrong", "both right", "both wrong"]
    lines = ["| class | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(str(row[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines)
