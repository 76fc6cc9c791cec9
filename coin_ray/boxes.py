"""Box maths shared by every stage: IoU, one-to-one matching, score-weighted fusion.

All boxes are xyxy in pixels, float tensors of shape (N, 4).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

MATCH_IOU_THRESHOLD = 0.5


def pairwise_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of every box in ``boxes_a`` (N, 4) with every box in ``boxes_b`` (M, 4): (N, M).

    Empty inputs give an empty (N, M) matrix instead of raising.
    """
    if len(boxes_a) == 0 or len(boxes_b) == 0:
        return torch.zeros((len(boxes_a), len(boxes_b)), dtype=torch.float32)
    return box_iou(boxes_a.float(), boxes_b.float())


def match_one_to_one(boxes_a: torch.Tensor, boxes_b: torch.Tensor,
                     iou_threshold: float = MATCH_IOU_THRESHOLD, *,
                     labels_a: torch.Tensor | None = None, labels_b: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """Greedy one-to-one matching by IoU, highest IoU first, same-label partners first.

    Each box of either side is used at most once; a pair needs IoU >= ``iou_threshold``.
    Given labels, every same-label pair above the threshold is matched (highest IoU first)
    before any pair whose labels differ: detectors emit per-class duplicates of one box
    (car 0.8 / truck 0.35), and pairing by IoU alone would make a disagreement out of the
    duplicate and push the agreeing box into the private set. Ties are broken by the lower
    index in ``boxes_a`` then in ``boxes_b``, so the result is deterministic.

    Args:
        boxes_a: (N, 4) xyxy pixels (the cloud detections in separation).
        boxes_b: (M, 4) xyxy pixels (the CLIP-detector detections).
        labels_a, labels_b: optional (N,) and (M,) int64 class indices (both or neither).
    Returns:
        (P, 2) int64 tensor of matched index pairs (i in a, j in b), sorted by i.
    """
    iou = pairwise_iou(boxes_a, boxes_b)
    if iou.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.int64)
    if (labels_a is None) != (labels_b is None):
        raise ValueError("give labels for both sides or for neither")
    n, m = iou.shape
    same = (torch.ones_like(iou, dtype=torch.bool) if labels_a is None
            else labels_a.reshape(-1, 1).cpu() == labels_b.reshape(1, -1).cpu())
    used_a = torch.zeros(n, dtype=torch.bool)
    used_b = torch.zeros(m, dtype=torch.bool)
    pairs: list[tuple[int, int]] = []
    for allowed in (same, ~same):
        flat = iou.masked_fill(~allowed, -1.0).flatten()
        # Stable sort on negated IoU keeps row-major (i, then j) order among equal IoUs.
        for k in torch.sort(-flat, stable=True).indices.tolist():
            if flat[k] < iou_threshold:
                break
            i, j = divmod(k, m)
            if used_a[i] or used_b[j]:
                continue
            used_a[i] = used_b[j] = True
            pairs.append((i, j))
    pairs.sort()
    return torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)


def fuse_boxes(boxes_a: torch.Tensor, scores_a: torch.Tensor,
               boxes_b: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """Score-weighted fusion of paired boxes, whatever their labels.

    fused = (s_a * b_a + s_b * b_b) / (s_a + s_b); a pair whose scores are both 0 gets
    the plain average.

    Args:
        boxes_a, boxes_b: (P, 4) xyxy pixels, row p of each forming one pair.
        scores_a, scores_b: (P,) scores in [0, 1].
    Returns:
        (P, 4) fused boxes.
    """
    if boxes_a.shape != boxes_b.shape:
        raise ValueError(f"paired boxes differ in shape: {tuple(boxes_a.shape)} vs {tuple(boxes_b.shape)}")
    wa = scores_a.float().clamp(min=0)[:, None]
    wb = scores_b.float().clamp(min=0)[:, None]
    total = wa + wb
    zero = total <= 0
    wa = torch.where(zero, torch.full_like(wa, 0.5), wa)
    wb = torch.where(zero, torch.full_like(wb, 0.5), wb)
    total = torch.where(zero, torch.ones_like(total), total)
    return (wa * boxes_a.float() + wb * boxes_b.float()) / total
