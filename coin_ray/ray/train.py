"""The Ray Train shell both training stages (and each sweep trial) run in: fit, checkpoint, resume.

Driver side:
    model_uri = run_stage("disseminate", loop, cfg, run, uris, images)   # a whole training stage
    result = fit(loop, {"cfg": ..., ...}, cfg, name="disseminate", storage_path=run.root)

``name`` must be stable (the stage name): fitting again with the same (storage_path, name)
resumes from the newest checkpoint, after a worker failure (FailureConfig) and after a
re-submission alike. storage_path may be local or s3:// (the endpoint in AWS_ENDPOINT_URL
is honoured through coin_ray.storage's filesystem).

Worker side (inside ``loop(config)``), for any ``coin_ray.train.loop.Training``:
    worker = worker_setup(config)             # cfg, run, uris, rank, world size, device, feed
    training = ...(wrap=prepare)              # DDP when world_size > 1
    run_training(training, steps=..., checkpoint_every=..., log_every=..., logs=..., feed=worker.feed)
      = load_checkpoint() -> training.load_state_dict(...) -> training.run_steps(on_step),
        on_step logging, then save_checkpoint(training.state_dict(), metrics) on schedule

A checkpoint is one ``state.pt`` holding whatever dict the stage passes (model with its
prototypes, optimizer(s), scheduler, step, extra state such as an EMA teacher or the CKG).
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray.exceptions
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from coin_ray import storage
from coin_ray.config import Config, from_dict, to_dict
from coin_ray.data.datasets import target_uris
from coin_ray.ray.console import verbose
from coin_ray.ray.progress_feed import ProgressFeed, quiet_train_reports, training_progress
from coin_ray.run import RunDir
from coin_ray.train.loop import StepLog, Training
from coin_ray.train.schedule import Stage, resolve_length

STATE_FILE = "state.pt"
CHECKPOINTS_KEPT = 2
MAX_FAILURES = 2  # worker restarts per fit() before the stage fails


def storage_target(uri: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local path, or an S3 key + filesystem."""
    if storage.is_s3(uri):
        fs, path = storage.resolve(uri)
        return path, fs
    return str(storage.resolve(uri)[1]), None


def scaling_config(cfg: Config) -> ScalingConfig:
    """Workers from ``cfg.ray``: num_workers 0 runs the loop in the driver (Ray's local mode)."""
    return ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                         resources_per_worker=cfg.ray.worker_resources())


