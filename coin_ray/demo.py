"""The built-in Foggy-Shapes demo, as seen by a run: the only door from the product to
``coin_ray.world`` (besides ``coin_ray.serve``'s stand-in backend).

With an empty ``data.target_images`` a run uses the Foggy-Shapes world, built (or reused
from its cache) here, and its stand-in cloud detector is served over HTTP on 127.0.0.1 for
the collection stage, exactly as a user's self-hosted detector would be.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from coin_ray.config import CloudConfig, Config, with_updates
from coin_ray.serve import Knobs, checkpoint_model_name, start_server
from coin_ray.world.build import MANIFEST, World, build_world, world_root
from coin_ray.world.cloud_standin import SCORE_FLOOR, StandInCloudDetector

log = logging.getLogger("coin_ray.pipeline")

# The demo's stand-in cloud: realistic latency and a rate limit the client must respect.
DEMO_CLOUD_LATENCY_S = 0.05
DEMO_CLOUD_RPS = 25.0


def with_demo_world(cfg: Config) -> Config:
    """Fill the data and CLIP paths from the Foggy-Shapes world when no target images are given.

    Builds the world on first use (cached under ``data.world_cache``). When the run will ask
    the world's own stand-in (``demo_cloud``: backend http, no URL), ``cloud.threshold`` is
    set to the stand-in's score floor (``SCORE_FLOOR``, 0.05), the threshold every demo
    figure was collected at, since the server honours a request's threshold. Rule: a
    ``cloud.threshold`` left at its default (0.25) is taken as unset and replaced; any other
    value is the user's and is kept (so asking the stand-in at exactly 0.25 is not possible).
    """
    if cfg.data.target_images:
        return cfg
    world = build_world(cfg.data.world, cfg.data.world_cache or None, seed=cfg.seed,
                        cloud_confusion=cfg.data.cloud_confusion)
    overrides = [f"data.target_images={world.target_train_images}",
                 f"data.val_images={world.target_val_images}",
                 f"data.val_annotations={world.target_val_json}",
                 "data.val_format=coco", f"data.style={world.style}"]
    if not cfg.clip.model:
        overrides.append(f"clip.model={world.clip_dir}")
    if asks_the_standin(cfg) and cfg.cloud.threshold == CloudConfig().threshold:
        overrides.append(f"cloud.threshold={SCORE_FLOOR}")
    cfg = with_updates(cfg, overrides)
    return cfg


def asks_the_standin(cfg: Config) -> bool:
    """Whether ``cfg``'s collection asks the world's stand-in served by ``demo_cloud``."""
    return cfg.cloud.backend == "http" and not cfg.cloud.url


def demo_world(cfg: Config) -> World | None:
    """The Foggy-Shapes world ``cfg`` runs on (after ``with_demo_world``), or None."""
    root = str(world_root(cfg.data.world, cfg.seed, cfg.data.world_cache or None, cfg.data.cloud_confusion))
    if not str(cfg.data.target_images).startswith(root + "/"):  # not demo-0-confusion0.5 for demo-0
        return None
    return build_world(cfg.data.world, cfg.data.world_cache or None, seed=cfg.seed,
                       cloud_confusion=cfg.data.cloud_confusion)


def unbuilt_demo_world(cfg: Config) -> str | None:
    """Where the demo world ``cfg`` would use lies, when it is not built yet; else None.

    None as well when ``cfg`` names its own target images. Never builds anything.
    """
    if cfg.data.target_images:
        return None
    root = world_root(cfg.data.world, cfg.seed, cfg.data.world_cache or None, cfg.data.cloud_confusion)
    return None if (root / MANIFEST).exists() else str(root)


PLUMBING_NOTE = ("data.world=tiny is a plumbing check: a few steps on a handful of images show that every "
                 "stage runs, not how well COIN adapts (zeros are expected here); data.world=demo "
                 "(./scripts/demo) gives a quality result")


def is_plumbing_check(cfg: Config) -> bool:
    """Whether ``cfg`` (after ``with_demo_world``) runs on the built-in tiny world, whose
    Table 1 says only that the stages ran."""
    if cfg.data.world != "tiny":
        return False
    root = world_root(cfg.data.world, cfg.seed, cfg.data.world_cache or None, cfg.data.cloud_confusion)
    return str(cfg.data.target_images).startswith(str(root) + "/")


@contextmanager
def demo_cloud(cfg: Config) -> Iterator[Config]:
    """Serve the Foggy-Shapes stand-in cloud detector on 127.0.0.1 while collecting.

    Only when the run uses the built-in world with the ``http`` backend and no URL;
    otherwise ``cfg`` passes through unchanged.
    """
    world = demo_world(cfg)
    if not asks_the_standin(cfg) or world is None:
        yield cfg
        return
    # The model name keys the answer cache: name the weights, so a rebuilt stand-in is asked anew.
    server = start_server(StandInCloudDetector.load(world.cloud_detector),
                          Knobs(latency_s=DEMO_CLOUD_LATENCY_S, rps_limit=DEMO_CLOUD_RPS),
                          model_name=checkpoint_model_name(str(world.cloud_detector)))
    log.info("serving the Foggy-Shapes stand-in cloud detector at %s", server.url)
    try:
        # The stand-in allows DEMO_CLOUD_RPS; the default client limit (10/s) would leave it idle.
        rps = DEMO_CLOUD_RPS if cfg.cloud.requests_per_second == CloudConfig().requests_per_second \
            else cfg.cloud.requests_per_second
        yield with_updates(cfg, [f"cloud.url={server.url}", f"cloud.requests_per_second={rps}"])
    finally:
        stats = server.stats()
        log.info("stand-in cloud served %s requests", stats.get("requests", stats))
        server.stop()


def describe_world(size: str, seed: int = 0) -> list[str]:
    """Build (or find, when cached) the Foggy-Shapes world of ``size`` and ``seed`` without
    running anything on it: lines naming its folder, its stand-in cloud checkpoint and the
    categories that stand-in can answer (what ``coin-ray world`` prints)."""
    built = build_world(size, seed=seed)
    categories = StandInCloudDetector.load(built.cloud_detector).categories
    return [f"world: {built.root}", f"stand-in checkpoint: {built.cloud_detector}",
            f"it answers: {', '.join(categories)}"]
