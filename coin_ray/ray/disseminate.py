"""Stage 1 on Ray Train: pre-train the CLIP detector on the collected cloud detections.

    run_disseminate(cfg, run) -> run.clip_detector   ("<run>/disseminate/model.pt")

Each worker reads the run's cloud detections (relabelled by CLIP's scores of the same boxes
unless ``train.disseminate.labels=cloud``) and the images by uri (local or s3://),
takes its slice of every global batch (coin_ray.train.data.step_indices), and runs
``DisseminateTraining`` (coin_ray.train.disseminate) under DDP in the shell of
``coin_ray.ray.train.run_training``. Every ``checkpoint_every`` steps (and at the end) the
model with its prototypes, the optimizer, the scheduler and the step go to Ray storage
under ``<run>/disseminate``; a restarted worker group or a re-submitted run resumes from
there at the next step. Rank 0 appends per-step losses to ``run.metrics("disseminate")``
and to TensorBoard (``run.tensorboard_dir("disseminate")``), and finally writes the model.
"""

from __future__ import annotations

from typing import Callable

from coin_ray.config import Config
from coin_ray.models.build import build_detector, save_detector
from coin_ray.ray.train import prepare, run_stage, run_training, stage_uris, worker_setup
from coin_ray.run import RunDir
from coin_ray.tensorboard_log import TensorBoardLog
from coin_ray.train.data import DetectionDataset, load_dissemination_records
from coin_ray.train.disseminate import DisseminateTraining, build_optimizer
from coin_ray.train.loop import MetricsLog, StepLog, build_scheduler

STAGE = "disseminate"


def disseminate_worker(config: dict, after_step: Callable[[int], None] | None = None) -> None:
    """The Ray Train loop. config: ``run_stage``'s loop config (cfg, run_dir, uris, progress).

    ``after_step(step)`` runs after each step's checkpoint (tests use it to kill a worker).
    """
    w = worker_setup(config)
    d = w.cfg.train.disseminate
    records = load_dissemination_records(w.run, d.labels, w.uris)  # train.disseminate.labels
    dataset = DetectionDataset(records, w.cfg.num_classes, d.min_cloud_score)
    detector = build_detector(w.cfg).to(w.device)  # before the optimizer, so its state lands on device
    optimizer = build_optimizer(detector, d)
    training = DisseminateTraining(detector, optimizer, build_scheduler(optimizer, d.steps), dataset, d,
                                   w.cfg.seed, w.rank, w.world_size, w.device, wrap=prepare)

    def logs(start: int) -> list[StepLog]:
        if w.rank != 0:
            return []
        return [MetricsLog(w.run.metrics(STAGE), start), TensorBoardLog(w.run.tensorboard_dir(STAGE), STAGE)]

    run_training(training, steps=d.steps, checkpoint_every=d.checkpoint_every, log_every=d.log_every,
                 logs=logs, feed=w.feed, after_step=after_step, map_location=w.device)
    if w.rank == 0:
        save_detector(detector, w.run.clip_detector, {"steps": d.steps})


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point for stage 1 (see ``disseminate_worker``)."""
    disseminate_worker(config)


def run_disseminate(cfg: Config, run: RunDir, uris: list[str] | None = None,
                    loop: Callable[[dict], None] = train_loop_per_worker) -> str:
    """Stage 1 under Ray Train; returns the uri of ``run.clip_detector``.

    ``uris`` and resuming as in ``coin_ray.ray.train.run_stage``; ``loop`` replaces the
    workers' loop (tests pass ``disseminate_worker`` with an ``after_step`` hook).

    The epochs count the images the workers' dataset iterates over: the training images
    whose cloud record (and, with CLIP's labels, CLIP record) is usable. An image whose
    boxes all score below ``min_cloud_score`` still counts: it stays in the dataset as an
    image with no objects.
    """
    uris = stage_uris(cfg, uris)
    images = len(load_dissemination_records(run, cfg.train.disseminate.labels, uris))
    return run_stage(STAGE, loop, cfg, run, uris, images)
