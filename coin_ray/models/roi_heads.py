"""The open-vocabulary region head and its Fast R-CNN style target assignment and loss.

Shapes (R regions over the batch, K categories, index K is background, C the vision width,
D the joint width). Boxes here are xyxy in pixels of the *resized* images (the frame the
detector's transform produces), never of the original images.

    RegionOutputs   embeddings (R,D) L2-normalised, logits (R,K+1), box_deltas (R,4)
    RegionTargets   proposals (per image), labels (R,) in [0,K], probs (R,K+1), regression (R,4)

Classification is the cosine similarity of a region's embedding with the K+1 text
embeddings times a learned scale (exp of a log-scale, clamped like CLIP's); box regression
is class-agnostic, from all of the head's output tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from coin_ray.models.clip_backbone import ClipCropHead, ClipRegionHead, crop_regions
from coin_ray.models.roi_align import roi_align_rows

FG_IOU_THRESHOLD = 0.5  # a proposal with IoU >= this to a target box is foreground
BG_IOU_THRESHOLD = 0.5  # below this it is background
REGIONS_PER_IMAGE = 64  # proposals sampled per image for the RoI loss
POSITIVE_FRACTION = 0.25
BOX_CODER_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's Fast R-CNN weights
NMS_THRESHOLD = 0.5
MIN_BOX_SIZE = 1e-2
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


@dataclass
class RegionOutputs:
    """Per-region outputs: embeddings (R,D) L2-normalised, logits (R,K+1), box_deltas (R,4)."""

    embeddings: torch.Tensor
    logits: torch.Tensor
    box_deltas: torch.Tensor


@dataclass
class RegionTargets:
    """Sampled proposals and their targets (see the module docstring for shapes).

    ``proposals`` holds one (R_i,4) tensor per image; the other fields are concatenated in
    the same order. Background rows have label K, probs one-hot at K and zero regression.
    """

    proposals: list[torch.Tensor]
    labels: torch.Tensor
    probs: torch.Tensor
    regression: torch.Tensor

    @property
    def foreground(self) -> torch.Tensor:
        """(R,) bool: rows assigned to a target box."""
        return self.labels < self.probs.shape[1] - 1


def pool_regions(features: torch.Tensor, boxes: list[torch.Tensor], output_size: int,
                 stride: int) -> torch.Tensor:
    """RoIAlign of a (B,C,h,w) feature map at stride ``stride``: (R, s*s, C) region tokens.

    One sample per bin (torchvision's ``sampling_ratio=1``, aligned), through
    ``roi_align_rows``: the same values, a several times faster backward on CPU.
    """
    pooled = roi_align_rows(features, boxes, output_size, spatial_scale=1.0 / stride)
    return pooled.flatten(2).transpose(1, 2)


class ClipRoIHeads(nn.Module):
    """Region head (``box_head``, last layer ``box_head.proj``), cosine classifier, box regressor."""

    def __init__(self, box_head: ClipRegionHead | ClipCropHead | nn.Module, *, stride: int, roi_size: int,
                 logit_scale: float) -> None:
        super().__init__()
        self.box_head = box_head
        self.box_predictor = nn.Linear(box_head.box_feature_size(roi_size), 4)
        nn.init.normal_(self.box_predictor.weight, std=0.001)
        nn.init.zeros_(self.box_predictor.bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.box_coder = det_utils.BoxCoder(BOX_CODER_WEIGHTS)
        self.stride = stride
        self.roi_size = roi_size

    @property
    def uses_crops(self) -> bool:
        """True when regions are embedded from their own pixels (``ClipCropHead``)."""
        return isinstance(self.box_head, ClipCropHead)

    def embed(self, tokens: torch.Tensor, pixels: torch.Tensor | None,
              rois: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The box head on RoI tokens (R,s*s,C), and on the regions' crops of ``pixels`` when it
        embeds crops: (box features, embeddings (R,D) unnormalised). ``rois`` as for
        ``crop_regions``."""
        if not self.uses_crops:
            return self.box_head(tokens)
        if pixels is None:
            raise ValueError("this region head embeds crops: pass the transformed pixels")
        return self.box_head(tokens, crop_regions(pixels, rois, self.box_head.crop_size))

    def forward(self, features: torch.Tensor, boxes: list[torch.Tensor],
                text_embeddings: torch.Tensor, pixels: torch.Tensor | None = None) -> RegionOutputs:
        """features (B,C,h,w); boxes per image (R_i,4) resized-image pixels; t (K+1,D) normalised;
        pixels (B,3,H,W): the transformed batch, needed when ``uses_crops``."""
        tokens = pool_regions(features, boxes, self.roi_size, self.stride)
        box_features, embeddings = self.embed(tokens, pixels, boxes)
        embeddings = F.normalize(embeddings, dim=-1)
        scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits = scale * embeddings @ text_embeddings.to(embeddings.dtype).t()
        return RegionOutputs(embeddings, logits, self.box_predictor(box_features))


def sample_regions(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None,
                   batch: int = REGIONS_PER_IMAGE, positive_fraction: float = POSITIVE_FRACTION
                   ) -> torch.Tensor:
    """Indices of a balanced sample: at most ``batch*fraction`` foreground, rest background.

    labels (P,) in [0,K] or -1 (ignored); returns (S,) int64 indices, sorted.
    """
    fg = torch.nonzero((labels >= 0) & (labels < num_classes)).flatten()
    bg = torch.nonzero(labels == num_classes).flatten()
    n_fg = min(len(fg), int(batch * positive_fraction))
    n_bg = min(len(bg), batch - n_fg)
    fg = fg[torch.randperm(len(fg), generator=generator)[:n_fg].to(fg.device)]
    bg = bg[torch.randperm(len(bg), generator=generator)[:n_bg].to(bg.device)]
    return torch.cat([fg, bg]).sort().values


def assign_targets(proposals: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                   num_classes: int, box_coder: det_utils.BoxCoder,
                   generator: torch.Generator | None = None) -> RegionTargets:
    """Match proposals (+ the target boxes themselves) to targets and sample a balanced set.

    Args:
        proposals: per image (P_i,4) xyxy, resized-image pixels.
        targets: per image {"boxes": (N_i,4) same frame, "labels": (N_i,) in [0,K),
            "probs" (optional): (N_i,K+1) soft targets; one-hot of labels when absent}.
        num_classes: K.
    """
    matcher = det_utils.Matcher(FG_IOU_THRESHOLD, BG_IOU_THRESHOLD, allow_low_quality_matches=False)
    kept, labels, probs, regression = [], [], [], []
    for props, target in zip(proposals, targets):
        gt_boxes = target["boxes"].to(props)
        gt_probs = target_probs(target, num_classes).to(props)
        props = torch.cat([props.detach(), gt_boxes])
        if len(gt_boxes) == 0:
            matched = torch.full((len(props),), -1, dtype=torch.long, device=props.device)
        else:
            matched = matcher(box_iou(gt_boxes, props))
        label = torch.full_like(matched, num_classes)
        label[matched == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
        fg = matched >= 0
        label[fg] = target["labels"].to(matched.device)[matched[fg]]
        index = sample_regions(label, num_classes, generator)
        props, label, matched = props[index], label[index], matched[index]
        fg = matched >= 0
        row_probs = F.one_hot(label, num_classes + 1).to(props.dtype)
        row_probs[fg] = gt_probs[matched[fg]]
        deltas = torch.zeros_like(props)
        if bool(fg.any()):
            deltas[fg] = box_coder.encode_single(gt_boxes[matched[fg]], props[fg])
        kept.append(props)
        labels.append(label)
        probs.append(row_probs)
        regression.append(deltas)
    return RegionTargets(kept, torch.cat(labels), torch.cat(probs), torch.cat(regression))


def target_probs(target: dict[str, torch.Tensor], num_classes: int) -> torch.Tensor:
    """(N, K+1) rows summing to 1: the target's "probs" renormalised, or one-hot of "labels"."""
    onehot = F.one_hot(target["labels"].long(), num_classes + 1).float()
    if "probs" not in target:
        return onehot
    probs = target["probs"].float().clamp_min(0)
    total = probs.sum(dim=1, keepdim=True)
    return torch.where(total > 0, probs / total.clamp_min(1e-12), onehot)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean over rows of -sum_k q_k log softmax(z)_k; logits, q (R,K+1), weights (R,)."""
    per_row = -(target_probs.to(logits.dtype) * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    if weights is None:
        return per_row.mean()
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-6)


def fastrcnn_soft_loss(outputs: RegionOutputs, targets: RegionTargets,
                       background_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """L_ROI on sampled regions: soft cross-entropy to the target probs + smooth-L1 boxes.

    Background rows weigh ``background_weight`` in the classification mean (foreground 1);
    box regression covers foreground rows only and is normalised by the number of rows
    (torchvision's ``fastrcnn_loss`` convention). Both are 0 (still in the graph) when R == 0.

    Returns:
        {"loss_classifier": scalar, "loss_box_reg": scalar}
    """
    logits, deltas = outputs.logits, outputs.box_deltas
    if len(logits) == 0:
        zero = logits.sum() * 0.0 + deltas.sum() * 0.0
        return {"loss_classifier": zero, "loss_box_reg": zero}
    fg = targets.foreground
    weights = torch.where(fg, 1.0, float(background_weight)).to(logits.dtype)
    cls = soft_cross_entropy(logits, targets.probs, weights)
    box = F.smooth_l1_loss(deltas[fg], targets.regression[fg].to(deltas.dtype), beta=1 / 9,
                           reduction="sum") / len(logits)
    return {"loss_classifier": cls, "loss_box_reg": box}


def postprocess_detections(outputs: RegionOutputs, proposals: list[torch.Tensor],
                           image_sizes: list[tuple[int, int]], box_coder: det_utils.BoxCoder, *,
                           score_threshold: float, detections_per_image: int
                           ) -> list[dict[str, torch.Tensor]]:
    """Decode, score and NMS per image; one detection per (box, class) above the threshold.

    As detectron2's and torchvision's Fast R-CNN inference: every foreground class whose
    probability exceeds ``score_threshold`` makes a detection of that box with that label
    and score, so a box that is 0.6 person and 0.3 rider is reported as both (mAP ranks
    each class on its own); NMS runs per label, then the best ``detections_per_image``
    over all labels are kept. Each detection carries its box's full K+1 probability row.

    Returns:
        per image {"boxes": (N,4) resized-image pixels, "labels": (N,) int64 in [0,K),
        "scores": (N,), "probs": (N,K+1)}, sorted by decreasing score.
    """
    probs = F.softmax(outputs.logits.float(), dim=-1)
    boxes = box_coder.decode_single(outputs.box_deltas.float(), torch.cat(proposals).float())
    results = []
    for props, size, p, b in zip(proposals, image_sizes, probs.split([len(x) for x in proposals]),
                                 boxes.split([len(x) for x in proposals])):
        b = clip_boxes_to_image(b, size)
        rows, labels = torch.nonzero(p[:, :-1] > score_threshold, as_tuple=True)
        scores = p[rows, labels]
        keep = remove_small_boxes(b[rows], MIN_BOX_SIZE)
        keep = keep[batched_nms(b[rows[keep]], scores[keep], labels[keep], NMS_THRESHOLD)]
        keep = keep[:detections_per_image]
        results.append({"boxes": b[rows[keep]], "labels": labels[keep], "scores": scores[keep],
                        "probs": p[rows[keep]]})
    return results


def logit_scale_init(clip_logit_scale: float) -> float:
    """The classifier's initial log-scale: CLIP's own, capped at log(MAX_LOGIT_SCALE)."""
    return min(float(clip_logit_scale), math.log(MAX_LOGIT_SCALE))
