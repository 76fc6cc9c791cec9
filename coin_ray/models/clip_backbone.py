"""CLIP's vision tower, split in two for detection.

The reference CLIP detector runs OpenAI's RN50 up to res4 on the whole image and res5 +
attention pooling per region (the "C4" layout), so a region's feature starts out in CLIP's
joint space. transformers' CLIP is ViT-only (see STYLE.md), so we do the ViT analogue:

    ClipTrunk        embeddings + pre-LN + the first L-n encoder layers on the whole image;
                     patch tokens reshaped to a feature map (positional embeddings
                     interpolated to the input size)
    ClipRegionHead   RoI-aligned tokens of one region + a fresh CLS token -> the last n
                     encoder layers -> post-LN -> ``proj`` into the joint space (D)

Shapes (B images, C the vision width, p the patch size, s the RoI grid side, D the joint
width): pixels (B,3,H,W) normalised with H, W multiples of p -> features (B,C,H/p,W/p);
region tokens (R,s*s,C) -> box features (R,(s*s+1)*C) and embeddings (R,D) (not normalised).

``ClipCropHead`` (``model.region_features: crops``) instead embeds each region from its own
pixels, seen the way the collector's CLIP sees a box (``centre_squares``: the processor keeps
a centre square of side min(w, h), resized to CLIP's input size), through the same CLIP
tower the trunk uses. A region's embedding is then CLIP's embedding of that crop at CLIP's
own resolution, whatever the object's size in the image; the trunk's pooled tokens only
regress the box. Shapes: region tokens (R,s*s,C) and crops (R,3,S,S) -> box features
(R,s*s*C) and embeddings (R,D).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align
from transformers import CLIPModel


def split_vision_layers(clip: CLIPModel, head_layers: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """The vision encoder layers as (trunk layers, region-head layers).

    ``head_layers`` is clamped so the trunk keeps at least one layer.
    """
    layers = list(clip.vision_model.encoder.layers)
    n_head = max(0, min(head_layers, len(layers) - 1))
    return layers[:len(layers) - n_head], layers[len(layers) - n_head:]


class ClipTrunk(nn.Module):
    """The whole-image part of CLIP's ViT: pixels (B,3,H,W) -> feature map (B,C,H/p,W/p)."""

    def __init__(self, clip: CLIPModel, layers: list[nn.Module]) -> None:
        super().__init__()
        vision = clip.vision_model
        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.layers = nn.ModuleList(layers)
        self.patch_size = int(vision.config.patch_size)
        self.out_channels = int(vision.config.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B,3,H,W) CLIP-normalised, H and W multiples of the patch size."""
        b, _, h, w = pixels.shape
        x = self.embeddings(pixels, interpolate_pos_encoding=True)  # (B, 1 + hw, C)
        x = self.pre_layrnorm(x)
        for layer in self.layers:
            x = layer(x, None)
        tokens = x[:, 1:]  # the trunk's CLS token has done its job as an attention sink
        return tokens.transpose(1, 2).reshape(b, self.out_channels, h // self.patch_size,
                                              w // self.patch_size)

    def freeze(self, num_layers: int) -> None:
        """Freeze the patch/position embeddings and the first ``num_layers`` layers (0 = none)."""
        if num_layers <= 0:
            return
        for module in [self.embeddings, self.pre_layrnorm, *self.layers[:num_layers]]:
            module.requires_grad_(False)


class ClipRegionHead(nn.Module):
    """Per-region part of CLIP's ViT; its last layer ``proj`` maps into the joint space.

    ``proj`` starts as CLIP's ``visual_projection`` (zero bias), so before any training a
    region's embedding is CLIP's image embedding of that region seen through the trunk.
    The CKG's gradient alignment differentiates with respect to ``proj`` (``projection_mlp``).
    """

    def __init__(self, clip: CLIPModel, layers: list[nn.Module]) -> None:
        super().__init__()
        vision = clip.vision_model
        width = int(vision.config.hidden_size)
        joint = int(clip.config.projection_dim)
        with torch.no_grad():
            cls = vision.embeddings.class_embedding + vision.embeddings.position_embedding.weight[0]
        self.cls_token = nn.Parameter(cls.detach().clone())  # (C,)
        self.layers = nn.ModuleList(layers)
        self.post_layernorm = vision.post_layernorm
        self.proj = nn.Linear(width, joint)
        with torch.no_grad():
            self.proj.weight.copy_(clip.visual_projection.weight)
            self.proj.bias.zero_()
        self.out_channels = width

    def forward(self, region_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """region_tokens (R,T,C) -> (box features (R,(T+1)*C), embeddings (R,D) unnormalised).

        Box features keep every token (post-LN) so box regression sees where the object lies
        inside the region; the embedding comes from the CLS token alone, as in CLIP.
        """
        cls = self.cls_token.expand(region_tokens.shape[0], 1, -1)
        x = torch.cat([cls, region_tokens], dim=1)
        for layer in self.layers:
            x = layer(x, None)
        x = self.post_layernorm(x)
        # Without per-region layers the CLS token would see nothing: pool the tokens instead.
        pooled = x[:, 0] if len(self.layers) else x[:, 1:].mean(dim=1)
        return x.flatten(1), self.proj(pooled)

    def projection_mlp(self) -> nn.Sequential:
        """The layers between the pooled region feature and the classifier: ``proj`` alone
        (C -> D). The CKG's gradient alignment differentiates with respect to them."""
        return nn.Sequential(self.proj)

    def box_feature_size(self, roi_size: int) -> int:
        """Width of the box features for an s x s RoI grid: (s*s + 1) * C."""
        return (roi_size * roi_size + 1) * self.out_channels

    def clip_modules(self) -> list[nn.Module]:
        """The modules holding CLIP's pretrained vision weights (``proj`` excluded)."""
        return [*self.layers, self.post_layernorm]


