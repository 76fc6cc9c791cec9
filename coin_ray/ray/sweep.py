"""Sweeping the distillation stage of a collected run (issue 7), on ``coin_ray.ray.tune``.

    report = sweep_distill(cfg, load_space("tune_spaces/demo.yaml"), num_samples=8)

A sweep reads what earlier stages stored: the cloud detections (``collect/cloud.parquet``)
and the disseminated CLIP detector (``disseminate/model.pt``, the distillation's teacher).
It never calls the cloud detector and refuses to start when the stages before distillation
have not finished. Each trial is a function trainable running the distillation loop
in-process (``Tuner(TorchTrainer)`` does not work in Ray 2.60; the models are small), with
the trial's CPUs / GPUs reserved by ``tune.with_resources``.

Trials are scored on the labelled target split (``val_map50``) when the config has one;
without labels, on a clearly named proxy (``proxy_map50``): agreement of the student with
the cloud detector's boxes on training images held out of every trial.

The sweep ends by writing, in its experiment folder: ``best.yaml`` (the input config with
the best trial's values, for ``jobs/adapt.py --config``), ``results.csv`` and
``results.md`` (one row per trial, best first: trials that ran to the end, by the metric,
then the ones ASHA stopped).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import tune

from coin_ray import storage
from coin_ray.config import Config, from_dict, to_dict, to_yaml
from coin_ray.data.datasets import LabelledSplit
from coin_ray.ray.tune import (Dimension, SweepOptions, apply_params, param_space, result_rows,
                               rows_to_csv, rows_to_markdown, run_tuner)
from coin_ray.run import RunDir

SWEEP_INPUTS = {"collect": "collect/cloud.parquet", "disseminate": "disseminate/model.pt",
                "clip_det": "clip_det/detections.parquet"}
PROXY_FRACTION = 0.2  # share of the training images held out as the proxy's "validation"
EVALS_PER_TRIAL = 4  # default number of reports (ASHA rungs are placed on them)
SORT_NOTE = ("\n\nBest first: trials that ran every step, by the metric; then those ASHA stopped "
             "early (behind others at a rung), by step reached.")
class SweepInputsMissing(RuntimeError):
    """The run has not been collected / disseminated yet; a sweep never collects."""


def require_collected(run: RunDir) -> None:
    """Raise SweepInputsMissing unless the stages before distillation finished in ``run``."""
    missing = [rel for stage, rel in SWEEP_INPUTS.items()
               if not (run.is_done(stage) and storage.exists(run.path(rel)))]
    if missing:
        raise SweepInputsMissing(
            f"{run.root}: a sweep reuses a collected run and never calls the cloud detector, "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Run "
            f"`python jobs/adapt.py --config <the same config>` first (it stops being needed "
            f"once stages collect, disseminate and clip_det are done).")


@dataclass
class Validation:
    """What trials are scored on: a labelled split, or held-out cloud detections (proxy)."""

    metric: str  # "val_map50" or "proxy_map50"
    split: LabelledSplit
    train_uris: list[str]
    title: str  # one line saying what the metric is, for the tables


def _held_out(uri: str, fraction: float) -> bool:
    """Deterministic per image (not per run): the same images are held out in every trial."""
    return int(hashlib.sha1(uri.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def proxy_validation(cfg: Config, run: RunDir, train_uris: list[str],
                     fraction: float = PROXY_FRACTION) -> Validation:
    """Hold out a fraction of the training images; their cloud boxes (score >=
    ``train.disseminate.min_cloud_score``) become the proxy's ground truth."""
    from coin_ray.data.datasets import GroundTruth
    from coin_ray.ray.disseminate import cloud_records

    held = [u for u in train_uris if _held_out(u, fraction)] or train_uris[-1:]
    keep = [u for u in train_uris if u not in set(held)]
    min_score = cfg.train.disseminate.min_cloud_score
    items = []
    for rec in cloud_records(run.root, held):
        ok = rec.scores >= min_score
        items.append(GroundTruth(rec.image_id, rec.uri, rec.width, rec.height, rec.boxes[ok],
                                 rec.labels[ok], np.zeros(int(ok.sum()), dtype=bool)))
    title = (f"metric: proxy_map50 = mAP50 of the student against the cloud detector's boxes "
             f"(score >= {min_score}) on {len(items)} held-out training images. PROXY: it measures "
             f"agreement with the cloud, not accuracy; no labelled target split was given.")
    return Validation("proxy_map50", LabelledSplit(list(cfg.data.categories), items), keep, title)


