"""Stage 3 on Ray Train: distil the target detector with the COIN losses and the CKG.

    run_distill(cfg, run) -> run.target_detector   ("<run>/distill/model.pt")

Each worker loads the disseminated CLIP detector (``run.clip_detector``) as the teacher,
builds a fresh student from the same CLIP checkpoint, reads the run's cloud detections and
the images by uri (local or s3://), and runs ``DistillTraining``
(``coin_ray.train.distill``) with the student under DDP in the shell of
``coin_ray.ray.train.run_training``. Separation is online in the workers, inside the step
(see ``coin_ray.train.distill``). While the teacher is frozen it answers each image once:
the clip_det stage already ran that same detector on every target image, so its stored
detections fill the teacher's cache (``remember_teacher_detections``) and the workers detect
only on images it lacks; a teacher that tracks the student detects on every batch. With
``train.distill.fusion: ds`` the cloud's records are first corrected by the sources'
estimated confusions (``prime_state``).

Every ``checkpoint_every`` steps (and at the end) one checkpoint holds the student (with
its prototypes), the EMA teacher, the CKG (with its two prototype matrices), both
optimizers, the scheduler and the step; a restarted worker group or a re-submitted run
resumes there. Rank 0 logs per-step metrics to ``run.metrics("distill")`` and to
TensorBoard under ``run.tensorboard_dir("distill")`` (written locally and uploaded for
s3:// runs), and finally writes the model with the separation statistics in its meta, and
the same statistics to ``run.distill_sets`` for the report.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from coin_ray import storage
from coin_ray.config import Config
from coin_ray.models.build import save_detector
from coin_ray.ray.train import prepare, run_stage, run_training, stage_uris, worker_setup
from coin_ray.run import RunDir
from coin_ray.tensorboard_log import TensorBoardLog
from coin_ray.train.data import DetectionDataset, clip_det_records, clip_records, cloud_records
from coin_ray.train.distill import DistillState, DistillTraining, build_run_state, distill_meta, prime_state
from coin_ray.train.loop import MetricsLog, StepLog

STAGE = "distill"

AfterStep = Callable[[int, DistillState], None]


def distill_worker(config: dict[str, Any], after_step: AfterStep | None = None) -> None:
    """The Ray Train loop. config: ``run_stage``'s loop config (cfg, run_dir, uris, progress).

    ``after_step(step, state)`` runs after each step's checkpoint (tests use it to compare
    gradients across ranks and to kill a worker).
    """
    w = worker_setup(config)
    d = w.cfg.train.distill
    dataset = DetectionDataset(cloud_records(w.run, w.uris), w.cfg.num_classes)
    state = build_run_state(w.cfg, w.run.clip_detector, wrap=prepare, device=w.device)
    prime_state(state, dataset, d, clip_det_records(w.run), clip_records(w.run))
    training = DistillTraining(state, dataset, d, w.cfg.seed, w.rank, w.world_size, w.device)

    def logs(start: int) -> list[StepLog]:
        if w.rank != 0:
            return []
        return [MetricsLog(w.run.metrics(STAGE), start), TensorBoardLog(w.run.tensorboard_dir(STAGE), STAGE)]

    run_training(training, steps=d.steps, checkpoint_every=d.checkpoint_every, log_every=d.log_every,
                 logs=logs, feed=w.feed,
                 after_step=None if after_step is None else lambda step: after_step(step, state))
    if w.rank == 0:
        meta = distill_meta(state, w.cfg)
        storage.write_text(w.run.distill_sets, json.dumps(meta, indent=1))
        save_detector(state.detector, w.run.target_detector, meta)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point for stage 3 (see ``distill_worker``)."""
    distill_worker(config)


def run_distill(cfg: Config, run: RunDir, uris: list[str] | None = None,
                loop: Callable[[dict], None] = train_loop_per_worker) -> str:
    """Stage 3 under Ray Train; returns the uri of ``run.target_detector``.

    Needs ``run.clip_detector``. ``uris`` and resuming as in
    ``coin_ray.ray.train.run_stage``; ``loop`` replaces the workers' loop (tests pass
    ``distill_worker`` with an ``after_step`` hook).

    The epochs count the images of ``distill_images``.
    """
    uris = stage_uris(cfg, uris)
    return run_stage(STAGE, loop, cfg, run, uris, distill_images(run, uris))


def distill_images(run: RunDir, uris: list[str] | None) -> int:
    """How many images stage 3 trains on: the training images with a usable cloud record
    (``cloud_records``; one with no boxes still counts), i.e. the workers' dataset size."""
    return len(cloud_records(run, uris))
