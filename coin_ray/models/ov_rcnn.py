"""OpenVocabularyRCNN: the CLIP detector of paper Fig. 2a, by composition.

    transform     torchvision GeneralizedRCNNTransform (resize, CLIP mean/std, pad to patch)
    trunk         CLIP ViT layers on the whole image -> feature map at stride p
    rpn           torchvision RegionProposalNetwork on a LayerNorm of that map
    roi_heads     RoIAlign -> CLIP's last ViT layers per region -> box_head.proj (joint space)
                  -> cosine similarity with K+1 text embeddings x learned scale; box deltas
    prompt_learner   the K+1 text embeddings (learnable context, frozen text encoder)
    prototypes       e_p (K+1, D), kept by EMA (updated by the training step, not here)

Images enter as a list of (3,H,W) float tensors in [0,1]; detections leave in pixels of
those original images. Between the two, boxes live in the resized-image frame.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from coin_ray import storage
from coin_ray.config import DEFAULT_TEMPLATES, ModelConfig
from coin_ray.models.clip_backbone import ClipRegionHead, ClipTrunk, split_vision_layers
from coin_ray.models.prompt_learner import PromptLearner
from coin_ray.models.prototypes import Prototypes, text_prototypes
from coin_ray.models.roi_heads import (ClipRoIHeads, RegionOutputs, RegionTargets, assign_targets,
                                       fastrcnn_soft_loss, logit_scale_init, postprocess_detections)

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


class OpenVocabularyRCNN(nn.Module):
    """The CLIP detector; build it with ``from_clip`` (or ``load_detector`` for a model.pt)."""

    def __init__(self, *, transform: GeneralizedRCNNTransform, trunk: ClipTrunk,
                 rpn: RegionProposalNetwork, roi_heads: ClipRoIHeads, prompt_learner: PromptLearner,
                 prototypes: Prototypes, model_cfg: ModelConfig, meta: dict[str, Any]) -> None:
        super().__init__()
        self.transform = transform
        self.trunk = trunk
        self.rpn_norm = nn.LayerNorm(trunk.out_channels)
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.prompt_learner = prompt_learner
        self.prototypes = prototypes
        self.model_cfg = model_cfg
        self.meta = meta
        self.categories = list(meta["categories"])

    @classmethod
    def from_clip(cls, clip_path: str, categories: list[str], model_cfg: ModelConfig | None = None,
                  style: str = "", templates: list[str] | None = None, *, seed: int = 0
                  ) -> "OpenVocabularyRCNN":
        """Build the detector on a CLIP checkpoint (hub id, local dir or s3:// dir)."""
        from transformers import AutoProcessor, AutoTokenizer, CLIPModel

        model_cfg = model_cfg or ModelConfig()
        templates = list(templates or DEFAULT_TEMPLATES)
        local = str(storage.local_copy(clip_path)) if storage.is_s3(clip_path) else clip_path
        clip = CLIPModel.from_pretrained(local)
        tokenizer = AutoTokenizer.from_pretrained(local)
        image_processor = AutoProcessor.from_pretrained(local).image_processor
        meta = {"categories": list(categories), "clip_path": clip_path, "style": style,
                "templates": templates, "model_cfg": dataclasses.asdict(model_cfg), "seed": seed}
        trunk_layers, head_layers = split_vision_layers(clip, model_cfg.head_layers)
        trunk = ClipTrunk(clip, trunk_layers)
        trunk.freeze(model_cfg.frozen_vision_layers)
        roi_heads = ClipRoIHeads(ClipRegionHead(clip, head_layers), stride=trunk.patch_size,
                                 roi_size=model_cfg.roi_size,
                                 logit_scale=logit_scale_init(clip.logit_scale.item()))
        prompt_learner = PromptLearner(clip, tokenizer, categories, context_init=model_cfg.context_init,
                                       num_extra_context=model_cfg.num_extra_context, seed=seed)
        prototypes = Prototypes(text_prototypes(clip, tokenizer, categories, templates, style,
                                                prompt_learner.background))
        transform = GeneralizedRCNNTransform(model_cfg.min_size, model_cfg.max_size,
                                             list(image_processor.image_mean),
                                             list(image_processor.image_std),
                                             size_divisible=trunk.patch_size)
        return cls(transform=transform, trunk=trunk, rpn=build_rpn(trunk.out_channels, model_cfg.min_size),
                   roi_heads=roi_heads, prompt_learner=prompt_learner, prototypes=prototypes,
                   model_cfg=model_cfg, meta=meta)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: pretrained CLIP vision weights at lr * backbone_lr_mult, the rest at lr.

        Frozen parameters (the text encoder, frozen vision layers) are left out.
        """
        clip_ids = {id(p) for p in self.trunk.parameters()}
        clip_ids |= {id(p) for m in (*self.roi_heads.box_head.layers, self.roi_heads.box_head.post_layernorm)
                     for p in m.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) in clip_ids]
        others = [p for p in trainable if id(p) not in clip_ids]
        return [{"params": backbone, "lr": lr * self.model_cfg.backbone_lr_mult, "name": "backbone"},
                {"params": others, "lr": lr, "name": "heads"}]

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
                       text_embeddings: torch.Tensor | None = None) -> RegionOutputs:
        """Region embeddings (R,D) normalised, logits (R,K+1), class-agnostic deltas (R,4).

        Args:
            boxes: per image (R_i,4) xyxy in resized-image pixels; R = sum R_i.
            image_sizes: unused by the head (kept for a torchvision-like signature).
            text_embeddings: (K+1,D) to reuse; computed by the prompt learner when None.
        """
        t = self.text_embeddings() if text_embeddings is None else text_embeddings
        return self.roi_heads(features, boxes, t)

    def text_embeddings(self) -> torch.Tensor:
        """(K+1, D) L2-normalised text embeddings t (row K: background)."""
        return self.prompt_learner()

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
        outputs = self.region_outputs(features, regions.proposals, image_list.image_sizes, t)
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
            outputs = self.region_outputs(features, proposals, image_list.image_sizes)
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
                raise ValueError("OpenVocabularyRCNN needs targets in training mode")
            return self.compute_losses(images, targets, background_weight, generator)
        return self.detect(images)


def build_rpn(channels: int, min_size: int, ratios: tuple[float, ...] = ANCHOR_RATIOS) -> RegionProposalNetwork:
    """torchvision's RPN on one feature map; anchors from ``anchor_sizes`` x ``ratios`` (h/w)."""
    anchors = AnchorGenerator(sizes=(anchor_sizes(min_size),), aspect_ratios=(ratios,))
    head = RPNHead(channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(anchors, head, **RPN_SETTINGS)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from ``dataclasses.asdict`` output, ignoring keys this version lacks."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in data.items() if k in names})


def save_detector(model: OpenVocabularyRCNN, uri: str, extra_meta: dict[str, Any] | None = None) -> None:
    """Write ``{"state_dict", "meta"}`` to ``uri`` (local or s3://), the model.pt contract."""
    model = getattr(model, "module", model)
    buf = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "meta": {**model.meta, **(extra_meta or {})}}, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_detector(uri: str | Path, map_location: str | torch.device = "cpu") -> OpenVocabularyRCNN:
    """Rebuild a detector saved by ``save_detector``: an OpenVocabularyRCNN (its CLIP path must
    still be reachable) or, when its meta says so, a LightRCNN (no CLIP needed)."""
    blob = torch.load(io.BytesIO(storage.read_bytes(str(uri))), map_location=map_location,
                      weights_only=False)
    meta = blob["meta"]
    model_cfg = model_config_from_dict(meta["model_cfg"])
    # Imported here: light_rcnn builds on this module.
    from coin_ray.models.light_rcnn import LightRCNN, is_light

    if is_light(meta):
        model = LightRCNN.from_meta(meta, model_cfg, seed=meta.get("seed", 0))
    else:
        model = OpenVocabularyRCNN.from_clip(meta["clip_path"], meta["categories"], model_cfg, meta["style"],
                                             meta["templates"], seed=meta.get("seed", 0))
    model.load_state_dict(blob["state_dict"])
    model.meta = dict(meta)
    return model.to(map_location)


def anchor_sizes(min_size: int) -> tuple[int, ...]:
    """The RPN anchor sides in resized pixels for a given ``model.min_size``."""
    return tuple(max(4, int(round(min_size * f))) for f in ANCHOR_FRACTIONS)
