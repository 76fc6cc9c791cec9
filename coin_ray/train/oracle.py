"""The Oracle row: the target detector trained on the target train split's ground truth.

It shows the headroom above the teachers, as the paper's Table 1 does. The detector is the
one ``cfg.model.target_backbone`` distils (``models.build.build_student``, started from the
CLIP detector like COIN's), trained for as many epochs over the labelled train split as
COIN trains over its images (``train.distill.epochs``; or ``train.distill.steps`` steps when
set), at the same batch size, learning rate (and schedule, ``train.schedule``), weight
decay, lambda, eta and background weight, with the supervised detection step of stage 1
(``train.disseminate.disseminate_step``: L_RPN + L_ROI + lambda * L_align, prototype EMA)
on every ground-truth box as a hard target. No cloud, no CLIP labels, no separation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from coin_ray.config import Config, DisseminateConfig
from coin_ray.data.datasets import LabelledSplit
from coin_ray.models.build import build_student, load_detector
from coin_ray.models.rcnn import RegionDetector
from coin_ray.schema import Detections
from coin_ray.train.data import DetectionDataset
from coin_ray.train.disseminate import build_optimizer, run_steps
from coin_ray.train.loop import StepHook
from coin_ray.train.schedule import build_distill_scheduler, resolve_length

SOURCE_ORACLE = "ground_truth"


def ground_truth_records(split: LabelledSplit) -> list[Detections]:
    """One record per image: its non-ignored boxes, score 1, one-hot probs over K+1."""
    k1 = len(split.categories) + 1
    out = []
    for gt in split.items:
        keep = ~np.asarray(gt.ignore, bool) if len(gt.ignore) else np.ones(len(gt.boxes), bool)
        labels = np.asarray(gt.labels, np.int64)[keep]
        out.append(Detections(gt.image_id, gt.uri, gt.width, gt.height, np.asarray(gt.boxes)[keep], labels,
                              np.ones(len(labels), np.float32), np.eye(k1, dtype=np.float32)[labels],
                              SOURCE_ORACLE))
    return out


def oracle_schedule(cfg: Config) -> DisseminateConfig:
    """Stage 1's step settings filled from ``train.distill`` (the schedule COIN trains with;
    its length resolved, ``coin_ray.train.schedule.resolve_length``)."""
    d = cfg.train.distill
    return DisseminateConfig(steps=d.steps, batch_size=d.batch_size, lr=d.lr, weight_decay=d.weight_decay,
                             lambda_=d.lambda_, eta_half_life=d.eta_half_life, background_weight=d.background_weight,
                             min_cloud_score=0.0, labels="cloud")


def train_oracle(cfg: Config, teacher_uri: str, split: LabelledSplit, *,
                 on_step: StepHook | None = None) -> RegionDetector:
    """Train the target detector on ``split``'s ground truth in this process (see module doc).

    Args:
        teacher_uri: the disseminated CLIP detector (``<run>/disseminate/model.pt``): the
            student starts from it as COIN's does.
        split: the labelled target *train* split (uris readable by coin_ray.storage).
    Returns:
        The trained detector (train mode; call ``.eval()`` before ``detect``).
    """
    teacher = load_detector(teacher_uri, map_location="cpu")
    student = build_student(cfg, teacher)
    dataset = DetectionDataset(ground_truth_records(split), cfg.num_classes)
    cfg, length = resolve_length(cfg, "distill", len(dataset))
    print(dataclasses.replace(length, stage="oracle").describe(), flush=True)
    schedule = oracle_schedule(cfg)
    optimizer = build_optimizer(student, schedule)
    scheduler = build_distill_scheduler(optimizer, cfg.train.distill)
    run_steps(student, dataset, optimizer, scheduler, schedule, seed=cfg.seed, on_step=on_step)
    return student
