"""Sweeping the distillation stage of a collected run on Ray Tune (issue 7): the trials only.

    report = sweep_distill(cfg, load_space("tune_spaces/demo.yaml"), num_samples=8)

The inputs, the metric and the outputs are ``coin_ray.sweep``'s; the search space is
``coin_ray.search_space``'s. Here: each trial is a function trainable running
``DistillTraining`` in-process in the shell of ``coin_ray.ray.train.run_training``, with
Tune's checkpoints (``Tuner(TorchTrainer)`` does not work in Ray 2.60; the models are
small), its CPUs / GPUs reserved by ``tune.with_resources``; and the Tuner: ASHA on an
explicit ``step`` (ASHA's rung state is not kept across ``Tuner.restore``, the step is),
resources, resume. A sweep's experiment folder is ``<storage>/<name>``; running the same
sweep again restores it and runs only what is unfinished or errored.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from coin_ray import storage
from coin_ray.config import Config, from_dict, to_dict
from coin_ray.ray.train import STATE_FILE, Checkpoints, run_training
from coin_ray.run import RunDir
from coin_ray.search_space import Dimension, apply_params, is_finite_number, plain
from coin_ray.sweep import SweepReport, Validation, collected_run, student_map50, sweep_name, validation, write_outputs
from coin_ray.train.data import DetectionDataset, clip_det_records, clip_records, cloud_records
from coin_ray.train.distill import DistillTraining, build_run_state, prime_state
from coin_ray.train.schedule import resolve_length

EVALS_PER_TRIAL = 4  # default number of reports (ASHA rungs are placed on them)

# Each kind a space file may name (coin_ray.search_space.SAMPLERS), as ray.tune's sampler.
SAMPLERS = {"uniform": tune.uniform, "loguniform": tune.loguniform, "choice": tune.choice}


def domain(dim: Dimension) -> Any:
    """The ray.tune sampler of one dimension (or the plain value when fixed)."""
    if dim.kind == "fixed":
        return dim.values[0]
    if dim.kind == "choice":
        return SAMPLERS["choice"](list(dim.values))
    return SAMPLERS[dim.kind](*dim.values)


def param_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """The Tuner's ``param_space``: YAML key -> ray.tune sampler (or fixed value)."""
    return {key: domain(dim) for key, dim in space.items()}


def _load_tune_checkpoint(map_location: str | torch.device) -> dict | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, STATE_FILE), "rb") as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)


