"""The consistent knowledge generation (CKG) network and its gradient direction alignment.

Shapes (R regions, K categories, index K background, D the CLIP joint-space width):
    features          (R, D) the student's normalised region embeddings (the query)
    cloud_prototypes  (K+1, D) EMA of student features labelled by the cloud detector
    clip_prototypes   (K+1, D) EMA of student features labelled by the CLIP detector
    cloud_probs, clip_probs (R, K+1) the two sources' distributions for the same boxes

    w_cld = CA_1(f, e_p^cld),  w_clip = CA_2(f, e_p^clip)       each (R, K+1)
    p_ckg = softmax(w_cld * p_cld + w_clip * p_clip)             (R, K+1), rows sum to 1

The CKG is trained with its own optimizer by L_ckg (``coin_ray.losses.l_ckg``): the
gradient that the inconsistent boxes, taught by p_ckg, would put on one student layer
should point where the consistent boxes' gradient points. ``mlp_gradients`` computes
those gradients through the student's region projection MLP only, on detached inputs and
detached copies of its weights, so the second-order backward reaches the CKG and nothing
of the student.

Numerical range: both gradients are recomputed in float32 with autocast off (a few
Linear layers, so this costs little). The cosine is scale-free, so no loss scaling is
needed; the reference multiplies by 1e4 because fp16 gradients of a mean-squared error
over (R, K+1) entries underflow. Our squared error is summed over classes (not averaged
over K+1), which keeps the gradient entries of order 1/R.

``FUSIONS`` is the paper's Table 6: the ways to fuse an inconsistent pair's two
distributions into one target.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from coin_ray.losses import squared_error
from coin_ray.models.prototypes import Prototypes


class CrossAttention(nn.Module):
    """CA(f, e_p): each region feature attends over the K+1 prototypes; K+1 weights out."""

    def __init__(self, dim: int, num_outputs: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, num_outputs)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """features (R, D), prototypes (K+1, D) -> weights (R, K+1)."""
        # One "sequence" of R queries against one shared set of K+1 keys/values.
        query = features[None]
        memory = prototypes.to(features.dtype)[None]
        attended, _ = self.attention(query, memory, memory, need_weights=False)
        return self.out(attended[0])


class CKG(nn.Module):
    """Two cross-attention blocks plus the two EMA prototype matrices they attend over."""

    def __init__(self, dim: int, num_classes: int, heads: int, init_prototypes: torch.Tensor) -> None:
        """``num_classes`` is K; ``init_prototypes`` (K+1, D), e.g. the CLIP detector's."""
        super().__init__()
        self.num_classes = num_classes
        self.cloud_attention = CrossAttention(dim, num_classes + 1, heads)
        self.clip_attention = CrossAttention(dim, num_classes + 1, heads)
        self.cloud_prototypes = Prototypes(init_prototypes)
        self.clip_prototypes = Prototypes(init_prototypes)

    def forward(self, features: torch.Tensor, cloud_probs: torch.Tensor,
                clip_probs: torch.Tensor) -> torch.Tensor:
        """p_ckg (R, K+1) from region features (R, D) and the two sources' probs (R, K+1)."""
        # No special case for R == 0: the empty result stays attached to the CKG's graph.
        w_cld = self.cloud_attention(features, self.cloud_prototypes.vectors)
        w_clip = self.clip_attention(features, self.clip_prototypes.vectors)
        mixed = w_cld * cloud_probs.to(w_cld.dtype) + w_clip * clip_probs.to(w_clip.dtype)
        return torch.softmax(mixed.float(), dim=-1)

    @torch.no_grad()
    def update_prototypes(self, features: torch.Tensor, cloud_labels: torch.Tensor,
                          clip_labels: torch.Tensor, eta: float) -> None:
        """EMA of the student's region features per class, once under each source's labels.

        Args:
            features: (R, D) normalised region embeddings (consistent, inconsistent and
                background regions together).
            cloud_labels, clip_labels: (R,) int64 in [0, K] (K = background): the label
                each region carries for the cloud detector and for the CLIP detector.
        """
        self.cloud_prototypes.update(features, cloud_labels, eta)
        self.clip_prototypes.update(features, clip_labels, eta)


