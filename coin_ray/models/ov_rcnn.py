"""OpenVocabularyRCNN: the CLIP detector of paper Fig. 2a, a ``RegionDetector`` (models/rcnn.py).

    transform     CLIP's mean/std, padded to the patch size
    trunk         CLIP ViT layers on the whole image -> feature map at stride p
    roi_heads     RoIAlign -> CLIP's last ViT layers per region -> box_head.proj (joint space);
                  or (``model.region_features: crops``) each region's pixels -> CLIP's tower
    prompt_learner   the K+1 text embeddings t (learnable context, frozen text encoder)
    prototypes       e_p (K+1, D) started from CLIP's text prototypes

Build it with ``from_clip``, or ``models/build.py`` (``build_detector``, ``load_detector``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torchvision.models.detection.transform import GeneralizedRCNNTransform

from coin_ray import storage
from coin_ray.config import DEFAULT_TEMPLATES, ModelConfig
from coin_ray.models.clip_backbone import ClipCropHead, ClipRegionHead, ClipTrunk, split_vision_layers
from coin_ray.models.prompt_learner import PromptLearner
from coin_ray.models.prototypes import Prototypes, text_prototypes
from coin_ray.models.rcnn import RegionDetector, build_rpn
from coin_ray.models.roi_heads import ClipRoIHeads, logit_scale_init


class OpenVocabularyRCNN(RegionDetector):
    """The CLIP detector; build it with ``from_clip`` (or ``load_detector`` for a model.pt)."""

    CLASS_SLOT = "prompt_learner"

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
        box_head = (ClipCropHead(clip, trunk.out_channels) if model_cfg.region_features == "crops"
                    else ClipRegionHead(clip, head_layers))
        roi_heads = ClipRoIHeads(box_head, stride=trunk.patch_size,
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
                   roi_heads=roi_heads, classes=prompt_learner, prototypes=prototypes,
                   model_cfg=model_cfg, meta=meta)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: pretrained CLIP vision weights at lr * backbone_lr_mult, the rest at lr.

        Frozen parameters (the text encoder, frozen vision layers) are left out.
        """
        clip_ids = {id(p) for p in self.trunk.parameters()}
        clip_ids |= {id(p) for m in self.roi_heads.box_head.clip_modules() for p in m.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) in clip_ids]
        others = [p for p in trainable if id(p) not in clip_ids]
        return [{"params": backbone, "lr": lr * self.model_cfg.backbone_lr_mult, "name": "backbone"},
                {"params": others, "lr": lr, "name": "heads"}]