def fit(loop: Callable[[dict], None], loop_config: dict, cfg: Config, *, name: str, storage_path: str,
        max_failures: int = MAX_FAILURES) -> ray.train.Result:
    """Run ``loop`` under a TorchTrainer (gloo on CPU, nccl on GPU); raises if training fails."""
    path, filesystem = storage_target(storage_path)
    run_config = RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                           failure_config=FailureConfig(max_failures=max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                           # The controller's worker-group INFO lines to its log file only.
                           logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"))
    restarts_left = max_failures
    while True:
        trainer = TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling_config(cfg),
                               run_config=run_config,
                               torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"))
        try:
            return trainer.fit()
        except (ray.train.ControllerError, ray.exceptions.ActorDiedError) as error:
            reason = restartable(error)
            if restarts_left == 0 or reason is None:
                raise
            restarts_left -= 1
            # The same name resumes from the newest checkpoint, so fitting again loses no step.
            print(f"[{name}] {reason}; resuming from the newest checkpoint", flush=True)


def restartable(error: Exception) -> str | None:
    """Why a failed ``fit()`` may fit again, or None when it must not.

    - Ray Train 2.60 can lose a worker of the group it is tearing down after a worker failure,
      and reports that as a (non-retryable) ControllerError around an ActorDiedError.
    - ``fit()`` itself waits on its controller actor only, so an ActorDiedError it raises means
      the controller's process died (seen on a loaded 2-core machine: a SIGSEGV in Ray's
      metrics thread).
    """
    if isinstance(error, ray.train.ControllerError):
        if isinstance(error.controller_failure, ray.exceptions.ActorDiedError):
            return "Ray Train lost a worker while restarting its group"
        return None
    if isinstance(error, ray.exceptions.ActorDiedError):
        return "Ray Train's controller died"
    return None


def stage_uris(cfg: Config, uris: list[str] | None = None) -> list[str] | None:
    """The target training images a stage uses: ``uris`` when given, else the images under
    ``cfg.data.target_images`` (the val split's records in cloud.parquet are left out), or
    None (every collected record) when no folder is configured."""
    if uris is None and cfg.data.target_images:
        return target_uris(cfg)
    return uris


def run_stage(stage: Stage, loop: Callable[[dict], None], cfg: Config, run: RunDir, uris: list[str] | None,
              images: int) -> str:
    """Run training stage ``stage`` under Ray Train; returns the uri of ``run.model(stage)``.

    The stage's length is resolved here, once, from ``images`` (``resolve_length``: its
    epochs become steps) and printed as one line before the Trainer starts; the progress
    line then gives one estimate of the whole stage's duration, measured on its first
    logged steps. Every worker runs ``loop({"cfg": the resolved cfg as a dict, "run_dir":
    run.root, "uris": uris, "progress": a ProgressFeed for the driver's progress line})``;
    the loop writes ``run.model(stage)`` from rank 0. Checkpoints go under
    ``<run>/<stage>``, so running the stage again on the same run resumes it.

    Args:
        uris: target training images to use (``stage_uris``); None: every collected record.
        images: how many images the stage's training dataset iterates over.
    """
    cfg, length = resolve_length(cfg, stage, images, world_size=cfg.ray.num_workers)
    print(length.describe(), flush=True)
    with training_progress(stage, length.steps) as feed:
        fit(loop, {"cfg": to_dict(cfg), "run_dir": run.root, "uris": uris, "progress": feed}, cfg, name=stage,
            storage_path=run.root)
    return run.model(stage)


@dataclass(frozen=True)
class Worker:
    """What one training worker knows: the run's config, the run, its images, its place."""

    cfg: Config
    run: RunDir
    uris: list[str] | None  # None: every collected image
    rank: int
    world_size: int
    device: torch.device
    feed: ProgressFeed | None  # rank 0's progress line on the driver; None on the other ranks


def worker_setup(config: dict) -> Worker:
    """The worker's view of ``run_stage``'s loop config; pins torch's threads to its CPUs."""
    cfg = from_dict(config["cfg"])
    rank, world_size, device = worker_context()
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    feed = config.get("progress") if rank == 0 else None
    return Worker(cfg, RunDir(config["run_dir"]), config.get("uris"), rank, world_size, device, feed)


def worker_context() -> tuple[int, int, torch.device]:
    """(world rank, world size, torch device) of this training worker."""
    quiet_train_reports()
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Move to the worker's device; wrap in DDP when there are several workers.

    ``find_unused_parameters`` because a batch without boxes leaves some head parameters
    out of the graph.
    """
    if ray.train.get_context().get_world_size() <= 1:
        return model.to(ray.train.torch.get_device())
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def save_checkpoint(state: dict, metrics: dict[str, Any]) -> None:
    """Report ``metrics`` with a checkpoint of ``state`` (written by rank 0; every rank calls)."""
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def load_checkpoint(map_location: str | torch.device = "cpu") -> dict | None:
    """The state dict of the newest checkpoint of this run, or None on a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)


@dataclass(frozen=True)
class Checkpoints:
    """Where a training's checkpoints come from (``load(map_location)``) and go
    (``save(state, metrics)``, which also reports the metrics)."""

    load: Callable[[str | torch.device], dict | None]
    save: Callable[[dict, dict[str, Any]], None]


RAY_TRAIN_CHECKPOINTS = Checkpoints(load_checkpoint, save_checkpoint)


def step_metrics(step: int, metrics: dict[str, float]) -> dict[str, Any]:
    """What a checkpoint reports by default: the step and the step's metrics."""
    return {"step": step, **metrics}


def run_training(training: Training, *, steps: int, checkpoint_every: int, log_every: int = 1,
                 logs: Callable[[int], Sequence[StepLog]] = lambda start: (),
                 report: Callable[[int, dict[str, float]], dict[str, Any]] = step_metrics,
                 feed: Callable[[int, dict[str, float]], None] | None = None,
                 after_step: Callable[[int], None] | None = None,
                 checkpoints: Checkpoints = RAY_TRAIN_CHECKPOINTS,
                 map_location: str | torch.device = "cpu") -> None:
    """Resume ``training`` from its newest checkpoint and run it to ``steps``.

    After each step: every ``log_every`` steps the metrics go to ``logs(resume step)`` and to
    ``feed(step, metrics)`` (the driver's progress line); every ``checkpoint_every`` steps
    the state is checkpointed with ``report(step, metrics)``; then ``after_step(step)``
    (tests use it to kill a worker). The last step always logs and checkpoints.
    """
    blob = checkpoints.load(map_location)
    if blob is not None:
        training.load_state_dict(blob)
    sinks = logs(training.step)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % log_every == 0 or step == steps:
            for log in sinks:
                log.add(step, metrics)
                log.flush()
            if feed is not None:
                feed(step, metrics)
        if step % checkpoint_every == 0 or step == steps:
            checkpoints.save(training.state_dict(), report(step, metrics))
        if after_step is not None:
            after_step(step)

    training.run_steps(on_step)