def validation(cfg: Config, run: RunDir, proxy: bool = False) -> Validation:
    """The labelled target split when the config has one (and ``proxy`` is False), else the proxy."""
    from coin_ray.ray.pipeline import target_uris, val_split

    train_uris = target_uris(cfg)
    split = None if proxy else val_split(cfg)
    if split is None:
        return proxy_validation(cfg, run, train_uris)
    title = f"metric: val_map50 = mAP50 (%) of the student on the labelled target split ({len(split.items)} images)"
    return Validation("val_map50", split, train_uris, title)


def student_map50(detector: Any, split: LabelledSplit, batch_size: int = 4) -> float:
    """mAP50 (%) of ``detector`` (an OpenVocabularyRCNN) on ``split`` (pycocotools)."""
    import torch

    from coin_ray.data.images import load_image
    from coin_ray.evaluate import evaluate
    from coin_ray.schema import Detections
    from coin_ray.train.data import image_tensor

    records = []
    for i in range(0, len(split.items), batch_size):
        items = split.items[i:i + batch_size]
        with torch.no_grad():
            found = detector.detect([image_tensor(load_image(gt.uri)) for gt in items])
        for gt, det in zip(items, found):
            d = {k: v.cpu().numpy() for k, v in det.items()}
            records.append(Detections(gt.image_id, gt.uri, gt.width, gt.height, d["boxes"], d["labels"],
                                      d["scores"], d["probs"], "coin"))
    value = evaluate(split, records).map50
    return 0.0 if math.isnan(value) else value


def distill_trial(params: dict[str, Any], *, base: dict[str, Any], run_root: str, val: Validation,
                  eval_every: int, threads: int) -> None:
    """Tune function trainable: distil with ``params`` in this process, report every ``eval_every`` steps.

    Reports {"step", val.metric, "loss"} with a checkpoint of the whole distillation state,
    so a restored sweep resumes a trial where its last report left it.
    """
    import tempfile

    import torch

    from coin_ray.ray.disseminate import cloud_records
    from coin_ray.train.data import DetectionDataset
    from coin_ray.train.distill import build_run_state, load_state_dict, run_steps, state_dict

    torch.set_num_threads(max(1, threads))
    cfg = apply_params(from_dict(base), params)
    d = cfg.train.distill
    state = build_run_state(cfg, storage.join(run_root, SWEEP_INPUTS["disseminate"]))
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load_state_dict(state, torch.load(f"{folder}/state.pt", weights_only=False))
    dataset = DetectionDataset(cloud_records(run_root, val.train_uris), cfg.num_classes)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % eval_every and step != d.steps:
            return
        value = student_map50(state.detector, val.split)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(state_dict(state), f"{folder}/state.pt")
            tune.report({"step": step, val.metric: value, "loss": metrics["loss"]},
                        checkpoint=tune.Checkpoint.from_directory(folder))

    run_steps(state, dataset, d, seed=cfg.seed, on_step=on_step)


