"""Stage 3 on Ray Train: distil the target detector with the COIN losses and the CKG.

    run_distill(cfg, run_dir) -> "<run_dir>/distill/model.pt"

Each worker loads the disseminated CLIP detector (``<run>/disseminate/model.pt``) as the
teacher, builds a fresh student from the same CLIP checkpoint, reads
``<run>/collect/cloud.parquet`` and the images by uri (local or s3://), and runs
``coin_ray.train.distill.run_steps`` with the student under DDP. Separation is online in
the workers: the teacher detects on each worker's own batch inside the step (see
``coin_ray.train.distill``), so no stage re-writes detections while training.

Every ``checkpoint_every`` steps (and at the end) one checkpoint holds the student (with
its prototypes), the EMA teacher, the CKG (with its two prototype matrices), both
optimizers, the scheduler and the step; a restarted worker group or a re-submitted run
resumes there. Rank 0 logs per-step metrics to ``<run>/distill/metrics.jsonl`` and to
TensorBoard under ``<run>/tensorboard/distill`` (written locally and uploaded for s3:// runs), and
finally writes ``model.pt`` with the separation statistics in its meta.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from coin_ray import storage
from coin_ray.config import Config, from_dict
from coin_ray.models.ov_rcnn import save_detector
from coin_ray.ray.disseminate import MetricsLog, cloud_records
from coin_ray.ray.progress_feed import report_metrics
from coin_ray.ray.train import load_checkpoint, prepare, run_stage, save_checkpoint, worker_context
from coin_ray.tensorboard_log import TensorBoardLog, tb_dir
from coin_ray.train.data import DetectionDataset
from coin_ray.train.distill import DistillState, build_run_state, load_state_dict, run_steps, state_dict

STAGE = "distill"

AfterStep = Callable[[int, DistillState], None]


def distill_worker(config: dict[str, Any], after_step: AfterStep | None = None) -> None:
    """The Ray Train loop. config: {"cfg": Config as a dict, "run_dir": str, "uris": list | None}.

    ``after_step(step, state)`` runs after each step's checkpoint (tests use it to compare
    gradients across ranks and to kill a worker).
    """
    cfg = from_dict(config["cfg"])
    d = cfg.train.distill
    run_dir = config["run_dir"]
    rank, world_size, device = worker_context()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    dataset = DetectionDataset(cloud_records(run_dir, config.get("uris")), cfg.num_classes)
    state = build_run_state(cfg, storage.join(run_dir, "disseminate", "model.pt"), wrap=prepare, device=device)
    blob = load_checkpoint()
    if blob is not None:
        load_state_dict(state, blob)
    logs = (MetricsLog(storage.join(run_dir, STAGE, "metrics.jsonl"), state.step),
            TensorBoardLog(tb_dir(run_dir, STAGE), STAGE)) if rank == 0 else ()

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % d.log_every == 0 or step == d.steps:
            for log in logs:
                log.add(step, metrics)
                log.flush()
        if step % d.checkpoint_every == 0 or step == d.steps:
            save_checkpoint(state_dict(state), {"step": step, **metrics})
        elif step % d.log_every == 0:
            report_metrics(step, metrics)  # the driver's progress line
        if after_step is not None:
            after_step(step, state)

    run_steps(state, dataset, d, seed=cfg.seed, rank=rank, world_size=world_size, device=device,
              on_step=on_step)
    if rank == 0:
        save_detector(state.detector, storage.join(run_dir, STAGE, "model.pt"),
                      {"steps": d.steps, "separation": state.stats.summary()})


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point for stage 3 (see ``distill_worker``)."""
    distill_worker(config)


def run_distill(cfg: Config, run_dir: str, uris: list[str] | None = None,
                loop: Callable[[dict], None] = train_loop_per_worker) -> str:
    """Stage 3 under Ray Train; returns the uri of ``<run_dir>/distill/model.pt``.

    Needs ``<run_dir>/disseminate/model.pt``. ``uris`` and resuming as in
    ``coin_ray.ray.train.run_stage``; ``loop`` replaces the workers' loop (tests pass
    ``distill_worker`` with an ``after_step`` hook).
    """
    return run_stage(STAGE, loop, cfg, run_dir, uris)
