"""Stage 2, knowledge separation: consistent, inconsistent and private detections.

For one image, the cloud detections and the CLIP-detector detections are matched one to
one by IoU, a same-label partner preferred among a box's partners above the threshold
(``coin_ray.boxes.match_one_to_one``, cloud first). Then (paper, Sec. 3.3):

    consistent P^    matched pairs whose labels agree
    inconsistent P~  matched pairs whose labels differ (both probability vectors kept)
    private Q        cloud boxes that matched nothing, and CLIP-detector boxes that
                     matched nothing (each remembers its source)

A matched pair's box is the cloud box before burn-up and the score-weighted fusion of
both boxes after it (``coin_ray.boxes.fuse_boxes``).

Shapes (K categories, index K is background; all boxes xyxy in pixels of the frame the
inputs were given in, usually the original image):
    boxes (N, 4) float32, labels (N,) int64 in [0, K), scores (N,) float32,
    probs (N, K+1) float32.

This module is pure tensor code: no model, no Ray. ``SeparationStats`` counts the sets and,
given ground truth, how often each set's label is right (the diagnosis the paper's story
rests on: consistent labels should be the most reliable).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence, TypeVar

import torch

from coin_ray.boxes import MATCH_IOU_THRESHOLD, fuse_boxes, match_one_to_one, pairwise_iou

# A set box counts as "right" when it overlaps a ground-truth box of its label this much.
GT_MATCH_IOU = 0.5


_Boxes = TypeVar("_Boxes", bound="BoxTensors")


class BoxTensors:
    """Shared by the dataclasses below: one row per box in every field, ``boxes`` first."""

    boxes: torch.Tensor

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self: _Boxes, device: torch.device | str) -> _Boxes:
        """A copy with every field on ``device``."""
        return type(self)(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select(self: _Boxes, index: torch.Tensor) -> _Boxes:
        """The rows ``index`` (a bool mask or indices) of every field."""
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in fields(self)})



def concat(sets: Sequence[_Boxes]) -> _Boxes:
    """One set of the same kind holding the rows of every set in ``sets`` (at least one), in order."""
    return type(sets[0])(**{f.name: torch.cat([getattr(s, f.name) for s in sets]) for f in fields(sets[0])})


@dataclass
class SourceBoxes(BoxTensors):
    """Detections of one image from one source, as tensors (see module docstring)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor


def as_source(detections: Any, min_score: float = 0.0, num_classes: int | None = None) -> SourceBoxes:
    """Tensors from a ``schema.Detections`` record or a ``detect()`` output dict.

    Boxes whose score is below ``min_score`` are dropped (a low-confidence box is neither
    evidence of an object nor of a disagreement). An empty record read back from Parquet
    has probs of width 0: give ``num_classes`` (K) to shape them (0, K+1). The result lives
    on the CPU: separation is a few small tensor operations per image.
    """
    def get(key: str) -> torch.Tensor:
        value = detections[key] if isinstance(detections, dict) else getattr(detections, key)
        return torch.as_tensor(value).detach().cpu()

    boxes = torch.as_tensor(get("boxes"), dtype=torch.float32).reshape(-1, 4)
    probs = torch.as_tensor(get("probs"), dtype=torch.float32)
    if probs.dim() != 2:
        # A flat array: one row per box (an empty flat array cannot tell K: width 0).
        probs = probs.reshape(len(boxes), -1) if len(boxes) else probs.reshape(0, 0)
    if len(boxes) == 0 and num_classes is not None:
        probs = probs.reshape(0, num_classes + 1)
    src = SourceBoxes(boxes, torch.as_tensor(get("labels"), dtype=torch.int64).reshape(-1),
                      torch.as_tensor(get("scores"), dtype=torch.float32).reshape(-1), probs)
    return src.select(src.scores >= min_score)


@dataclass
class PairedSet(BoxTensors):
    """Matched (cloud, CLIP-det) pairs: the consistent or the inconsistent set (P pairs).

    ``boxes`` (P, 4) is the cloud box or the fused box; every other field is kept per
    source: labels (P,), scores (P,), probs (P, K+1). For the consistent set
    ``cloud_labels == clip_labels``.
    """

    boxes: torch.Tensor
    cloud_labels: torch.Tensor
    clip_labels: torch.Tensor
    cloud_scores: torch.Tensor
    clip_scores: torch.Tensor
    cloud_probs: torch.Tensor
    clip_probs: torch.Tensor


