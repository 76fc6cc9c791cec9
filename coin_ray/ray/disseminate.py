"""Stage 1 on Ray Train: pre-train the CLIP detector on the collected cloud detections.

    run_disseminate(cfg, run_dir) -> "<run_dir>/disseminate/model.pt"

Each worker reads ``<run>/collect/cloud.parquet`` (relabelled by ``collect/clip.parquet``
unless ``train.disseminate.labels=cloud``) and the images by uri (local or s3://),
takes its slice of every global batch (coin_ray.train.data.step_indices), and runs
coin_ray.train.disseminate.run_steps under DDP. Every ``checkpoint_every`` steps (and at
the end) the model with its prototypes, the optimizer, the scheduler and the step go to
Ray storage under ``<run>/disseminate``; a restarted worker group or a re-submitted run
resumes from there at the next step. Rank 0 appends per-step losses to
``<run>/disseminate/metrics.jsonl`` and finally writes ``model.pt``.
"""

from __future__ import annotations

import json
from typing import Callable

import torch

from coin_ray import storage
from coin_ray.config import Config, from_dict
from coin_ray.models.ov_rcnn import save_detector
from coin_ray.ray.train import load_checkpoint, prepare, run_stage, save_checkpoint, worker_context
from coin_ray.schema import DETECTION_SCHEMA, Detections, table_to_records
from coin_ray.train.data import DetectionDataset, load_dissemination_records
from coin_ray.train.disseminate import (build_detector, build_optimizer, build_scheduler,
                                        restore_training_state, run_steps, training_state)

STAGE = "disseminate"


def cloud_records(run_dir: str, uris: list[str] | None = None) -> list[Detections]:
    """The collected cloud detections (error records dropped), restricted to ``uris`` if given."""
    records = table_to_records(storage.read_parquet(storage.join(run_dir, "collect", "cloud.parquet"),
                                                    DETECTION_SCHEMA))
    wanted = set(uris) if uris is not None else None
    return [r for r in records if r.ok and (wanted is None or r.uri in wanted)]


class MetricsLog:
    """Per-step metrics as JSON lines in one file, rewritten on each flush (local or s3://)."""

    def __init__(self, uri: str, resume_step: int) -> None:
        self.uri = uri
        old = storage.read_text(uri).splitlines() if storage.exists(uri) else []
        self.rows = [row for row in map(json.loads, filter(None, old)) if row["step"] <= resume_step]

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})

    def flush(self) -> None:
        storage.write_text(self.uri, "".join(json.dumps(row) + "\n" for row in self.rows))


def disseminate_worker(config: dict, after_step: Callable[[int], None] | None = None) -> None:
    """The Ray Train loop. config: {"cfg": Config as a dict, "run_dir": str, "uris": list | None}.

    ``after_step(step)`` runs after each step's checkpoint (tests use it to kill a worker).
    """
    cfg = from_dict(config["cfg"])
    d = cfg.train.disseminate
    run_dir = config["run_dir"]
    rank, world_size, device = worker_context()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    records = load_dissemination_records(run_dir, d.labels, config.get("uris"))  # train.disseminate.labels
    dataset = DetectionDataset(records, cfg.num_classes, d.min_cloud_score)
    detector = build_detector(cfg).to(device)  # before the optimizer, so its state lands on device
    optimizer = build_optimizer(detector, d)
    scheduler = build_scheduler(optimizer, d.steps)
    state = load_checkpoint(device)
    start = restore_training_state(state, detector, optimizer, scheduler) if state else 0
    model = prepare(detector)
    log = MetricsLog(storage.join(run_dir, STAGE, "metrics.jsonl"), start) if rank == 0 else None

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if log is not None and (step % d.log_every == 0 or step == d.steps):
            log.add(step, metrics)
            log.flush()
        if step % d.checkpoint_every == 0 or step == d.steps:
            save_checkpoint(training_state(model, optimizer, scheduler, step), {"step": step, **metrics})
        if after_step is not None:
            after_step(step)

    run_steps(model, dataset, optimizer, scheduler, d, seed=cfg.seed, start_step=start, rank=rank,
              world_size=world_size, device=device, on_step=on_step)
    if rank == 0:
        save_detector(detector, storage.join(run_dir, STAGE, "model.pt"), {"steps": d.steps})


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point for stage 1 (see ``disseminate_worker``)."""
    disseminate_worker(config)


def run_disseminate(cfg: Config, run_dir: str, uris: list[str] | None = None,
                    loop: Callable[[dict], None] = train_loop_per_worker) -> str:
    """Stage 1 under Ray Train; returns the uri of ``<run_dir>/disseminate/model.pt``.

    ``uris`` and resuming as in ``coin_ray.ray.train.run_stage``; ``loop`` replaces the
    workers' loop (tests pass ``disseminate_worker`` with an ``after_step`` hook).
    """
    return run_stage(STAGE, loop, cfg, run_dir, uris)
