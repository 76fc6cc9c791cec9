"""Class prototypes e_p: one vector per class in CLIP's joint space, kept by EMA.

    e_p[i] <- eta * e_p[i] + (1 - eta) * mean(f_j : l_j = i)      (eta default 0.9996)

Only classes present in the batch move; the rule is applied as written (no renormalising).
Prototypes start as CLIP text embeddings of a prompt ensemble with the dataset's style
phrase; L_align (coin_ray.losses.l_align) pulls the learned text embeddings t toward them.

Shapes: vectors (K+1, D) float32, row K is background; embeddings (N, D); labels (N,) in [0, K].
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel

from coin_ray.models.prompt_learner import encode_texts, prompt_texts


class Prototypes(nn.Module):
    """A (K+1, D) buffer of class prototypes and its EMA update (saved in state_dict)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vectors", init.detach().float().clone())

    @property
    def num_rows(self) -> int:
        return int(self.vectors.shape[0])

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, eta: float) -> None:
        """The EMA rule above, with class means taken over every DDP rank.

        Under torch.distributed the per-class sums and counts are all-reduced, so all ranks
        keep identical prototypes; every rank must then call ``update`` at the same step.

        Args:
            embeddings: (N, D) L2-normalised region features (detached here).
            labels: (N,) int64 in [0, K]; the class each feature is assigned to.
            eta: keep rate in [0, 1].
        """
        rows = self.num_rows
        sums = torch.zeros_like(self.vectors)
        sums.index_add_(0, labels.to(sums.device), embeddings.detach().to(sums))
        counts = torch.bincount(labels.to(sums.device), minlength=rows)[:rows].to(sums.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        present = counts > 0
        means = sums[present] / counts[present, None]
        self.vectors[present] = eta * self.vectors[present] + (1.0 - eta) * means


@torch.no_grad()
def text_prototypes(clip: CLIPModel, tokenizer, class_names: list[str], templates: list[str],
                    style: str, background: torch.Tensor) -> torch.Tensor:
    """Initial prototypes: (K+1, D) float32.

    Row i < K is the normalised mean of CLIP's text embeddings of class i under every
    template (with the style phrase); row K is ``background`` (D,), the prompt learner's
    initial background embedding.
    """
    rows = []
    for name in class_names:
        ensemble = encode_texts(clip, tokenizer, prompt_texts(name, templates, style))
        rows.append(F.normalize(ensemble.mean(dim=0), dim=-1))
    rows.append(F.normalize(background.detach().float(), dim=-1))
    return torch.stack(rows)
