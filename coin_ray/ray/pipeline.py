"""The whole adaptation as one resumable run: the glue behind ``jobs/adapt.py``.

Stages (``coin_ray.run.STAGES``), each writing under the run directory and recorded in
its manifest only once all of its outputs exist:

    collect      cloud detections + CLIP scores of their boxes, train and val images
    disseminate  pre-train the CLIP detector on the cloud detections (Ray Train)
    clip_det     the CLIP detector on every target image (Ray Data)
    distill      train the target detector with the COIN losses and the CKG (Ray Train)
    evaluate     Table 1 on the labelled target split, report folder
    export       the target detector as TorchScript

With an empty ``data.target_images`` the built-in Foggy-Shapes world is built (or reused
from its cache) and its stand-in cloud detector is served over HTTP on 127.0.0.1 for the
collection stage, exactly as a user's self-hosted detector would be.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import ray

from coin_ray import storage
from coin_ray.config import Config, to_yaml, with_updates
from coin_ray.data.datasets import LabelledSplit, list_image_folder, load_labelled
from coin_ray.run import STAGES, RunDir

log = logging.getLogger("coin_ray.pipeline")

# The demo's stand-in cloud: realistic latency and a rate limit the client must respect.
DEMO_CLOUD_LATENCY_S = 0.05
DEMO_CLOUD_RPS = 25.0


@dataclass
class AdaptationResult:
    run_dir: str
    stages_run: list[str] = field(default_factory=list)
    table_markdown: str = ""
    ok: bool = True


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a fresh local Ray instance.

    ``ray job submit`` sets RAY_ADDRESS, so jobs join their cluster; set it yourself
    (``RAY_ADDRESS=auto``) to join a cluster started with ``ray start``. Without it a new
    local instance is started (``num_cpus`` of them, or all): a bare ``ray.init()`` would
    try the last cluster recorded on this machine and wait forever when that one died.
    Ray refuses ``num_cpus`` when joining, so it is ignored under RAY_ADDRESS.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        if num_cpus:
            log.warning("--num-cpus is ignored when connecting to an existing cluster (RAY_ADDRESS)")
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus or None)


def with_absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute: Ray workers run in other working directories."""
    fields = {"storage": cfg.storage, "data.target_images": cfg.data.target_images,
              "data.val_annotations": cfg.data.val_annotations,
              "data.world_cache": cfg.data.world_cache, "cloud.cache": cfg.cloud.cache}
    if cfg.data.val_format == "coco":  # for VOC it names the split
        fields["data.val_images"] = cfg.data.val_images
    if cfg.clip.model and os.path.exists(cfg.clip.model):  # else a hub id or s3://
        fields["clip.model"] = cfg.clip.model
    if cfg.cloud.backend == "replay":
        fields["cloud.url"] = cfg.cloud.url
    updates = [f"{key}={os.path.abspath(os.path.expanduser(value))}" for key, value in fields.items()
               if value and not storage.is_s3(value) and "://" not in value]
    return with_updates(cfg, updates) if updates else cfg


def with_demo_world(cfg: Config) -> Config:
    """Fill the data and CLIP paths from the Foggy-Shapes world when no target images are given.

    Builds the world on first use (cached under ``data.world_cache``).
    """
    if cfg.data.target_images:
        return cfg
    from coin_ray.world.build import build_world

    world = build_world(cfg.data.world, cfg.data.world_cache or None, seed=cfg.seed,
                        cloud_confusion=cfg.data.cloud_confusion)
    overrides = [f"data.target_images={world.target_train_images}",
                 f"data.val_images={world.target_val_images}",
                 f"data.val_annotations={world.target_val_json}",
                 "data.val_format=coco", f"data.style={world.style}"]
    if not cfg.clip.model:
        overrides.append(f"clip.model={world.clip_dir}")
    cfg = with_updates(cfg, overrides)
    return cfg


