"""The two-stage detector both of ours are, by composition (as torchvision's GeneralizedRCNN).

    transform     torchvision GeneralizedRCNNTransform (resize, normalise, pad to the stride)
    trunk         pixels -> one feature map at stride p (CLIP ViT layers, or a conv net)
    rpn           torchvision RegionProposalNetwork on a LayerNorm of that map
    roi_heads     RoIAlign -> region head -> box_head.proj (joint space) -> cosine similarity
                  with the K+1 class embeddings t x learned scale; class-agnostic box deltas
    class slot    a module whose call gives t (K+1, D) L2-normalised, row K background;
                  each detector names it for what it is (``CLASS_SLOT``)
    prototypes    e_p (K+1, D), kept by EMA (updated by the training step, not here)

The siblings: ``OpenVocabularyRCNN`` (models/ov_rcnn.py: CLIP trunk, prompt learner) and
``LightRCNN`` (models/light_rcnn.py: conv trunk, class embeddings). ``models/build.py``
builds, saves and loads either.

Images enter as a list of (3,H,W) float tensors in [0,1]; detections leave in pixels of
those original images. Between the two, boxes live in the resized-image frame.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from coin_ray.config import ModelConfig
from coin_ray.models.prototypes import Prototypes
from coin_ray.models.roi_heads import (ClipRoIHeads, RegionOutputs, RegionTargets, assign_targets,
                                       fastrcnn_soft_loss, postprocess_detections)

# Anchor sides as fractions of the shorter resized side (16..128 px at min_size 160).
ANCHOR_FRACTIONS = (0.1, 0.2, 0.4, 0.8)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
RPN_SETTINGS = dict(fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=128,
                    positive_fraction=0.5, pre_nms_top_n=dict(training=600, testing=300),
                    post_nms_top_n=dict(training=256, testing=100), nms_thresh=0.7)


@dataclasses.dataclass
class TrainOutput:
    """What a training forward returns besides losses: the sampled regions and t.

    losses: {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"};
    regions: the RoI sample with targets; outputs: their RegionOutputs;
    text_embeddings: (K+1, D) t used for the logits (for L_align without a second pass).
    """

    losses: dict[str, torch.Tensor]
    regions: RegionTargets
    outputs: RegionOutputs
    text_embeddings: torch.Tensor


class RegionDetector(nn.Module):
    """The neutral detector: everything but the trunk's and the class slot's make.

    Subclasses set ``CLASS_SLOT`` (the attribute name of the module giving t) and define
    ``param_groups``; build them with their own class methods or ``models/build.py``.
    """

    CLASS_SLOT = ""

    def __init__(self, *, transform: GeneralizedRCNNTransform, trunk: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: ClipRoIHeads, classes: nn.Module, prototypes: Prototypes,
                 model_cfg: ModelConfig, meta: dict[str, Any]) -> None:
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.rpn_norm = nn.LayerNorm(trunk.out_channels)
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.add_module(self.CLASS_SLOT, classes)  # registered here: keeps the state_dict's order
        self.prototypes = prototypes
        self.model_cfg = model_cfg
        self.meta = meta
        self.categories = list(meta["categories"])

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups named "backbone" and "heads" (each detector decides the rates)."""
        raise NotImplementedError

    def encode(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
               ) -> tuple[torch.Tensor, ImageList, list[dict[str, torch.Tensor]] | None]:
        """Resize/normalise/pad and run the trunk.

        Args:
            images: (3,H_i,W_i) float in [0,1].
            targets: optional per image {"boxes": (N,4) xyxy original pixels, ...}; copied,
                not modified.
        Returns:
            features (B,C,h,w) at stride p; the ImageList (padded batch, resized sizes);
            targets with boxes in resized-image pixels (None when not given).
        """
        image_list, targets_resized = self.transform(images, targets)
        return self.trunk(image_list.tensors), image_list, targets_resized

    def propose(self, features: torch.Tensor, image_list: ImageList,
                targets_resized: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """RPN proposals per image (R_i,4) resized-image pixels, and its losses.

        In training mode ``targets_resized`` is required and the losses are
        {"loss_objectness", "loss_rpn_box_reg"}; in eval mode they are {}.
        """
        normed = self.rpn_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.rpn(image_list, OrderedDict([("0", normed)]), targets_resized)

    def region_outputs(self, features: torch.Tensor, boxes: list[torch.Tensor],
                       image_sizes: list[tuple[int, int]] | None = None,
                       text_embeddings: torch.Tensor | None = None,
                       pixels: torch.Tensor | None = None) -> RegionOutputs:
        """Region embeddings (R,D) normalised, logits (R,K+1), class-agnostic deltas (R,4).

        Args:
            boxes: per image (R_i,4) xyxy in resized-image pixels; R = sum R_i.
            image_sizes: unused by the head (kept for a torchvision-like signature).
            text_embeddings: (K+1,D) to reuse; computed by the prompt learner when None.
            pixels: the transformed batch (``ImageList.tensors``), for a head that embeds crops.
        """
        t = self.text_embeddings() if text_embeddings is None else text_embeddings
        return self.roi_heads(features, boxes, t, pixels)

    def text_embeddings(self) -> torch.Tensor:
        """(K+1, D) L2-normalised class embeddings t (row K: background)."""
        return getattr(self, self.CLASS_SLOT)()

    def compute_losses(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                       background_weight: float = 1.0, generator: torch.Generator | None = None
                       ) -> TrainOutput:
        """L_RPN and L_ROI (soft cross-entropy to target "probs") on one batch.

        Args:
            targets: per image {"boxes": (N,4) xyxy original pixels, "labels": (N,) in [0,K),
                "probs": (N,K+1) optional soft targets}.
        """
        features, image_list, targets_resized = self.encode(images, targets)
        proposals, rpn_losses = self.propose(features, image_list, targets_resized)
        regions = assign_targets(proposals, targets_resized, self.num_classes,
                                 self.roi_heads.box_coder, generator)
        t = self.text_embeddings()
        outputs = self.region_outputs(features, regions.proposals, image_list.image_sizes, t,
                                      image_list.tensors)
        losses = {**rpn_losses, **fastrcnn_soft_loss(outputs, regions, background_weight)}
        return TrainOutput(losses, regions, outputs, t)

    @torch.no_grad()
    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Detections per image, always with inference settings (the mode is restored after).

        Returns:
            per image {"boxes": (N,4) xyxy pixels of the ORIGINAL image, "labels": (N,) int64
            in [0,K), "scores": (N,), "probs": (N,K+1)}.
        """
        was_training = self.training
        self.eval()
        try:
            original_sizes = [tuple(img.shape[-2:]) for img in images]
            features, image_list, _ = self.encode(images)
            proposals, _ = self.propose(features, image_list)
            outputs = self.region_outputs(features, proposals, image_list.image_sizes,
                                          pixels=image_list.tensors)
            results = postprocess_detections(
                outputs, proposals, image_list.image_sizes, self.roi_heads.box_coder,
                score_threshold=self.model_cfg.score_threshold,
                detections_per_image=self.model_cfg.detections_per_image)
            return self.transform.postprocess(results, image_list.image_sizes, original_sizes)
        finally:
            self.train(was_training)

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None,
                background_weight: float = 1.0, generator: torch.Generator | None = None
                ) -> TrainOutput | list[dict[str, torch.Tensor]]:
        """Training mode: ``compute_losses`` (a TrainOutput; ``.losses`` is the loss dict).
        Eval mode: ``detect``. Goes through DDP when the model is wrapped."""
        if self.training:
            if targets is None:
                raise ValueError(f"{type(self).__name__} needs targets in training mode")
            return self.compute_losses(images, targets, background_weight, generator)
        return self.detect(images)


def build_rpn(channels: int, min_size: int, ratios: tuple[float, ...] = ANCHOR_RATIOS) -> RegionProposalNetwork:
    """torchvision's RPN on one feature map; anchors from ``anchor_sizes`` x ``ratios`` (h/w)."""
    anchors = AnchorGenerator(sizes=(anchor_sizes(min_size),), aspect_ratios=(ratios,))
    head = RPNHead(channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(anchors, head, **RPN_SETTINGS)


def anchor_sizes(min_size: int) -> tuple[int, ...]:
    """The RPN anchor sides in resized pixels for a given ``model.min_size``."""
    return tuple(max(4, int(round(min_size * f))) for f in ANCHOR_FRACTIONS)
