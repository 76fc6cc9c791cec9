"""The Ray Train runner both training stages use: fit, checkpoint, resume.

Driver side:
    model_uri = run_stage("disseminate", loop, cfg, run_dir)   # a whole training stage
    result = fit(loop, {"cfg": ..., ...}, cfg, name="disseminate", storage_path=run_dir)

``name`` must be stable (the stage name): fitting again with the same (storage_path, name)
resumes from the newest checkpoint, after a worker failure (FailureConfig) and after a
re-submission alike. storage_path may be local or s3:// (the endpoint in AWS_ENDPOINT_URL
is honoured through coin_ray.storage's filesystem).

Worker side (inside ``loop(config)``):
    rank, world_size, device = worker_context()
    model = prepare(model)                    # DDP when world_size > 1
    state = load_checkpoint()                 # dict or None
    save_checkpoint(state_dict, metrics)      # every rank calls it; rank 0 writes

A checkpoint is one ``state.pt`` holding whatever dict the stage passes (model with its
prototypes, optimizer(s), scheduler, step, extra state such as an EMA teacher or the CKG).
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Callable

import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from coin_ray import storage
from coin_ray.config import Config, to_dict
from coin_ray.ray.progress_feed import quiet_train_reports, training_progress

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
        max_failures: int = MAX_FAILURES, callbacks: list | None = None) -> ray.train.Result:
    """Run ``loop`` under a TorchTrainer (gloo on CPU, nccl on GPU); raises if training fails."""
    path, filesystem = storage_target(storage_path)
    run_config = RunConfig(name=name, storage_path=path, storage_filesystem=filesystem, callbacks=callbacks,
                           failure_config=FailureConfig(max_failures=max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT))
    trainer = TorchTrainer(loop, train_loop_config=loop_config, scaling_config=scaling_config(cfg),
                           run_config=run_config,
                           torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"))
    return trainer.fit()


def run_stage(stage: str, loop: Callable[[dict], None], cfg: Config, run_dir: str,
              uris: list[str] | None = None) -> str:
    """Run training stage ``stage`` under Ray Train; returns the uri of ``<run_dir>/<stage>/model.pt``.

    Every worker runs ``loop({"cfg": cfg as a dict, "run_dir": run_dir, "uris": uris})``;
    the loop writes ``model.pt`` from rank 0. Checkpoints go under ``<run_dir>/<stage>``,
    so running the stage again on the same run_dir resumes it.

    Args:
        uris: target training images to use; by default the images under
            ``cfg.data.target_images`` (the val split's records in cloud.parquet are left
            out), or every collected record when no folder is configured.
    """
    if uris is None and cfg.data.target_images:
        # Imported on use: only the driver lists images; every worker imports this module.
        from coin_ray.ray.pipeline import target_uris

        uris = target_uris(cfg)
    with training_progress(stage, getattr(cfg.train, stage).steps) as progress:
        fit(loop, {"cfg": to_dict(cfg), "run_dir": run_dir, "uris": uris}, cfg, name=stage,
            storage_path=run_dir, callbacks=[progress])
    return storage.join(run_dir, stage, "model.pt")


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