@contextmanager
def demo_cloud(cfg: Config) -> Iterator[Config]:
    """Serve the Foggy-Shapes stand-in cloud detector on 127.0.0.1 while collecting.

    Only when the run uses the built-in world with the ``http`` backend and no URL;
    otherwise ``cfg`` passes through unchanged.
    """
    world = demo_world(cfg)
    if cfg.cloud.backend != "http" or cfg.cloud.url or world is None:
        yield cfg
        return
    from coin_ray.serve import Knobs, checkpoint_model_name, start_server
    from coin_ray.world.cloud_standin import StandInCloudDetector

    # The model name keys the answer cache: name the weights, so a rebuilt stand-in is asked anew.
    server = start_server(StandInCloudDetector.load(world.cloud_detector),
                          Knobs(latency_s=DEMO_CLOUD_LATENCY_S, rps_limit=DEMO_CLOUD_RPS),
                          model_name=checkpoint_model_name(str(world.cloud_detector)))
    log.info("serving the Foggy-Shapes stand-in cloud detector at %s", server.url)
    try:
        yield with_updates(cfg, [f"cloud.url={server.url}"])
    finally:
        stats = server.stats()
        log.info("stand-in cloud served %s requests", stats.get("requests", stats))
        server.stop()


def demo_world(cfg: Config):
    """The Foggy-Shapes world ``cfg`` runs on (after ``with_demo_world``), or None."""
    from coin_ray.world.build import build_world, world_root

    root = str(world_root(cfg.data.world, cfg.seed, cfg.data.world_cache or None, cfg.data.cloud_confusion))
    if not str(cfg.data.target_images).startswith(root + "/"):  # not demo-0-confusion0.5 for demo-0
        return None
    return build_world(cfg.data.world, cfg.data.world_cache or None, seed=cfg.seed,
                       cloud_confusion=cfg.data.cloud_confusion)


def target_uris(cfg: Config) -> list[str]:
    """The unlabeled target images (capped by ``data.max_images``), sorted."""
    uris = list_image_folder(cfg.data.target_images)
    return uris[: cfg.data.max_images] if cfg.data.max_images else uris


def val_split(cfg: Config) -> LabelledSplit | None:
    """The labelled target split used for the metric, or None when the user has none."""
    if not cfg.data.val_annotations:
        return None
    return load_labelled(cfg.data.val_format, cfg.data.val_annotations, cfg.data.val_images,
                         cfg.data.categories)


def stages_to_run(run: RunDir, requested: list[str] | None) -> list[str]:
    """Requested stages are forced to re-run; otherwise every stage not yet in the manifest."""
    if requested:
        for stage in requested:
            run.forget(stage)
        return [s for s in STAGES if s in requested]
    return [s for s in STAGES if not run.is_done(s)]


def run_adaptation(cfg: Config, stages: list[str] | None = None, num_cpus: int | None = None) -> AdaptationResult:
    """Run (or resume) every unfinished stage of the adaptation described by ``cfg``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = with_demo_world(with_absolute_paths(cfg))
    run = RunDir(storage.join(cfg.storage, cfg.resolved_run_id()))
    storage.write_text(run.path("config.yaml"), to_yaml(cfg))
    init_ray(num_cpus or cfg.ray.num_cpus or None)
    result = AdaptationResult(run.root)
    from coin_ray.ray import stages as stage_fns

    for stage in stages_to_run(run, stages):
        start = time.monotonic()
        print(f"[coin-ray] stage {stage} ...", flush=True)
        info = getattr(stage_fns, f"stage_{stage}")(cfg, run)
        run.mark_done(stage, seconds=round(time.monotonic() - start, 1), **(info or {}))
        result.stages_run.append(stage)
        print(f"[coin-ray] stage {stage} done in {time.monotonic() - start:.0f} s", flush=True)
    table = run.path("report", "table1.md")
    if storage.exists(table):
        result.table_markdown = storage.read_text(table)
        print("\n" + result.table_markdown)
        print(f"report: {run.path('report')}")
    return result