def _save_tune_checkpoint(state: dict, metrics: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# A trial's checkpoints: Tune's, in the same one-file format as Ray Train's.
TUNE_CHECKPOINTS = Checkpoints(_load_tune_checkpoint, _save_tune_checkpoint)


def distill_trial(params: dict[str, Any], *, base: dict[str, Any], run_root: str, val: Validation,
                  eval_every: int, threads: int) -> None:
    """Tune function trainable: distil with ``params`` in this process, report every ``eval_every`` steps.

    Reports {"step", val.metric, "loss"} with a checkpoint of the whole distillation state,
    so a restored sweep resumes a trial where its last report left it.
    """
    torch.set_num_threads(max(1, threads))
    cfg = apply_params(from_dict(base), params)
    run = RunDir(run_root)
    dataset = DetectionDataset(cloud_records(run, val.train_uris), cfg.num_classes)
    cfg, _ = resolve_length(cfg, "distill", len(dataset))  # a no-op unless the space sets epochs
    d = cfg.train.distill
    state = build_run_state(cfg, run.clip_detector)
    prime_state(state, dataset, d, clip_det_records(run), clip_records(run))
    training = DistillTraining(state, dataset, d, cfg.seed)

    def report(step: int, metrics: dict[str, float]) -> dict[str, Any]:
        return {"step": step, val.metric: student_map50(state.detector, val.split), "loss": metrics["loss"]}

    run_training(training, steps=d.steps, checkpoint_every=eval_every, report=report,
                 checkpoints=TUNE_CHECKPOINTS)


def sweep_distill(cfg: Config, space: dict[str, Dimension], *, num_samples: int = 8,
                  storage_uri: str = "", name: str = "", eval_every: int = 0,
                  cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
                  max_concurrent_trials: int = 0, proxy: bool = False,
                  include_base: bool = True) -> SweepReport:
    """Sweep ``train.distill`` over ``space`` on the run ``cfg`` collected; Ray must be initialised.

    Args:
        storage_uri: folder or s3:// prefix for sweeps (default ``run.tune_dir``).
        name: experiment name (default ``sweep_name``: stable, so a re-run resumes).
        eval_every: steps between reports (default steps / EVALS_PER_TRIAL; the steps
            are resolved once, from ``train.distill.epochs`` and the trials' training images).
        proxy: score on held-out cloud detections even when a labelled split exists.
        include_base: the first trial uses ``cfg``'s own values (the paper's defaults unless
            changed), so the table shows them beside the sampled ones.
    Raises:
        SweepInputsMissing: when the stages before distillation have not finished.
    """
    start = time.monotonic()
    resolved, run = collected_run(cfg)
    val = validation(resolved, run, proxy)
    resolved, length = resolve_length(resolved, "distill", len(cloud_records(run, val.train_uris)))
    print(length.describe(), flush=True)
    d = resolved.train.distill
    every = eval_every or max(1, d.steps // EVALS_PER_TRIAL)
    swept = [k for k, dim in space.items() if dim.kind != "fixed"]
    base_point = {k: to_dict(d)[k] for k in swept}
    name = name or sweep_name(space, num_samples=num_samples, metric=val.metric, every=every,
                              distill=to_dict(d), seed=resolved.seed)
    opts = SweepOptions(name=name, storage=storage_uri or run.tune_dir, metric=val.metric,
                        max_steps=d.steps, num_samples=num_samples, grace_steps=every,
                        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                        max_concurrent_trials=max_concurrent_trials, seed=resolved.seed,
                        points_to_evaluate=[base_point] if include_base else [])
    trainable = tune.with_parameters(distill_trial, base=to_dict(resolved), run_root=run.root, val=val,
                                     eval_every=every, threads=max(1, int(cpus_per_trial)))
    grid = run_tuner(trainable, param_space(space), opts)
    rows = result_rows(grid, val.metric, swept)
    if not rows or math.isnan(rows[0][val.metric]):
        raise RuntimeError(f"sweep {name}: no trial reported {val.metric} (see the errors in {opts.storage})")
    best = {k: rows[0][k] for k in swept}
    return write_outputs(cfg, storage.join(opts.storage, opts.name), opts.name, val, rows, best,
                         time.monotonic() - start)


@dataclass
class SweepOptions:
    """How a sweep runs; ``storage`` is a local folder or s3:// prefix holding sweeps."""

    name: str
    storage: str
    metric: str  # the reported key ASHA ranks on, e.g. "val_map50" or "proxy_map50"
    max_steps: int  # training steps of a full trial (ASHA's max_t, in the ``step`` unit)
    num_samples: int = 8
    grace_steps: int = 0  # ASHA grace period; 0 = a quarter of max_steps
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs / GPUs hold
    seed: int = 0  # seeds the random search
    max_failures: int = 1  # retries of a failing trial (from its last checkpoint)
    points_to_evaluate: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def max_concurrent(resources: dict[str, float], cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit at once in ``resources`` (``ray.cluster_resources()``), at least 1."""
    fits = [math.inf]
    if cpus_per_trial > 0:
        fits.append(resources.get("CPU", 0.0) // cpus_per_trial)
    if gpus_per_trial > 0:
        fits.append(resources.get("GPU", 0.0) // gpus_per_trial)
    n = min(fits)
    return 1 if math.isinf(n) else max(1, int(n))


def _storage(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Tune's ``storage_path``: s3:// goes through
    ``coin_ray.storage`` so AWS_ENDPOINT_URL is honoured."""
    if storage.is_s3(uri):
        return storage.resolve(uri)
    return None, storage.resolve(uri)[1]


def _scheduler(opts: SweepOptions) -> Any:
    grace = opts.grace_steps or max(1, opts.max_steps // 4)
    return ASHAScheduler(time_attr="step", max_t=max(opts.max_steps, 1), grace_period=min(grace, opts.max_steps or 1),
                         reduction_factor=opts.reduction_factor)


def run_tuner(trainable: Any, space: dict[str, Any], opts: SweepOptions) -> Any:
    """Fit (or resume) a sweep of ``trainable`` over ``space``; returns the ResultGrid.

    The experiment lives at ``<opts.storage>/<opts.name>``: when Tune's state is already
    there (an interrupted or errored sweep) it is restored with ``resume_errored=True`` and
    only unfinished trials run. Trials report ``step`` and ``opts.metric``.
    """
    fs, root = _storage(opts.storage)
    wrapped = tune.with_resources(trainable, {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial})
    path = storage.join(root, opts.name) if fs is None else f"{root}/{opts.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_errored=True, storage_filesystem=fs)
        return tuner.fit()
    concurrent = opts.max_concurrent_trials or max_concurrent(
        ray.cluster_resources(), opts.cpus_per_trial, opts.gpus_per_trial)
    # The random search's own cap: Tune ignores TuneConfig.max_concurrent_trials when given
    # a BasicVariantGenerator instance (which we need for the seed and the base point).
    search = BasicVariantGenerator(points_to_evaluate=opts.points_to_evaluate or None,
                                   max_concurrent=concurrent, random_state=opts.seed)
    tune_config = tune.TuneConfig(metric=opts.metric, mode="max", scheduler=_scheduler(opts),
                                  search_alg=search, num_samples=opts.num_samples)
    run_config = tune.RunConfig(name=opts.name, storage_path=root, storage_filesystem=fs,
                                failure_config=tune.FailureConfig(max_failures=opts.max_failures), verbose=0)
    return tune.Tuner(wrapped, param_space=space, tune_config=tune_config, run_config=run_config).fit()


def result_rows(grid: Any, metric: str, keys: list[str]) -> list[dict[str, Any]]:
    """One row per trial: trial id, its ``keys`` params, last ``step``, last and best value
    of ``metric`` (NaN when it never reported), error text.

    Sorted best first: by the step reached, then by the last reported value. A trial ASHA
    stopped early was behind others at a rung, and its value at an earlier step is not
    comparable with a finished trial's, so finished trials rank first. NaN last.
    """
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = history[metric].dropna() if history is not None and metric in history else []
        last = result.metrics or {}
        rows.append({
            "trial_id": last.get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1],
            **{k: plain(result.config.get(k)) for k in keys},
            "step": int(last["step"]) if is_finite_number(last.get("step")) else 0,
            metric: float(values.iloc[-1]) if len(values) else math.nan,
            f"best_{metric}": float(values.max()) if len(values) else math.nan,
            "error": str(result.error).splitlines()[0] if result.error else "",
        })
    return sorted(rows, key=lambda r: (math.isnan(r[metric]), -r["step"],
                                       0.0 if math.isnan(r[metric]) else -r[metric]))
