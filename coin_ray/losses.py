"""The COIN losses, one function per paper equation.

Shapes (R regions, K categories, index K is background, D the CLIP joint-space width):
    logits       (R, K+1) float, raw classifier outputs of the student / detector
    probs        (R, K+1) float, target distributions, rows sum to 1
    embeddings   (K+1, D) float, text embeddings t or prototypes e_p

Every loss is a pure function of its inputs: nothing here mutates a model, a prototype
buffer or an optimizer; the training step calls the updates explicitly.
"""

from __future__ import annotations

import torch


def l_align(text_embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """L_align = mean | t - e_p |: the L1 distance between text embeddings and prototypes.

    The paper writes || e_p - e ||_1; we average over the (K+1) x D entries so that the
    loss does not grow with the embedding width (lambda absorbs the constant).
    The prototypes are a target (kept by EMA), so they are detached here: gradients reach
    the prompt learner only.

    Args:
        text_embeddings: (K+1, D) text embeddings t from the prompt learner.
        prototypes: (K+1, D) class prototypes e_p.
    Returns:
        A scalar tensor.
    """
    if text_embeddings.shape != prototypes.shape:
        raise ValueError(f"text embeddings {tuple(text_embeddings.shape)} and prototypes "
                         f"{tuple(prototypes.shape)} differ in shape")
    return (text_embeddings - prototypes.detach().to(text_embeddings.dtype)).abs().mean()
