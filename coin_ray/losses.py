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

from coin_ray.models.roi_heads import RegionOutputs, RegionTargets, fastrcnn_soft_loss


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


def _empty_loss(like: torch.Tensor) -> torch.Tensor:
    # A zero that still belongs to the graph, so backward and DDP see every parameter.
    return like.sum() * 0.0


def kl_to_target(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)), averaged over rows *and* the K+1 classes.

    This is torch's ``KLDivLoss(reduction='mean')``, the scale the reference code trains
    with: a per-row KL divided by K+1 as well as by the number of rows. With the paper's
    gamma1 = gamma2 = 0.1 tuned at that scale, summing over classes instead would make
    L_inc and L_pri K+1 times heavier relative to L_con.

    Args:
        logits: (R, K+1) raw scores of the model being taught.
        target_probs: (R, K+1) target distribution (detached here: it is a teacher).
    Returns:
        A scalar; 0 (still attached to ``logits``) when R == 0.
    """
    if len(logits) == 0:
        return _empty_loss(logits)
    target = target_probs.detach().to(logits.dtype)
    log_p = torch.log_softmax(logits, dim=-1)
    log_t = torch.log(target.clamp_min(1e-12))
    return (target * (log_t - log_p)).mean()


def l_con(outputs: RegionOutputs, targets: RegionTargets, rpn_losses: dict[str, torch.Tensor], *,
          background_weight: float = 1.0) -> torch.Tensor:
    """L_con: the detector's loss on the consistent boxes, as if they were ground truth.

    The RoI part is the Fast R-CNN loss of proposals assigned to consistent boxes plus
    background proposals (``roi_heads.assign_targets`` with one-hot targets of the agreed
    label): cross-entropy (background rows weigh ``background_weight``) and smooth-L1 box
    regression on foreground rows. The RPN part is whatever the RPN returned for its
    targets (the step gives it every matched box: both detectors agree an object is there).

    Args:
        outputs: student ``RegionOutputs`` on the sampled proposals (R rows).
        targets: ``RegionTargets`` of those proposals (labels (R,) in [0, K]).
        rpn_losses: {"loss_objectness": scalar, "loss_rpn_box_reg": scalar} or {}.
    Returns:
        A scalar; its RoI part is 0 (still attached) when R == 0.
    """
    roi = fastrcnn_soft_loss(outputs, targets, background_weight)
    return sum(rpn_losses.values(), roi["loss_classifier"] + roi["loss_box_reg"])


def l_pri(logits: torch.Tensor, source_probs: torch.Tensor) -> torch.Tensor:
    """L_pri: KL between each private box's source probs and the student's distribution.

    Args:
        logits: (Q, K+1) student scores on the private boxes.
        source_probs: (Q, K+1) probs of whichever source found the box (cloud or CLIP det).
    """
    return kl_to_target(logits, source_probs)


def l_inc(logits: torch.Tensor, fused_probs: torch.Tensor, pi: float) -> torch.Tensor:
    """L_inc: KL to the fused probs of inconsistent boxes, kept where max(fused) >= pi.

    Args:
        logits: (P, K+1) student scores on the inconsistent boxes.
        fused_probs: (P, K+1) the fusion's output (CKG's p_ckg by default), detached here.
        pi: confidence threshold on the fused distribution.
    Returns:
        A scalar averaged over the kept boxes; 0 when none is kept.
    """
    keep = fused_probs.detach().max(dim=-1).values >= pi
    if not bool(keep.any()):
        return _empty_loss(logits)
    return kl_to_target(logits[keep], fused_probs[keep])


def squared_error(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|| p - target ||^2 summed over classes, averaged over rows: the loss whose gradient
    direction the CKG aligns (probs, target: (R, K+1)). 0 when R == 0."""
    if len(probs) == 0:
        return _empty_loss(probs)
    return ((probs - target) ** 2).sum(dim=-1).mean()


def _unit_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` as rows (a matrix row by row, a vector as one row), each divided by its (detached)
    largest entry: the cosine and its gradient are unchanged, and tiny gradients no longer
    underflow when squared for the norm. Also returns which rows are non-zero (R,) bool."""
    rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
    largest = rows.detach().abs().amax(dim=1, keepdim=True)
    return rows / largest.clamp_min(torch.finfo(rows.dtype).tiny), largest.squeeze(1) > 0


def gradient_direction_loss(g_consistent: list[torch.Tensor], g_inconsistent: list[torch.Tensor]) -> torch.Tensor:
    """mean over tensors of (1 - cos(g^, g~)): 0 for parallel gradients, 2 for opposite ones.

    As in the reference code, the cosine of a weight matrix's gradients is taken row by row
    (one row per output unit) and averaged; a bias vector's is one plain cosine. 0 when
    no row has a direction on both sides. g^ (from
    consistent boxes) is the supervision and is detached; g~ (from inconsistent boxes,
    through the CKG's fused probs) carries the graph back to the CKG.

    Args:
        g_consistent, g_inconsistent: one gradient per parameter tensor of the aligned
            layers, in the same order and shapes ((out, in) weights, (out,) biases).
    """
    if len(g_consistent) != len(g_inconsistent) or not g_consistent:
        raise ValueError(f"need the same non-zero number of gradient tensors, got "
                         f"{len(g_consistent)} and {len(g_inconsistent)}")
    per_tensor = []
    for a, b in zip(g_consistent, g_inconsistent):
        if a.shape != b.shape:
            raise ValueError(f"gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        (ra, live_a), (rb, live_b) = _unit_rows(a.detach()), _unit_rows(b)
        # A row that is zero on either side has no direction (a ReLU unit dead on these
        # regions, or no inconsistent box in the batch): it is left out rather than scored
        # as cos 0, a constant that only shifts the loss.
        live = live_a & live_b
        if bool(live.any()):
            cos = torch.nn.functional.cosine_similarity(ra[live], rb[live], dim=1, eps=1e-12)
            per_tensor.append(1.0 - cos.mean())
    if not per_tensor:
        return _empty_loss(g_inconsistent[0])
    return torch.stack(per_tensor).mean()


def l_ckg(g_consistent: list[torch.Tensor], g_inconsistent: list[torch.Tensor],
          ckg_probs_consistent: torch.Tensor, consistent_labels: torch.Tensor) -> torch.Tensor:
    """L_ckg = (1 - cos(g^, g~)) + KL(onehot(l^) || p^_ckg).

    Args:
        g_consistent, g_inconsistent: per-tensor gradients (see ``gradient_direction_loss``).
        ckg_probs_consistent: (P, K+1) CKG output on consistent boxes (probabilities).
        consistent_labels: (P,) int64 in [0, K), the label both sources agree on.
    Returns:
        A scalar. The KL to a one-hot target is -log p[l] (the one-hot has no entropy),
        averaged over rows and, as ``kl_to_target``, over the K+1 classes.
    """
    direction = gradient_direction_loss(g_consistent, g_inconsistent)
    if len(ckg_probs_consistent) == 0:
        return direction + _empty_loss(ckg_probs_consistent)
    picked = ckg_probs_consistent.gather(1, consistent_labels[:, None]).squeeze(1)
    return direction - torch.log(picked.clamp_min(1e-7)).mean() / ckg_probs_consistent.shape[1]
