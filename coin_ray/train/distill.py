"""Stage 3, knowledge distillation: the training step and a plain in-process loop (no Ray).

One step reads like the paper: detect with the teacher, separate, compute the losses,
update the CKG, update the student, update the teacher and the prototypes.

Separation is online, inside the step: the teacher (the disseminated CLIP detector; after
burn-up an EMA of the student where the architectures match) detects on the batch and the
result is matched with the batch's stored cloud detections. A moving teacher detects on
every batch; a frozen one detects on an image once and its answer is reused.
(``clip_det/detections.parquet`` stays the evaluation record of the CLIP detector.)

The student (``model.target_backbone``) is either

- ``clip``: the same ``OpenVocabularyRCNN`` architecture built fresh from the CLIP
  checkpoint: its vision layers and ``proj`` start as CLIP's (we keep CLIP's pretrained
  backbone, as a detector would keep ImageNet weights), its RPN head and box regressor are
  randomly initialised, and it has never seen a cloud detection: the paper's "randomly
  initialised target detector" up to the backbone; or
- ``mobilenet_v3`` / ``resnet18``: a ``LightRCNN`` (models/light_rcnn.py), whose region features are
  projected into the same prototype space. The teacher cannot be an EMA of a different
  architecture, so it stays the frozen CLIP detector throughout: the CLIP side of every
  disagreement stays CLIP knowledge (``teacher_tracks_student``).

The student sees a weak (flipped) view made strong (``coin_ray.train.augment``); the
learning rate, the burn-up and the prototypes' warm-up follow the reference's schedule
(``coin_ray.train.schedule``), whose ``phase_at`` decides the phase once per step. Under
torch.distributed the student is DDP-wrapped by the caller; the CKG's gradients and all
prototypes are averaged over ranks here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from coin_ray.config import Config, DistillConfig, resolved_steps
from coin_ray.confusion import SourceConfusions, cloud_annotations, corrected_cloud, estimate_source_confusions
from coin_ray.losses import l_align, l_ckg, l_con, l_inc, l_pri
from coin_ray.models.build import build_student, load_detector
from coin_ray.models.ckg import CKG, FUSIONS, mlp_gradients
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.models.rcnn import RegionDetector
from coin_ray.models.roi_heads import MAX_LOGIT_SCALE
from coin_ray.models.student import DistillStudent, StudentPass
from coin_ray.models.teacher import ema_update, make_teacher
from coin_ray.schema import Detections
from coin_ray.separate import (FusionStats, PairedSet, PrivateSet, Separation, SeparationStats, SourceBoxes,
                               admit_confident, as_source, concat, separate)
from coin_ray.train.augment import StudentView, draw_student_view, student_views, view_separation
from coin_ray.train.data import DetectionDataset, image_tensor, step_indices
from coin_ray.train.loop import StepHook, step_generator, view_generator
from coin_ray.train.schedule import Phase, build_distill_scheduler, phase_at, resolve_length


@dataclass
class Batch:
    """Images (3,H,W) float in [0,1] and their cloud detections (original pixels)."""

    images: list[torch.Tensor]
    cloud: list[SourceBoxes]
    gt: list[dict[str, torch.Tensor]] | None = None  # optional, for separation statistics only
    image_ids: list[str] | None = None  # lets the frozen teacher's detections be reused
    views: list[StudentView] | None = None  # the student's views, when the loader drew them


@dataclass
class DistillState:
    """Everything a distillation run keeps between steps (and in its checkpoint)."""

    student: nn.Module  # DistillStudent, possibly wrapped in DDP
    teacher: OpenVocabularyRCNN  # the CLIP detector (an EMA of a CLIP-ViT student after burn-up)
    ckg: CKG
    optimizer: torch.optim.Optimizer
    ckg_optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    step: int = 0
    stats: SeparationStats = field(default_factory=SeparationStats)
    fusion_stats: FusionStats = field(default_factory=FusionStats)  # after burn-up only
    teacher_cache: dict[str, SourceBoxes] = field(default_factory=dict)  # while the teacher is frozen
    # An image's separation while the teacher is frozen, by (image id, fused): its two inputs
    # no longer change, so neither does it.
    separation_cache: dict[tuple[str, bool], Separation] = field(default_factory=dict)
    confusions: SourceConfusions | None = None  # fusion "ds": the sources' estimated confusions

    @property
    def detector(self) -> RegionDetector:
        """The student detector itself (under DDP wrapper or not)."""
        return getattr(self.student, "module", self.student).detector


def build_state(teacher: OpenVocabularyRCNN, student: RegionDetector, cfg: DistillConfig,
                seed: int = 0, wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> DistillState:
    """Frozen teacher, student (``wrap`` e.g. DDP), CKG from the teacher's prototypes, optimizers.

    The student's optimizer is AdamW over ``param_groups`` (backbone at lr * backbone_lr_mult)
    with the reference's step schedule (``coin_ray.train.schedule``); the CKG has its own
    AdamW at ``ckg_lr``.
    """
    teacher = make_teacher(teacher)
    joint = teacher.prototypes.vectors.shape[1]
    ckg = CKG(joint, teacher.num_classes, cfg.ckg_heads, teacher.prototypes.vectors).to(
        teacher.prototypes.vectors.device)
    student_module = wrap(DistillStudent(student, cfg.private_objectness))
    optimizer = torch.optim.AdamW(student.param_groups(cfg.lr), weight_decay=cfg.weight_decay)
    ckg_optimizer = torch.optim.AdamW(ckg.parameters(), lr=cfg.ckg_lr)
    return DistillState(student_module, teacher, ckg, optimizer, ckg_optimizer,
                        build_distill_scheduler(optimizer, cfg), torch.Generator().manual_seed(seed))


def teacher_detections(state: DistillState, batch: Batch, phase: Phase, cfg: DistillConfig
                       ) -> list[SourceBoxes]:
    """The teacher's detections per image (original pixels, score >= ``cfg.min_clip_score``).

    A frozen teacher (before burn-up, or one that does not track the student) detects on an
    image the first time it is seen and its answer is reused (when the batch carries image
    ids); a teacher that moves every step detects on every batch.
    """
    if (phase.after_burn_up and teacher_tracks_student(state, cfg)) or batch.image_ids is None:
        state.teacher_cache.clear()
        return [as_source(d, cfg.min_clip_score) for d in state.teacher.detect(batch.images)]
    missing = [i for i, key in enumerate(batch.image_ids) if key not in state.teacher_cache]
    if missing:
        found = state.teacher.detect([batch.images[i] for i in missing])
        for i, det in zip(missing, found):
            state.teacher_cache[batch.image_ids[i]] = as_source(det, cfg.min_clip_score)
    return [state.teacher_cache[key] for key in batch.image_ids]


def remember_teacher_detections(state: DistillState, dataset: DetectionDataset, stored: list[Detections],
                                min_clip_score: float) -> int:
    """Fill the frozen teacher's per-image cache with detections it has already made.

    ``stored`` are the clip_det stage's records (``coin_ray.train.data.clip_det_records``):
    the same CLIP detector on the same plain images, so the first pass of the teacher over
    the training set is not run a second time. Records are matched to the dataset by uri;
    error records and images outside the dataset are skipped. Returns how many images were
    cached. A teacher that tracks the student drops the cache at burn-up as before.
    """
    image_ids = {r.uri: r.image_id for r in dataset.records}
    cached = 0
    for record in stored:
        if record.ok and record.uri in image_ids:
            state.teacher_cache[image_ids[record.uri]] = as_source(record, min_clip_score, dataset.num_classes)
            cached += 1
    return cached


def detect_and_separate(state: DistillState, batch: Batch, phase: Phase,
                        cfg: DistillConfig) -> list[Separation]:
    """The teacher's detections on the batch, separated against the cloud's, per image.

    Cloud boxes scoring below ``cfg.min_score`` and CLIP-detector boxes below
    ``cfg.min_clip_score`` are left out (two thresholds: a CLIP detector's softmax over K+1
    classes is far less confident than a cloud detector's scores); after burn-up a matched
    pair's box is the score-weighted fusion of both. While the teacher is frozen an image's
    separation is computed once per phase kind (``state.separation_cache``): neither input changes.
    """
    fuse = phase.after_burn_up
    frozen = batch.image_ids is not None and not (fuse and teacher_tracks_student(state, cfg))
    if not frozen:
        state.separation_cache.clear()
    elif all((key, fuse) in state.separation_cache for key in batch.image_ids):
        return [state.separation_cache[key, fuse] for key in batch.image_ids]
    clip_det = teacher_detections(state, batch, phase, cfg)
    seps = [separate(c.select(c.scores >= cfg.min_score), d, iou_threshold=cfg.match_iou, fuse=fuse)
            for c, d in zip(batch.cloud, clip_det)]
    if frozen:
        state.separation_cache.update(((key, fuse), sep) for key, sep in zip(batch.image_ids, seps))
    return seps


def teacher_tracks_student(state: DistillState, cfg: DistillConfig) -> bool:
    """Whether the teacher follows the student by EMA after burn-up: only when asked
    (``teacher_after_burn_up: ema``) and when the two share an architecture. Otherwise the
    teacher stays the frozen CLIP detector, so the CLIP side of every disagreement is CLIP
    knowledge, never the student's own opinion."""
    return cfg.teacher_after_burn_up == "ema" and type(state.teacher) is type(state.detector)


def distill_step(state: DistillState, batch: Batch, phase: Phase, cfg: DistillConfig) -> dict[str, float]:
    """One COIN step on one batch; returns scalar metrics."""
    # 1-2. Detect with the teacher and separate into consistent / inconsistent / private.
    seps = detect_and_separate(state, batch, phase, cfg)
    for i, sep in enumerate(seps):
        gt = batch.gt[i] if batch.gt else {}
        state.stats.add(sep, gt.get("boxes"), gt.get("labels"))
    if cfg.fusion == "ds":
        seps = admit_settled(state, seps, cfg.admit_posterior)
    inc_boxes = [s.inconsistent.boxes for s in seps]  # in the frame of the ground truth
    # The student learns from a weak (flipped) view made strong; the teacher saw the plain image.
    if batch.views is None:
        images, seps = student_views(batch.images, seps, state.generator, flip=cfg.flip, strong=cfg.strong_augment)
    else:
        images, seps = [v.image for v in batch.views], [view_separation(s, v) for s, v in zip(seps, batch.views)]
    out = state.student(images, seps, state.generator)
    device = out.text_embeddings.device
    cons = concat([s.consistent for s in seps]).to(device)
    inc = concat([s.inconsistent for s in seps]).to(device)
    priv = concat([s.private for s in seps]).to(device)
    # 3. Fuse the inconsistent pairs (Table 6) and compute the student's losses.
    p_ckg = state.ckg(out.inconsistent.embeddings.detach(), inc.cloud_probs, inc.clip_probs)
    fused = FUSIONS[cfg.fusion](inc.cloud_probs, inc.clip_probs, inc.cloud_scores, inc.clip_scores, p_ckg.detach())
    if phase.after_burn_up:
        state.fusion_stats.add(fused, cfg.pi, inc_boxes, batch.gt)
    losses = student_losses(state.detector, out, inc_fused=fused, private=priv, phase=phase, cfg=cfg)
    total = sum(losses.values())
    # 4. Update the CKG with its own optimizer (gradient direction alignment), once its
    #    prototypes have started to move.
    train_ckg = cfg.fusion == "ckg" and phase.prototypes_update
    loss_ckg = update_ckg(state, out, cons, p_ckg) if train_ckg else torch.zeros(())
    # 5. Update the student.
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    state.optimizer.step()
    state.scheduler.step()
    # 6. Update the prototypes (after their warm-up) and (after burn-up) the teacher.
    if phase.prototypes_update:
        update_prototypes(state, out, cons, inc, cfg.eta)
    if phase.after_burn_up and teacher_tracks_student(state, cfg):
        ema_update(state.teacher, state.detector, cfg.teacher_keep_rate)
    state.step += 1
    return {"loss": total.item(), "l_ckg": loss_ckg.item(), **{k: v.item() for k, v in losses.items()},
            "sep_consistent": len(cons), "sep_inconsistent": len(inc), "sep_private": len(priv),
            "after_burn_up": float(phase.after_burn_up), "lr": float(state.optimizer.param_groups[-1]["lr"])}


def admit_settled(state: DistillState, seps: list[Separation], threshold: float) -> list[Separation]:
    """Fusion "ds": per image, the disagreements the corrected cloud's posterior settles
    (``coin_ray.separate.admit_confident``) join the consistent set; counted in
    ``state.stats`` as "admitted", by the label they were given."""
    admitted = [admit_confident(sep, threshold) for sep in seps]
    for before, after in zip(seps, admitted):
        state.stats.count("admitted", after.consistent.cloud_labels[len(before.consistent):])
    return admitted


def prime_state(state: DistillState, dataset: DetectionDataset, cfg: DistillConfig, teacher_records: list[Detections],
                clip_records: list[Detections]) -> None:
    """Before the first step of a run (or of a resumed one): the frozen teacher's stored
    detections fill its cache (``remember_teacher_detections``) and, for fusion "ds", the
    dataset's cloud records are corrected by the sources' estimated confusions
    (``use_source_confusions``), which needs those detections.

    teacher_records: the clip_det stage's records (``clip_det_records``); clip_records: the
    collection's CLIP records of the cloud boxes (``clip_records``).
    """
    remember_teacher_detections(state, dataset, teacher_records, cfg.min_clip_score)
    if cfg.fusion != "ds":
        return
    if not teacher_records:
        raise ValueError("train.distill.fusion=ds needs the CLIP detector's detections of the training images "
                         "(the clip_det stage's, current with its model): run the clip_det stage first")
    use_source_confusions(state, dataset, clip_records, teacher_records, cfg)


def use_source_confusions(state: DistillState, dataset: DetectionDataset, clip: list[Detections],
                          clip_det: list[Detections], cfg: DistillConfig) -> SourceConfusions:
    """Fusion "ds": estimate the sources' confusions (Dawid-Skene over the training images'
    cloud boxes, ``coin_ray.confusion``) and correct ``dataset``'s cloud records with them
    in place: their probs become the posterior over the true class, their label its class
    where it is ``cfg.admit_posterior`` sure. Returns the estimate (also ``state.confusions``).

    clip: the collection's CLIP records of the cloud boxes; clip_det: the CLIP detector's
    stored detections (``clip_det_records``). Deterministic, so every rank computes the same.
    """
    annotations = cloud_annotations(dataset.records, clip, clip_det, min_score=cfg.min_score,
                                    min_clip_score=cfg.min_clip_score, match_iou=cfg.match_iou)
    confusions = estimate_source_confusions(annotations, dataset.num_classes)
    records = corrected_cloud(dataset.records, annotations, confusions, min_score=cfg.min_score,
                              threshold=cfg.admit_posterior)
    for before, after in zip(dataset.records, records):
        changed = torch.as_tensor(np.asarray(after.labels) != np.asarray(before.labels))
        state.stats.count("relabelled", torch.as_tensor(np.asarray(after.labels))[changed])
    dataset.records = records
    state.confusions = confusions
    return confusions


def student_losses(detector: RegionDetector, out: StudentPass, *, inc_fused: torch.Tensor,
                   private: PrivateSet, phase: Phase, cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """The weighted terms of L_con + gamma1 L_inc + gamma2 L_pri + lambda L_align.

    A switched-off term is kept with weight 0, so every parameter DDP saw in the forward
    still receives a (zero) gradient. L_inc is on only after burn-up.
    """
    w_inc = cfg.gamma1 * float(cfg.use_inc and phase.after_burn_up)
    return {
        "l_con": float(cfg.use_con) * l_con(out.proposals, out.regions, out.rpn_losses,
                                             background_weight=cfg.background_weight),
        "l_inc": w_inc * l_inc(out.inconsistent.logits, inc_fused, cfg.pi),
        "l_pri": cfg.gamma2 * float(cfg.use_pri) * l_pri(out.private.logits, private.probs),
        "l_align": cfg.lambda_ * float(cfg.use_align) * l_align(out.text_embeddings,
                                                                 detector.prototypes.vectors),
    }


def update_ckg(state: DistillState, out: StudentPass, cons: PairedSet, p_ckg_inc: torch.Tensor) -> torch.Tensor:
    """One optimizer step of the CKG on L_ckg; the student's parameters are not touched."""
    detector = state.detector
    labels = cons.cloud_labels
    p_ckg_cons = state.ckg(out.consistent.embeddings.detach(), cons.cloud_probs, cons.clip_probs)
    scale = detector.roi_heads.logit_scale.detach().exp().clamp(max=MAX_LOGIT_SCALE)
    text = out.text_embeddings.detach()

    def head(projected: torch.Tensor) -> torch.Tensor:
        # The classifier after the projection MLP (ClipRoIHeads.forward), everything detached.
        return scale * F.normalize(projected, dim=-1) @ text.t()

    g_con, g_inc = mlp_gradients(detector.roi_heads.box_head.projection_mlp(), head, out.consistent_inputs,
                                 F.one_hot(labels, detector.num_classes + 1).float(),
                                 out.inconsistent_inputs, p_ckg_inc)
    loss = l_ckg(g_con, g_inc, p_ckg_cons, labels)
    state.ckg_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(state.ckg)
    state.ckg_optimizer.step()
    return loss.detach()


@torch.no_grad()
def update_prototypes(state: DistillState, out: StudentPass, cons: PairedSet, inc: PairedSet,
                      eta: float) -> None:
    """The student's prototypes from its L_con regions; the CKG's from every labelled region."""
    detector = state.detector
    background = detector.num_classes
    detector.prototypes.update(out.proposals.embeddings, out.regions.labels, eta)
    bg = out.regions.labels == background
    features = torch.cat([out.consistent.embeddings, out.inconsistent.embeddings, out.proposals.embeddings[bg]])
    fill = torch.full((int(bg.sum()),), background, dtype=torch.int64, device=bg.device)
    cloud_labels = torch.cat([cons.cloud_labels, inc.cloud_labels, fill])
    clip_labels = torch.cat([cons.clip_labels, inc.clip_labels, fill])
    state.ckg.update_prototypes(features, cloud_labels, clip_labels, eta)


def average_gradients(module: nn.Module) -> None:
    """All-reduce-mean ``module``'s gradients over ranks (a no-op outside torch.distributed).

    Every rank calls it every step, with zeros where a parameter got no gradient, so the
    collective calls always pair up.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def state_dict(state: DistillState) -> dict[str, Any]:
    """Everything needed to resume: both models, the CKG (+ its prototypes), both optimizers."""
    return {"student": state.detector.state_dict(), "teacher": state.teacher.state_dict(),
            "ckg": state.ckg.state_dict(), "optimizer": state.optimizer.state_dict(),
            "ckg_optimizer": state.ckg_optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "step": state.step, "generator": state.generator.get_state()}


def load_state_dict(state: DistillState, blob: dict[str, Any]) -> None:
    """Inverse of ``state_dict`` (in place)."""
    state.detector.load_state_dict(blob["student"])
    state.teacher.load_state_dict(blob["teacher"])
    state.ckg.load_state_dict(blob["ckg"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.ckg_optimizer.load_state_dict(blob["ckg_optimizer"])
    state.scheduler.load_state_dict(blob["scheduler"])
    state.step = int(blob["step"])
    state.generator.set_state(blob["generator"])


def distill_meta(state: DistillState, cfg: Config) -> dict[str, Any]:
    """What the target detector's file records of its training: length, the sets' counts
    (per class too), the fusion's statistics and, for fusion "ds", the estimated confusions."""
    meta: dict[str, Any] = {"steps": cfg.train.distill.steps, "fusion_name": cfg.train.distill.fusion,
                            "separation": state.stats.summary(), "fusion": state.fusion_stats.summary()}
    if state.confusions is not None:
        meta["confusions"] = state.confusions.to_dict(cfg.data.categories)
    return meta


def load_batch(dataset: DetectionDataset, indices: list[int], device: torch.device,
               ground_truth: Mapping[str, dict[str, torch.Tensor]] | None = None, *,
               views: tuple[DistillConfig, torch.Generator] | None = None) -> Batch:
    """The images at ``indices`` on ``device`` with their cloud detections (on the CPU), and
    their ground truth by uri when given (statistics only: never a training target).

    ``views`` (the distillation's config, a generator): also draw the student's view of each
    image here (``coin_ray.train.augment.draw_student_view``: flip, strong augmentation), on
    the CPU, so a loader running ahead of the step takes that work off it.
    """
    records = [dataset.records[i] for i in indices]
    images = [image_tensor(dataset.load(r.uri)) for r in records]
    drawn = None
    if views is not None:
        cfg, generator = views
        drawn = [draw_student_view(image, generator, flip=cfg.flip, strong=cfg.strong_augment) for image in images]
        drawn = [StudentView(v.image.to(device), v.flipped) for v in drawn]
    gt = [ground_truth.get(r.uri, {}) for r in records] if ground_truth else None
    return Batch([image.to(device) for image in images], [as_source(r, num_classes=dataset.num_classes) for r in records],
                 gt=gt, image_ids=[r.image_id for r in records], views=drawn)


def loader_can_overlap(device: torch.device) -> bool:
    """Whether a batch loader thread has anything to overlap with: a step on a GPU, or a CPU
    core the step's torch threads leave free. With every core busy it only slows the step:
    the demo's two-thread step on two cores ran at 6.7 steps/s with it against 9.0 without
    (a third thread stalls the step's OpenMP threads at their barriers)."""
    return device.type != "cpu" or torch.get_num_threads() < len(os.sched_getaffinity(0))


def batches_ahead(dataset: DetectionDataset, cfg: DistillConfig, *, seed: int, first: int, last: int, rank: int = 0,
                  world_size: int = 1, device: torch.device = torch.device("cpu"),
                  ground_truth: Mapping[str, dict[str, torch.Tensor]] | None = None,
                  ahead: bool | None = None) -> Iterator[tuple[int, Batch]]:
    """(step, batch) for steps ``first..last`` (1-based), each batch with its student views.
    When ``ahead`` (default: ``loader_can_overlap(device)``) the next batch is loaded in a
    background thread while the caller runs the current step, so decoding and augmenting
    overlap the step (as a detection data loader's workers do); otherwise in turn.

    A step's batch is a pure function of (seed, rank, step), ahead or not: ``step_indices``
    picks its images and ``view_generator`` draws its views, so a resumed run sees the same batches.
    """
    def load(step: int) -> Batch:
        indices = step_indices(len(dataset), cfg.batch_size, step - 1, seed, rank, world_size)
        return load_batch(dataset, indices, device, ground_truth, views=(cfg, view_generator(seed, rank, step)))

    if first > last:
        return
    if not (loader_can_overlap(device) if ahead is None else ahead):
        for step in range(first, last + 1):
            yield step, load(step)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="coin-ray-batches") as loader:
        ahead = loader.submit(load, first)
        for step in range(first, last + 1):
            batch = ahead.result()
            if step < last:
                ahead = loader.submit(load, step + 1)
            yield step, batch


def run_steps(state: DistillState, dataset: DetectionDataset, cfg: DistillConfig, *, seed: int,
              rank: int = 0, world_size: int = 1, device: torch.device = torch.device("cpu"),
              on_step: StepHook | None = None,
              ground_truth: Mapping[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Steps ``state.step + 1 .. cfg.steps`` (1-based); ``on_step(step, metrics)`` after each.

    ``ground_truth`` (uri -> {"boxes", "labels"}) only feeds ``state.stats`` and
    ``state.fusion_stats`` (benchmarks judge the sets with it).

    Batches come from ``batches_ahead`` (a pure function of (seed, step, rank), loaded one
    step ahead) and the samplers are reseeded per step, so a resumed run repeats the same steps.
    """
    if len(dataset) == 0:
        raise ValueError("no training images with cloud detections (all records are errors?)")
    steps = resolved_steps(cfg.steps, "train.distill")
    state.student.train()
    for step, batch in batches_ahead(dataset, cfg, seed=seed, first=state.step + 1, last=steps, rank=rank,
                                     world_size=world_size, device=device, ground_truth=ground_truth):
        state.generator = step_generator(seed, rank, step)
        metrics = distill_step(state, batch, phase_at(step - 1, cfg), cfg)
        if on_step is not None:
            on_step(step, metrics)


@dataclass
class DistillTraining:
    """Stage 3 as a ``coin_ray.train.loop.Training`` over a ``DistillState``."""

    state: DistillState
    dataset: DetectionDataset
    cfg: DistillConfig
    seed: int
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def step(self) -> int:
        return self.state.step

    def run_steps(self, on_step: StepHook | None = None) -> None:
        run_steps(self.state, self.dataset, self.cfg, seed=self.seed, rank=self.rank,
                  world_size=self.world_size, device=self.device, on_step=on_step)

    def state_dict(self) -> dict[str, Any]:
        return state_dict(self.state)

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        load_state_dict(self.state, blob)


def build_run_state(cfg: Config, teacher_uri: str, wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                    device: torch.device = torch.device("cpu")) -> DistillState:
    """The state for a run: the disseminated CLIP detector as teacher, a fresh student.

    The student (``coin_ray.models.build.build_student``) is seeded by ``cfg.seed``, so every DDP rank builds the
    same weights, and placed by ``wrap``.
    """
    teacher = load_detector(teacher_uri, map_location=device)
    return build_state(teacher, build_student(cfg, teacher).to(device), cfg.train.distill, seed=cfg.seed,
                       wrap=wrap)


def distill(cfg: Config, teacher_uri: str, train_items: list[Detections], *,
            on_step: StepHook | None = None,
            ground_truth: Mapping[str, dict[str, torch.Tensor]] | None = None,
            teacher_records: list[Detections] | None = None,
            clip_records: list[Detections] | None = None) -> DistillState:
    """Distil a target detector in this process (no Ray): tests, sweeps, benchmarks.

    Args:
        teacher_uri: the disseminated CLIP detector (``<run>/disseminate/model.pt``).
        train_items: cloud Detections of the target training images (uris readable by
            coin_ray.storage); error records are skipped.
        ground_truth: optional labels of those images by uri, for the statistics only.
        teacher_records: that detector's stored detections of the images
            (``clip_det_records``), reused instead of detecting again while it is frozen;
            fusion "ds" needs them to estimate the sources' confusions.
        clip_records: the collection's CLIP records of the cloud boxes (fusion "ds").
    Returns:
        The final state; ``state.detector`` is the target detector.

    The length is resolved on the images of ``train_items`` that are not errors (the
    dataset's) and printed as one line.
    """
    dataset = DetectionDataset(train_items, cfg.num_classes)
    cfg, length = resolve_length(cfg, "distill", len(dataset))
    print(length.describe(), flush=True)
    state = build_run_state(cfg, teacher_uri)
    prime_state(state, dataset, cfg.train.distill, teacher_records or [], clip_records or [])
    run_steps(state, dataset, cfg.train.distill, seed=cfg.seed, on_step=on_step, ground_truth=ground_truth)
    return state