@dataclass
class SweepReport:
    """What a finished sweep produced; ``path`` is its experiment folder (local or s3://)."""

    path: str
    metric: str
    best_params: dict[str, Any]
    best_value: float
    best_config: str  # uri of best.yaml
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def collected_run(cfg: Config) -> tuple[Config, RunDir]:
    """The config with its data paths resolved and its run directory (as ``jobs/adapt.py``
    computes them), after checking the run is collected: raises SweepInputsMissing otherwise.
    Never builds the Foggy-Shapes world (an unbuilt world has no collection) and needs no Ray."""
    from coin_ray.world.build import MANIFEST, world_root

    if not cfg.data.target_images:
        root = world_root(cfg.data.world, cfg.seed, cfg.data.world_cache or None, cfg.data.cloud_confusion)
        if not (root / MANIFEST).exists():
            raise SweepInputsMissing(f"the Foggy-Shapes {cfg.data.world} world is not built at {root}, "
                                     "so nothing was collected: run `python jobs/adapt.py` first")
    from coin_ray.ray.pipeline import with_demo_world

    cfg = with_demo_world(cfg)
    run = RunDir(storage.join(cfg.storage, cfg.resolved_run_id()))
    require_collected(run)
    return cfg, run


def sweep_name(space: dict[str, Dimension], **settings: Any) -> str:
    """A stable name from the space and the settings: re-running the same sweep resumes it."""
    key = json.dumps({"space": {k: [d.kind, list(d.values)] for k, d in sorted(space.items())},
                      **settings}, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha1(key.encode()).hexdigest()[:10]


def sweep_distill(cfg: Config, space: dict[str, Dimension], *, num_samples: int = 8,
                  storage_uri: str = "", name: str = "", eval_every: int = 0,
                  cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
                  max_concurrent_trials: int = 0, proxy: bool = False,
                  include_base: bool = True) -> SweepReport:
    """Sweep ``train.distill`` over ``space`` on the run ``cfg`` collected; Ray must be initialised.

    Args:
        storage_uri: folder or s3:// prefix for sweeps (default ``<run>/tune``).
        name: experiment name (default ``sweep_name``: stable, so a re-run resumes).
        eval_every: steps between reports (default steps / EVALS_PER_TRIAL).
        proxy: score on held-out cloud detections even when a labelled split exists.
        include_base: the first trial uses ``cfg``'s own values (the paper's defaults unless
            changed), so the table shows them beside the sampled ones.
    Raises:
        SweepInputsMissing: when the stages before distillation have not finished.
    """
    start = time.monotonic()
    resolved, run = collected_run(cfg)
    val = validation(resolved, run, proxy)
    d = resolved.train.distill
    every = eval_every or max(1, d.steps // EVALS_PER_TRIAL)
    swept = [k for k, dim in space.items() if dim.kind != "fixed"]
    base_point = {k: to_dict(d)[k] for k in swept}
    name = name or sweep_name(space, num_samples=num_samples, metric=val.metric, every=every,
                              distill=to_dict(d), seed=resolved.seed)
    opts = SweepOptions(name=name, storage=storage_uri or run.path("tune"), metric=val.metric,
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
    return _write_outputs(cfg, opts, val, rows, best, time.monotonic() - start)


def _write_outputs(cfg: Config, opts: SweepOptions, val: Validation, rows: list[dict[str, Any]],
                   best: dict[str, Any], seconds: float) -> SweepReport:
    """best.yaml (the caller's config + the best values), results.csv, results.md."""
    path = storage.join(opts.storage, opts.name)
    best_uri = storage.join(path, "best.yaml")
    header = (f"# Best of sweep {opts.name} by {val.metric} = {rows[0][val.metric]:.4g}"
              f"{' (PROXY)' if val.metric.startswith('proxy') else ''}.\n"
              f"# Re-run distillation with it: python jobs/adapt.py --config best.yaml "
              f"--stages distill,evaluate,export\n")
    storage.write_text(best_uri, header + to_yaml(apply_params(cfg, best)))
    storage.write_text(storage.join(path, "results.csv"), rows_to_csv(rows))
    storage.write_text(storage.join(path, "results.md"), rows_to_markdown(rows, val.title + SORT_NOTE))
    return SweepReport(path, val.metric, best, rows[0][val.metric], best_uri, rows, seconds)
