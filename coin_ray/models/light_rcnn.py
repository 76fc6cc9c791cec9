"""LightRCNN: the fast target detector (``model.target_backbone: mobilenet_v3 | resnet18``).

A ``RegionDetector`` (models/rcnn.py), sibling of ``OpenVocabularyRCNN``: the same design
(RPN, RoIAlign, a region head whose last layer ``box_head.proj`` maps into CLIP's joint
space, a cosine classifier over K+1 class embeddings), on a light convolutional trunk
instead of CLIP's ViT, and with plain learnable class embeddings where the CLIP detector
has its prompt learner:

    trunk             torchvision MobileNetV3-Small blocks 0-3 (stride 8, 24 channels) or
                      ResNet-18 stem + layer1 + layer2 (stride 8, 128 channels); on a CPU
                      the MobileNet trunk costs about 1/13 of the ResNet one per step
    rpn               torchvision RPN, anchors 16-128 px (at min_size 160) x h/w 1/4 ... 4
    roi_heads         RoIAlign 7x7 -> two FC layers (box features) -> ``proj`` (D) -> cosine
                      with the class embeddings x learned scale; class-agnostic box deltas
    class embeddings  (K+1, D) learnable, started from the CLIP detector's text embeddings
    prototypes        (K+1, D) started from the CLIP detector's, kept by EMA

Because ``proj`` lands in the prototype space, the CKG takes this detector's region
features as its queries unchanged, and L_align keeps the class embeddings near the
prototypes. The text encoder is needed once, to start the class embeddings: a deployed
LightRCNN runs without CLIP.

The trunk starts from random weights (this project has no internet to fetch ImageNet
weights; a user with them can load them into ``trunk.body`` before distillation).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from coin_ray.config import ModelConfig
from coin_ray.models.prototypes import Prototypes
from coin_ray.models.rcnn import RegionDetector, build_rpn
from coin_ray.models.roi_heads import ClipRoIHeads

ARCHITECTURE = "light"  # meta["architecture"] of a saved LightRCNN (models/build.py)
# Where the class embeddings were saved before the slot had its own name (still loadable).
LEGACY_CLASS_SLOT = "prompt_learner"
TRUNK_STRIDE = 8
ROI_SIZE = 7
HEAD_WIDTH = 256
# Anchor shapes (height / width) from trains and buses (~1/4) to standing people (~4): a
# street scene's objects span that range, and an anchor far from an object's shape never
# reaches the RPN's IoU 0.7 with it.
ANCHOR_RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
# Foggy-Shapes and most photos: grey-ish means; the trunk learns from scratch, so any
# fixed normalisation to unit scale is as good as another.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.25, 0.25, 0.25)


def _resnet18_body() -> tuple[nn.Module, int]:
    net = resnet18(weights=None)
    return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2), 128


def _mobilenet_v3_body() -> tuple[nn.Module, int]:
    return mobilenet_v3_small(weights=None).features[:4], 24


TRUNKS = {"resnet18": _resnet18_body, "mobilenet_v3": _mobilenet_v3_body}


class ConvTrunk(nn.Module):
    """A torchvision backbone cut at stride 8: pixels (B,3,H,W) normalised -> (B,C,H/8,W/8)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in TRUNKS:
            raise ValueError(f"unknown light trunk {name!r}; known: {', '.join(TRUNKS)}")
        self.body, self.out_channels = TRUNKS[name]()
        self.patch_size = TRUNK_STRIDE  # the name ClipRoIHeads and the transform read

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels)


