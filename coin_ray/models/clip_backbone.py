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
"""

from __future__ import annotations

import torch
from torch import nn
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
