"""The target detector's forward pass in knowledge distillation (one call, so DDP sees it).

The student is an ``OpenVocabularyRCNN``. ``DistillStudent.forward`` takes the images and
their separations and runs the detector once over everything the losses need:

    proposals   RPN proposals (targets: every matched box, consistent or inconsistent,
                and with ``private_objectness`` the cloud's private boxes too),
                minus those sitting on an inconsistent or private box, assigned to the
                consistent boxes (+ background) and sampled: L_con
    consistent  the consistent boxes themselves: the CKG's supervision (g^, KL to l^)
    inconsistent  the inconsistent boxes: L_inc, the CKG's g~
    private     the private boxes: L_pri

Shapes: R_* rows per kind over the batch; outputs are ``RegionOutputs`` (embeddings (R,D)
normalised, logits (R,K+1), box_deltas (R,4)); ``*_inputs`` (R,C) are the inputs of the
aligned region projection MLP ``roi_heads.box_head.projection_mlp()`` (captured by a
forward hook on its first layer during the one region pass, so the CKG can re-apply that
MLP alone). Set boxes arrive in original-image
pixels and are resized with the images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torchvision.ops import box_iou

from coin_ray.models.rcnn import RegionDetector
from coin_ray.models.roi_heads import BG_IOU_THRESHOLD, RegionOutputs, RegionTargets, assign_targets
from coin_ray.separate import Separation

KINDS = ("proposals", "consistent", "inconsistent", "private")


@dataclass
class StudentPass:
    """Everything one distillation step needs from the student (see module docstring)."""

    rpn_losses: dict[str, torch.Tensor]
    regions: RegionTargets
    proposals: RegionOutputs
    consistent: RegionOutputs
    inconsistent: RegionOutputs
    private: RegionOutputs
    consistent_inputs: torch.Tensor
    inconsistent_inputs: torch.Tensor
    text_embeddings: torch.Tensor


@contextlib.contextmanager
def capture_input(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the first positional input of every call to ``layer`` inside the block."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def drop_uncertain(proposals: torch.Tensor, consistent: torch.Tensor,
                   uncertain: torch.Tensor) -> torch.Tensor:
    """Proposals (P,4) minus those closer to an inconsistent/private box than to a consistent one.

    Such a proposal covers an object the sources disagree on (or only one source saw);
    calling it background in L_con would teach the student to miss it. All boxes xyxy in
    the same frame; a proposal goes when its IoU with an uncertain box is >= the background
    threshold and higher than its IoU with every consistent box.
    """
    if len(uncertain) == 0 or len(proposals) == 0:
        return proposals
    worst = box_iou(proposals, uncertain).max(dim=1).values
    best = box_iou(proposals, consistent).max(dim=1).values if len(consistent) else torch.zeros_like(worst)
    return proposals[~((worst >= BG_IOU_THRESHOLD) & (worst > best))]


def _set_boxes(sep: Separation, device: torch.device) -> dict[str, torch.Tensor]:
    boxes = torch.cat([sep.consistent.boxes, sep.inconsistent.boxes, sep.private.boxes]).reshape(-1, 4)
    return {"boxes": boxes.to(device)}


class DistillStudent(nn.Module):
    """Wraps the student detector; ``forward`` is the distillation pass (``detector`` holds it)."""

    def __init__(self, detector: RegionDetector, private_objectness: bool = True) -> None:
        super().__init__()
        self.detector = detector
        self.private_objectness = private_objectness

    def forward(self, images: list[torch.Tensor], separations: list[Separation],
                generator: torch.Generator | None = None) -> StudentPass:
        """images: (3,H,W) in [0,1]; separations: one per image, boxes in original pixels."""
        det = self.detector
        device = images[0].device
        features, image_list, resized = det.encode(images, [_set_boxes(s, device) for s in separations])
        counts = [(len(s.consistent), len(s.inconsistent), len(s.private)) for s in separations]
        split = [r["boxes"].split(c) for r, c in zip(resized, counts)]  # per image: cons, inc, priv
        rpn_targets = [{"boxes": torch.cat([c, i, *self._private_objects(q, s)])}
                       for (c, i, q), s in zip(split, separations)]
        proposals, rpn_losses = det.propose(features, image_list, rpn_targets)
        proposals = [drop_uncertain(p.detach(), c, torch.cat([i, q])) for p, (c, i, q) in zip(proposals, split)]
        cons_targets = [{"boxes": c, "labels": s.consistent.cloud_labels.to(device)}
                        for (c, _, _), s in zip(split, separations)]
        regions = assign_targets(proposals, cons_targets, det.num_classes, det.roi_heads.box_coder, generator)
        t = det.text_embeddings()
        boxes = [torch.cat([r, *parts]) for r, parts in zip(regions.proposals, split)]
        with capture_input(det.roi_heads.box_head.projection_mlp()[0]) as seen:
            outputs = det.region_outputs(features, boxes, image_list.image_sizes, t, image_list.tensors)
        rows = [[len(r), *c] for r, c in zip(regions.proposals, counts)]
        kinds = _split_by_kind(outputs, torch.cat(seen), rows)
        return StudentPass(rpn_losses, regions, kinds["proposals"][0], kinds["consistent"][0],
                           kinds["inconsistent"][0], kinds["private"][0], kinds["consistent"][1],
                           kinds["inconsistent"][1], t)

    def _private_objects(self, private_boxes: torch.Tensor, sep: Separation) -> list[torch.Tensor]:
        """The cloud's private boxes (resized frame) when they count as objects for the RPN."""
        if not self.private_objectness:
            return []
        return [private_boxes[sep.private.from_cloud.to(private_boxes.device)]]


def _split_by_kind(outputs: RegionOutputs, layer_inputs: torch.Tensor, rows: list[list[int]]
                   ) -> dict[str, tuple[RegionOutputs, torch.Tensor]]:
    """Regroup rows ordered image by image ([proposals, cons, inc, priv] each) by kind."""
    kind_of = torch.cat([torch.full((n,), k, dtype=torch.int64) for per_image in rows
                         for k, n in enumerate(per_image)]).to(outputs.logits.device)
    result = {}
    for k, name in enumerate(KINDS):
        pick = kind_of == k
        result[name] = (RegionOutputs(outputs.embeddings[pick], outputs.logits[pick],
                                      outputs.box_deltas[pick]), layer_inputs[pick])
    return result
