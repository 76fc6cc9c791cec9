"""What a sweep of the distillation stage needs besides Ray: its inputs, its metric, its outputs.

A sweep reads what earlier stages stored: the cloud detections (``run.cloud_detections``)
and the disseminated CLIP detector (``run.clip_detector``, the distillation's teacher). It
never calls the cloud detector and refuses to start when the stages before distillation
have not finished (``collected_run``). ``coin_ray.ray.sweep`` runs the trials.

Trials are scored on the labelled target split (``val_map50``) when the config has one;
without labels, on a clearly named proxy (``proxy_map50``): agreement of the student with
the cloud detector's boxes on training images held out of every trial.

A finished sweep writes, in its experiment folder (``write_outputs``): ``best.yaml`` (the
input config with the best trial's values, for ``jobs/adapt.py --config``), ``results.csv``
and ``results.md`` (one row per trial, best first: trials that ran to the end, by the
metric, then the ones ASHA stopped).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from coin_ray import storage
from coin_ray.config import Config, to_yaml
from coin_ray.data.datasets import GroundTruth, LabelledSplit, target_uris, val_split
from coin_ray.data.images import load_image
from coin_ray.demo import unbuilt_demo_world, with_demo_world
from coin_ray.evaluate import evaluate
from coin_ray.location import resolve_config
from coin_ray.models.rcnn import RegionDetector
from coin_ray.run import RunDir, run_dir
from coin_ray.schema import Detections
from coin_ray.search_space import Dimension, apply_params, rows_to_csv, rows_to_markdown
from coin_ray.train.data import cloud_records, image_tensor

PROXY_FRACTION = 0.2  # share of the training images held out as the proxy's "validation"
SORT_NOTE = ("\n\nBest first: trials that ran every step, by the metric; then those ASHA stopped "
             "early (behind others at a rung), by step reached.")


class SweepInputsMissing(RuntimeError):
    """The run has not been collected / disseminated yet; a sweep never collects."""


def sweep_inputs(run: RunDir) -> dict[str, str]:
    """The stages a sweep needs finished, each with the artefact it reads."""
    return {"collect": run.cloud_detections, "disseminate": run.clip_detector,
            "clip_det": run.clip_detections}


def require_collected(run: RunDir) -> None:
    """Raise SweepInputsMissing unless the stages before distillation finished in ``run``."""
    missing = [run.relative(uri) for stage, uri in sweep_inputs(run).items()
               if not (run.is_done(stage) and storage.exists(uri))]
    if missing:
        raise SweepInputsMissing(
            f"{run.root}: a sweep reuses a collected run and never calls the cloud detector, "
            f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Run "
            f"`python jobs/adapt.py --config <the same config>` first (it stops being needed "
            f"once stages collect, disseminate and clip_det are done).")


def collected_run(cfg: Config) -> tuple[Config, RunDir]:
    """The config with its data paths resolved and its run directory (as ``jobs/adapt.py``
    computes them), after checking the run is collected: raises SweepInputsMissing otherwise.
    Never builds the Foggy-Shapes world (an unbuilt world has no collection) and needs no Ray."""
    cfg = resolve_config(cfg)  # absolute, as jobs/adapt.py resolved it: trials run in folders of their own
    unbuilt = unbuilt_demo_world(cfg)
    if unbuilt is not None:
        raise SweepInputsMissing(f"the Foggy-Shapes {cfg.data.world} world is not built at {unbuilt}, "
                                 "so nothing was collected: run `python jobs/adapt.py` first")
    cfg = with_demo_world(cfg)
    run = run_dir(cfg)
    require_collected(run)
    return cfg, run


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
    held = [u for u in train_uris if _held_out(u, fraction)] or train_uris[-1:]
    keep = [u for u in train_uris if u not in set(held)]
    min_score = cfg.train.disseminate.min_cloud_score
    items = []
    for rec in cloud_records(run, held):
        ok = rec.scores >= min_score
        items.append(GroundTruth(rec.image_id, rec.uri, rec.width, rec.height, rec.boxes[ok],
                                 rec.labels[ok], np.zeros(int(ok.sum()), dtype=bool)))
    title = (f"metric: proxy_map50 = mAP50 of the student against the cloud detector's boxes "
             f"(score >= {min_score}) on {len(items)} held-out training images. PROXY: it measures "
             f"agreement with the cloud, not accuracy; no labelled target split was given.")
    return Validation("proxy_map50", LabelledSplit(list(cfg.data.categories), items), keep, title)


def validation(cfg: Config, run: RunDir, proxy: bool = False) -> Validation:
    """The labelled target split when the config has one (and ``proxy`` is False), else the proxy."""
    train_uris = target_uris(cfg)
    split = None if proxy else val_split(cfg)
    if split is None:
        return proxy_validation(cfg, run, train_uris)
    title = f"metric: val_map50 = mAP50 (%) of the student on the labelled target split ({len(split.items)} images)"
    return Validation("val_map50", split, train_uris, title)


def student_map50(detector: RegionDetector, split: LabelledSplit, batch_size: int = 4) -> float:
    """mAP50 (%) of ``detector`` (any detector of coin_ray.models) on ``split`` (pycocotools)."""
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


def sweep_name(space: dict[str, Dimension], **settings: Any) -> str:
    """A stable name from the space and the settings: re-running the same sweep resumes it."""
    key = json.dumps({"space": {k: [d.kind, list(d.values)] for k, d in sorted(space.items())},
                      **settings}, sort_keys=True, default=str)
    return "sweep-" + hashlib.sha1(key.encode()).hexdigest()[:10]


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


def write_outputs(cfg: Config, path: str, name: str, val: Validation, rows: list[dict[str, Any]],
                  best: dict[str, Any], seconds: float) -> SweepReport:
    """In the experiment folder ``path``: best.yaml (the caller's config + the best values),
    results.csv, results.md."""
    best_uri = storage.join(path, "best.yaml")
    header = (f"# Best of sweep {name} by {val.metric} = {rows[0][val.metric]:.4g}"
              f"{' (PROXY)' if val.metric.startswith('proxy') else ''}.\n"
              f"# Re-run distillation with it: python jobs/adapt.py --config best.yaml "
              f"--stages distill,evaluate,export\n")
    storage.write_text(best_uri, header + to_yaml(apply_params(cfg, best)))
    storage.write_text(storage.join(path, "results.csv"), rows_to_csv(rows))
    storage.write_text(storage.join(path, "results.md"), rows_to_markdown(rows, val.title + SORT_NOTE))
    return SweepReport(path, val.metric, best, rows[0][val.metric], best_uri, rows, seconds)