class ConvRegionHead(nn.Module):
    """Region tokens (R, s*s, C) -> box features (R, HEAD_WIDTH) and embeddings (R, D).

    Two FC layers as in torchvision's ``TwoMLPHead``, then ``proj`` into the joint space.
    """

    def __init__(self, channels: int, joint_dim: int, roi_size: int = ROI_SIZE) -> None:
        super().__init__()
        self.fc6 = nn.Linear(channels * roi_size * roi_size, HEAD_WIDTH)
        self.fc7 = nn.Linear(HEAD_WIDTH, HEAD_WIDTH)
        self.proj = nn.Linear(HEAD_WIDTH, joint_dim)

    def forward(self, region_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """region_tokens (R,T,C) -> (box features (R,HEAD_WIDTH), embeddings (R,D) unnormalised)."""
        x = F.relu(self.fc6(region_tokens.flatten(1)))
        x = F.relu(self.fc7(x))
        return x, self.proj(x)

    def projection_mlp(self) -> nn.Sequential:
        """fc6 -> ReLU -> fc7 -> ReLU -> proj: the region projection MLP before the classifier
        (flattened region tokens -> D), 3 Linear layers and 6 tensors as the reference's
        ``trans``; the CKG's gradient alignment differentiates with respect to all of them."""
        return nn.Sequential(self.fc6, nn.ReLU(), self.fc7, nn.ReLU(), self.proj)

    def box_feature_size(self, roi_size: int) -> int:
        return HEAD_WIDTH


class ClassEmbeddings(nn.Module):
    """The (K+1, D) classifier rows; ``forward()`` returns them L2-normalised (row K: background).

    It stands where the CLIP detector has its prompt learner: a call gives t.
    """

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())

    def forward(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=-1)


class LightRCNN(RegionDetector):
    """The CLIP detector's design on a MobileNetV3 or ResNet-18 trunk; build with ``from_teacher``."""

    CLASS_SLOT = "class_embeddings"

    @classmethod
    def from_teacher(cls, teacher: RegionDetector, model_cfg: ModelConfig | None = None, *,
                     seed: int = 0) -> "LightRCNN":
        """A fresh LightRCNN for the teacher's categories, in the teacher's joint space.

        The class embeddings start as the teacher's text embeddings t, the prototypes as
        its prototypes, the logit scale as its scale; everything else is random (seeded).
        """
        model_cfg = copy.deepcopy(model_cfg or teacher.model_cfg)
        with torch.no_grad():
            text = teacher.text_embeddings().detach().float().cpu()
        meta = {**{k: v for k, v in teacher.meta.items() if k in ("categories", "clip_path", "style",
                                                                  "templates")},
                "architecture": ARCHITECTURE, "joint_dim": int(text.shape[1]), "seed": seed,
                "model_cfg": dataclasses.asdict(model_cfg)}
        model = cls.from_meta(meta, model_cfg, seed=seed)
        with torch.no_grad():
            model.class_embeddings.weight.copy_(text)
            model.prototypes.vectors.copy_(teacher.prototypes.vectors.float().cpu())
            model.roi_heads.logit_scale.copy_(teacher.roi_heads.logit_scale.detach().cpu())
        return model

    @classmethod
    def from_meta(cls, meta: dict[str, Any], model_cfg: ModelConfig, *, seed: int = 0) -> "LightRCNN":
        """The architecture described by ``meta`` (random weights; load a state dict next)."""
        torch.manual_seed(seed)
        num_rows, joint = len(meta["categories"]) + 1, int(meta["joint_dim"])
        trunk = ConvTrunk(model_cfg.target_backbone)
        roi_heads = ClipRoIHeads(ConvRegionHead(trunk.out_channels, joint), stride=trunk.patch_size,
                                 roi_size=ROI_SIZE, logit_scale=0.0)
        transform = GeneralizedRCNNTransform(model_cfg.min_size, model_cfg.max_size, list(PIXEL_MEAN),
                                             list(PIXEL_STD), size_divisible=TRUNK_STRIDE)
        return cls(transform=transform, trunk=trunk, rpn=build_rpn(trunk.out_channels, model_cfg.min_size, ANCHOR_RATIOS),
                   roi_heads=roi_heads, classes=ClassEmbeddings(torch.zeros(num_rows, joint)),
                   prototypes=Prototypes(torch.zeros(num_rows, joint)), model_cfg=model_cfg, meta=dict(meta))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Every parameter at ``lr``: nothing here is pretrained, so no backbone multiplier.

        Two groups with the CLIP detector's names, so schedules and logs read the same.
        """
        trunk = list(self.trunk.parameters())
        ids = {id(p) for p in trunk}
        return [{"params": trunk, "lr": lr, "name": "backbone"},
                {"params": [p for p in self.parameters() if id(p) not in ids], "lr": lr, "name": "heads"}]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Files saved before the slot was renamed hold "prompt_learner.weight".
        for key in [k for k in state_dict if k.startswith(prefix + LEGACY_CLASS_SLOT + ".")]:
            state_dict[prefix + self.CLASS_SLOT + key[len(prefix + LEGACY_CLASS_SLOT):]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)