def mlp_gradients(mlp: nn.Module, head: Callable[[torch.Tensor], torch.Tensor],
                  consistent_inputs: torch.Tensor, consistent_targets: torch.Tensor,
                  inconsistent_inputs: torch.Tensor, inconsistent_targets: torch.Tensor,
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """g^ and g~: gradients of ||p - target||^2 w.r.t. every parameter of the student's
    region projection MLP theta (the layers just before the classifier).

    The MLP is re-applied functionally to detached inputs with detached float32 copies of
    its parameters; ``head`` maps its output to class logits (R, K+1) and must use only
    detached tensors of the student. Hence g~ depends on the student through values only
    and on ``inconsistent_targets`` (the CKG's p~_ckg) through a graph: backward of any
    function of g~ reaches the CKG and leaves the student's ``.grad`` untouched.

    Args:
        mlp: the student's projection MLP (``box_head.projection_mlp()``), in -> D.
        head: (R, D) -> (R, K+1) logits.
        consistent_inputs: (P, in) inputs of the MLP on consistent regions.
        consistent_targets: (P, K+1) one-hot of the consistent labels.
        inconsistent_inputs: (Q, in) inputs of the MLP on inconsistent regions.
        inconsistent_targets: (Q, K+1) p~_ckg (with graph).
    Returns:
        (g^ detached, g~ with graph): one gradient per parameter tensor of ``mlp``, in
        ``named_parameters`` order, shaped as the parameter (zeros where unused).
    """
    device_type = consistent_inputs.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        params = {name: p.detach().float().requires_grad_(True) for name, p in mlp.named_parameters()}

        def probs(inputs: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(mlp, params, (inputs.detach().float(),))
            return torch.softmax(head(out).float(), dim=-1)

        tensors = list(params.values())
        loss_con = squared_error(probs(consistent_inputs), consistent_targets.detach().float())
        g_con = torch.autograd.grad(loss_con, tensors, allow_unused=True)
        loss_inc = squared_error(probs(inconsistent_inputs), inconsistent_targets.float())
        g_inc = torch.autograd.grad(loss_inc, tensors, create_graph=True, allow_unused=True)
    return [g.detach() for g in _filled(g_con, tensors)], _filled(g_inc, tensors)


def _filled(grads: tuple[torch.Tensor | None, ...], params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]


def _cloud(cloud_probs: torch.Tensor, clip_probs: torch.Tensor, cloud_scores: torch.Tensor,
           clip_scores: torch.Tensor, ckg_probs: torch.Tensor | None) -> torch.Tensor:
    return cloud_probs


def _clip(cloud_probs: torch.Tensor, clip_probs: torch.Tensor, cloud_scores: torch.Tensor,
          clip_scores: torch.Tensor, ckg_probs: torch.Tensor | None) -> torch.Tensor:
    return clip_probs


def _average(cloud_probs: torch.Tensor, clip_probs: torch.Tensor, cloud_scores: torch.Tensor,
             clip_scores: torch.Tensor, ckg_probs: torch.Tensor | None) -> torch.Tensor:
    return 0.5 * (cloud_probs + clip_probs)


def _score_average(cloud_probs: torch.Tensor, clip_probs: torch.Tensor, cloud_scores: torch.Tensor,
                   clip_scores: torch.Tensor, ckg_probs: torch.Tensor | None) -> torch.Tensor:
    wc, wk = cloud_scores[:, None].float(), clip_scores[:, None].float()
    total = (wc + wk).clamp_min(1e-6)
    return (wc * cloud_probs + wk * clip_probs) / total


def _ckg(cloud_probs: torch.Tensor, clip_probs: torch.Tensor, cloud_scores: torch.Tensor,
         clip_scores: torch.Tensor, ckg_probs: torch.Tensor | None) -> torch.Tensor:
    if ckg_probs is None:
        raise ValueError("fusion 'ckg' needs the CKG network's probs")
    return ckg_probs


# Table 6: how an inconsistent pair's two distributions become one target, (P, K+1) each.
FUSIONS: dict[str, Callable[..., torch.Tensor]] = {
    "cloud": _cloud,  # COIN w/ cloud det probs
    "clip": _clip,  # COIN w/ CLIP det probs
    "avg": _average,  # COIN w/ avg
    "score_avg": _score_average,  # COIN w/ s-avg
    "ckg": _ckg,  # COIN w/ CKG (the paper's method)
    # Beyond the paper: the cloud's records corrected by the sources' estimated confusions
    # carry the posterior over the true class as their probs (coin_ray/confusion.py).
    "ds": _cloud,
}