@dataclass
class PrivateSet(BoxTensors):
    """Boxes only one source found (Q boxes): boxes (Q, 4), labels (Q,), scores (Q,),
    probs (Q, K+1) of that source, and ``from_cloud`` (Q,) bool (False = CLIP detector)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    from_cloud: torch.Tensor


@dataclass
class Separation:
    """The three sets of one image."""

    consistent: PairedSet
    inconsistent: PairedSet
    private: PrivateSet


def _paired(cloud: SourceBoxes, clip: SourceBoxes, fuse: bool) -> PairedSet:
    boxes = fuse_boxes(cloud.boxes, cloud.scores, clip.boxes, clip.scores) if fuse else cloud.boxes
    return PairedSet(boxes.reshape(-1, 4), cloud.labels, clip.labels, cloud.scores, clip.scores,
                     cloud.probs, clip.probs)


def separate(cloud: SourceBoxes, clip_det: SourceBoxes, *,
             iou_threshold: float = MATCH_IOU_THRESHOLD, fuse: bool = False) -> Separation:
    """Split one image's detections into consistent, inconsistent and private sets.

    Args:
        cloud: the cloud detector's boxes (xyxy pixels), labels, scores, probs (N, K+1).
        clip_det: the CLIP detector's (teacher's) detections in the same frame, (M, ...).
        iou_threshold: a pair needs IoU >= this (``cfg.train.distill.match_iou``).
        fuse: False before burn-up (a matched pair takes the cloud box), True after it
            (score-weighted fusion of the two boxes).
    Returns:
        ``Separation``; every input box lands in exactly one set (a pair counts once).
    """
    pairs = match_one_to_one(cloud.boxes, clip_det.boxes, iou_threshold,
                             labels_a=cloud.labels, labels_b=clip_det.labels)
    ci, ji = pairs[:, 0], pairs[:, 1]
    cloud_m, clip_m = cloud.select(ci), clip_det.select(ji)
    same = cloud_m.labels == clip_m.labels
    consistent = _paired(cloud_m.select(same), clip_m.select(same), fuse)
    inconsistent = _paired(cloud_m.select(~same), clip_m.select(~same), fuse)

    cloud_free = torch.ones(len(cloud), dtype=torch.bool)
    cloud_free[ci] = False
    clip_free = torch.ones(len(clip_det), dtype=torch.bool)
    clip_free[ji] = False
    a, b = cloud.select(cloud_free), clip_det.select(clip_free)
    private = PrivateSet(torch.cat([a.boxes, b.boxes]).reshape(-1, 4), torch.cat([a.labels, b.labels]),
                         torch.cat([a.scores, b.scores]), _cat_probs(a.probs, b.probs),
                         torch.cat([torch.ones(len(a), dtype=torch.bool),
                                    torch.zeros(len(b), dtype=torch.bool)]))
    return Separation(consistent, inconsistent, private)


def admit_confident(sep: Separation, threshold: float) -> Separation:
    """Move the inconsistent pairs whose cloud probs are at least ``threshold`` sure of an
    object class into the consistent set, both labels set to that class.

    Meant for cloud records corrected by the sources' estimated confusions
    (``coin_ray.confusion.corrected_cloud``), whose probs are the posterior over the true
    class given the cloud's, CLIP's and the CLIP detector's labels: a disagreement that
    posterior has already settled is no disagreement. The other pairs stay inconsistent.
    """
    inc = sep.inconsistent
    if len(inc) == 0:
        return sep
    best, label = inc.cloud_probs.max(dim=1)
    admit = (best >= threshold) & (label < inc.cloud_probs.shape[1] - 1)
    if not bool(admit.any()):
        return sep
    moved = replace(inc.select(admit), cloud_labels=label[admit], clip_labels=label[admit])
    return Separation(concat([sep.consistent, moved]), inc.select(~admit), sep.private)


def _cat_probs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # An empty side may carry a (0, 0) probs tensor; keep the other side's width.
    width = max(a.shape[1], b.shape[1])
    return torch.cat([a.reshape(len(a), width), b.reshape(len(b), width)])


def label_right(boxes: torch.Tensor, labels: torch.Tensor, gt_boxes: torch.Tensor,
                 gt_labels: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the box overlaps (IoU >= GT_MATCH_IOU) a ground-truth box of its label."""
    iou = pairwise_iou(boxes, gt_boxes)
    if iou.numel() == 0:
        return torch.zeros(len(boxes), dtype=torch.bool)
    same = labels[:, None] == gt_labels[None, :]
    return ((iou >= GT_MATCH_IOU) & same).any(dim=1)