def centre_squares(boxes: torch.Tensor) -> torch.Tensor:
    """(R,4) xyxy -> (R,4) xyxy: the square of side min(w, h) at each box's centre.

    That is the part of a crop CLIP's processor keeps (shortest edge resized to its input
    size, then a centre crop), so a region is embedded as the collector's CLIP saw it.
    """
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).min(dim=1, keepdim=True).values / 2
    return torch.cat([centre - half, centre + half], dim=1)


def crop_regions(pixels: torch.Tensor, rois: torch.Tensor | list[torch.Tensor], size: int) -> torch.Tensor:
    """Bilinear crops (R,3,S,S) of the centre squares of ``rois`` from ``pixels`` (B,3,H,W).

    ``rois``: per image (R_i,4) xyxy, or (R,5) rows (image index, x1, y1, x2, y2), in the
    pixels' frame.
    """
    if isinstance(rois, torch.Tensor):
        squares = torch.cat([rois[:, :1], centre_squares(rois[:, 1:])], dim=1)
    else:
        squares = [centre_squares(b) for b in rois]
    return roi_align(pixels, squares, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)


class ClipCropHead(nn.Module):
    """Regions embedded from their own pixels by CLIP's vision tower (shared with the trunk).

    ``proj`` starts as CLIP's ``visual_projection`` (zero bias): before any training a
    region's embedding is exactly CLIP's image embedding of its centre-square crop (up to
    bilinear vs bicubic resizing). Box regression reads the trunk's RoI tokens, normalised.
    """

    def __init__(self, clip: CLIPModel, trunk_width: int) -> None:
        super().__init__()
        vision = clip.vision_model
        self.embeddings = vision.embeddings
        self.pre_layrnorm = vision.pre_layrnorm
        self.layers = nn.ModuleList(list(vision.encoder.layers))
        self.post_layernorm = vision.post_layernorm
        self.crop_size = int(vision.config.image_size)
        self.proj = nn.Linear(int(vision.config.hidden_size), int(clip.config.projection_dim))
        with torch.no_grad():
            self.proj.weight.copy_(clip.visual_projection.weight)
            self.proj.bias.zero_()
        self.box_norm = nn.LayerNorm(trunk_width)
        self.out_channels = trunk_width

    def forward(self, region_tokens: torch.Tensor, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """region_tokens (R,T,C), crops (R,3,S,S) CLIP-normalised -> (box features (R,T*C), embeddings (R,D))."""
        x = self.pre_layrnorm(self.embeddings(crops))
        for layer in self.layers:
            x = layer(x, None)
        pooled = self.post_layernorm(x[:, 0])
        return self.box_norm(region_tokens).flatten(1), self.proj(pooled)

    def projection_mlp(self) -> nn.Sequential:
        """``proj`` alone (C -> D), as for ``ClipRegionHead``."""
        return nn.Sequential(self.proj)

    def box_feature_size(self, roi_size: int) -> int:
        """Width of the box features for an s x s RoI grid: s*s * C."""
        return roi_size * roi_size * self.out_channels

    def clip_modules(self) -> list[nn.Module]:
        """The modules holding CLIP's pretrained vision weights (``proj`` excluded)."""
        return [self.embeddings, self.pre_layrnorm, *self.layers, self.post_layernorm]
