"""Stage 1, knowledge dissemination: pre-train the CLIP detector on cloud detections (no Ray).

One step:
    L = L_RPN + L_ROI + lambda * L_align
      L_RPN   objectness + box regression of the RPN, cloud boxes (score >= min_cloud_score)
              as ground truth
      L_ROI   soft cross-entropy of sampled regions to the matched cloud box's K+1 probs
              (background rows weighted by background_weight) + box regression
      L_align mean |t - e_p| between the prompt learner's text embeddings and the prototypes
    then the prototype EMA:  e_p[i] <- eta e_p[i] + (1 - eta) mean(f of foreground regions of i)

``disseminate`` runs the loop in-process; coin_ray.ray.disseminate runs the same
``run_steps`` in Ray Train workers (DDP), with checkpoints and resume, through
``DisseminateTraining`` (a ``coin_ray.train.loop.Training``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from coin_ray.config import Config, DisseminateConfig, resolved_steps
from coin_ray.losses import l_align
from coin_ray.models.build import build_detector
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.schema import Detections
from coin_ray.train.data import DetectionDataset, load_batch, step_indices, to_device
from coin_ray.train.loop import StepHook, build_scheduler, step_generator, unwrap
from coin_ray.train.schedule import resolve_length


def build_optimizer(model: OpenVocabularyRCNN, cfg: DisseminateConfig) -> torch.optim.Optimizer:
    """AdamW over ``model.param_groups`` (backbone at lr * backbone_lr_mult)."""
    return torch.optim.AdamW(model.param_groups(cfg.lr), weight_decay=cfg.weight_decay)


def disseminate_step(model: nn.Module, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                     cfg: DisseminateConfig, generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimisation step of L_RPN + L_ROI + lambda * L_align, then the prototype EMA.

    Args:
        model: the detector, possibly DDP-wrapped (the forward goes through the wrapper).
        images: (3,H,W) float in [0,1]; targets: {"boxes" (N,4) original pixels, "labels" (N,),
            "probs" (N,K+1)} per image, already filtered by min_cloud_score.
    Returns:
        Floats: each loss term, "loss_align", "loss" (the total) and "lr".
    """
    detector = unwrap(model)
    out = model(images, targets, background_weight=cfg.background_weight, generator=generator)
    align = l_align(out.text_embeddings, detector.prototypes.vectors)
    total = sum(out.losses.values()) + cfg.lambda_ * align
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    scheduler.step()
    fg = out.regions.foreground
    detector.prototypes.update(out.outputs.embeddings[fg].detach(), out.regions.labels[fg], cfg.eta)
    metrics = {k: float(v.detach()) for k, v in out.losses.items()}
    metrics.update(loss_align=float(align.detach()), loss=float(total.detach()),
                   lr=float(optimizer.param_groups[-1]["lr"]))
    return metrics


def run_steps(model: nn.Module, dataset: DetectionDataset, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: DisseminateConfig, *, seed: int,
              start_step: int = 0, rank: int = 0, world_size: int = 1,
              device: torch.device = torch.device("cpu"), on_step: StepHook | None = None) -> None:
    """Steps ``start_step + 1 .. cfg.steps`` (1-based); ``on_step(step, metrics)`` after each."""
    if len(dataset) == 0:
        raise ValueError("no training images with cloud detections (all records are errors?)")
    steps = resolved_steps(cfg.steps, "train.disseminate")
    model.train()
    for step in range(start_step + 1, steps + 1):
        indices = step_indices(len(dataset), cfg.batch_size, step - 1, seed, rank, world_size)
        images, targets = to_device(*load_batch(dataset, indices), device)
        metrics = disseminate_step(model, images, targets, optimizer, scheduler, cfg,
                                   step_generator(seed, rank, step))
        if on_step is not None:
            on_step(step, metrics)


def disseminate(cfg: Config, train_items: list[Detections], *, clip_path: str | None = None,
                on_step: StepHook | None = None) -> OpenVocabularyRCNN:
    """Pre-train a CLIP detector in this process on cloud detection records.

    Args:
        train_items: cloud Detections of the target training images (uris readable by
            coin_ray.storage); error records are skipped.
        clip_path: CLIP checkpoint; ``cfg.clip.model`` when None.
    Returns:
        The trained detector (train mode).

    The length is resolved on the images of ``train_items`` that are not errors (the
    dataset's, images whose boxes all score below ``min_cloud_score`` included) and
    printed as one line.
    """
    model = build_detector(cfg, clip_path)
    dataset = DetectionDataset(train_items, cfg.num_classes, cfg.train.disseminate.min_cloud_score)
    cfg, length = resolve_length(cfg, "disseminate", len(dataset))
    print(length.describe(), flush=True)
    optimizer = build_optimizer(model, cfg.train.disseminate)
    scheduler = build_scheduler(optimizer, cfg.train.disseminate.steps)
    run_steps(model, dataset, optimizer, scheduler, cfg.train.disseminate, seed=cfg.seed, on_step=on_step)
    return model


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> dict:
    """Everything a resumed run needs: model (with prototypes), optimizer, scheduler, step."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": int(step)}


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
    """Load ``training_state`` output into the given objects; returns the step reached."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


@dataclass
class DisseminateTraining:
    """Stage 1 as a ``coin_ray.train.loop.Training``: ``step`` is the last step done.

    ``wrap`` places the detector for the steps (DDP under Ray Train); it is applied when
    the steps start, after any checkpoint was loaded into the bare detector.
    """

    detector: OpenVocabularyRCNN
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: DetectionDataset
    cfg: DisseminateConfig
    seed: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m
    step: int = 0

    def run_steps(self, on_step: StepHook | None = None) -> None:
        def hook(step: int, metrics: dict[str, float]) -> None:
            self.step = step
            if on_step is not None:
                on_step(step, metrics)

        run_steps(self.wrap(self.detector), self.dataset, self.optimizer, self.scheduler, self.cfg,
                  seed=self.seed, start_step=self.step, rank=self.rank, world_size=self.world_size,
                  device=self.device, on_step=hook)

    def state_dict(self) -> dict:
        return training_state(self.detector, self.optimizer, self.scheduler, self.step)

    def load_state_dict(self, blob: dict) -> None:
        self.step = restore_training_state(blob, self.detector, self.optimizer, self.scheduler)