@dataclass
class SeparationStats:
    """Counts of each set over many images, and how often each set's label is right.

    ``counts[name]`` is the number of boxes; ``right[name]`` how many of them carry a
    correct label against ground truth (only counted for images given ground truth);
    ``by_class[name][label]`` the boxes of each label. Names: consistent,
    inconsistent_cloud / inconsistent_clip (the same boxes, judged by each source's
    label), private_cloud, private_clip; with fusion ``ds`` also "admitted" (inconsistent
    pairs moved into the consistent set, by the label they were given) and "relabelled"
    (cloud boxes whose label the estimated confusions changed, by their new label).
    """

    counts: dict[str, int] = field(default_factory=dict)
    judged: dict[str, int] = field(default_factory=dict)
    right: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, dict[int, int]] = field(default_factory=dict)  # set name -> label -> boxes

    def add(self, sep: Separation, gt_boxes: torch.Tensor | None = None,
            gt_labels: torch.Tensor | None = None) -> None:
        """Count one image's sets; with ``gt_boxes`` (G, 4) xyxy pixels and ``gt_labels``
        (G,), also count right labels."""
        p = sep.private
        groups = {
            "consistent": (sep.consistent.boxes, sep.consistent.cloud_labels),
            "inconsistent_cloud": (sep.inconsistent.boxes, sep.inconsistent.cloud_labels),
            "inconsistent_clip": (sep.inconsistent.boxes, sep.inconsistent.clip_labels),
            "private_cloud": (p.boxes[p.from_cloud], p.labels[p.from_cloud]),
            "private_clip": (p.boxes[~p.from_cloud], p.labels[~p.from_cloud]),
        }
        for name, (boxes, labels) in groups.items():
            self.count(name, labels)
            if gt_boxes is None or gt_labels is None:
                continue
            ok = label_right(boxes, labels, torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4),
                              torch.as_tensor(gt_labels, dtype=torch.int64).reshape(-1))
            self.judged[name] = self.judged.get(name, 0) + len(boxes)
            self.right[name] = self.right.get(name, 0) + int(ok.sum())

    def count(self, name: str, labels: torch.Tensor) -> None:
        """Add boxes with ``labels`` (B,) to set ``name``'s count, in total and per label."""
        self.counts[name] = self.counts.get(name, 0) + len(labels)
        per_label = self.by_class.setdefault(name, {})
        for label, n in zip(*torch.unique(labels.cpu(), return_counts=True)):
            per_label[int(label)] = per_label.get(int(label), 0) + int(n)

    def accuracy(self) -> dict[str, float]:
        """Fraction of judged boxes with a right label, per set name (NaN when none)."""
        return {k: (self.right.get(k, 0) / n if n else float("nan")) for k, n in self.judged.items()}

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "label_accuracy": self.accuracy(),
                "by_class": {name: {str(k): v for k, v in sorted(per.items())} for name, per in self.by_class.items()}}


@dataclass
class FusionStats:
    """What L_inc learns from, over many steps after burn-up (the paper's Table 6 diagnosis).

    ``pairs`` inconsistent pairs were fused; ``passed`` of them had max(fused) >= pi and so
    became L_inc targets; of the passed pairs on images with ground truth (``judged``),
    ``right`` had the fused argmax as their true label.
    """

    pairs: int = 0
    passed: int = 0
    judged: int = 0
    right: int = 0

    def add(self, fused: torch.Tensor, pi: float, boxes: list[torch.Tensor],
            gt: list[dict[str, torch.Tensor]] | None = None) -> None:
        """fused (P, K+1) over the batch's inconsistent pairs, image by image; ``boxes`` the
        pairs' boxes per image (xyxy pixels, the frame of ``gt``); ``gt`` per image
        {"boxes" (G, 4), "labels" (G,)} or None."""
        keep = (fused.detach().max(dim=1).values >= pi).cpu()
        self.pairs += len(fused)
        self.passed += int(keep.sum())
        if not gt:
            return
        labels = fused.detach().argmax(dim=1).cpu()
        for rows, image_boxes, truth in zip(torch.arange(len(fused)).split([len(b) for b in boxes]), boxes, gt):
            if not truth:
                continue
            picked = keep[rows]
            ok = label_right(image_boxes.cpu()[picked], labels[rows][picked],
                             torch.as_tensor(truth["boxes"], dtype=torch.float32).reshape(-1, 4),
                             torch.as_tensor(truth["labels"], dtype=torch.int64).reshape(-1))
            self.judged += int(picked.sum())
            self.right += int(ok.sum())

    def summary(self) -> dict[str, Any]:
        """Counts, the fraction passing pi and the fraction of judged passed pairs that are right."""
        return {"pairs": self.pairs, "passed": self.passed, "judged": self.judged, "right": self.right,
                "pass_rate": self.passed / self.pairs if self.pairs else float("nan"),
                "right_rate": self.right / self.judged if self.judged else float("nan")}
