"""Stage 0 on Ray Data: every target image to the cloud detector once, every box to CLIP.

    summary = run_collection(cfg, image_uris, RunDir("runs/<run_id>"))

Plan: from_items(uris) -> actor pool of ``_CloudCaller`` (threads per actor overlap the
API's latency; every request passes the cluster-wide limiter; answers are cached before
use) -> actor pool of ``_ClipScorer`` -> rows streamed back to the driver, which shows
progress and writes ``cloud.parquet``, ``clip.parquet`` (DETECTION_SCHEMA),
``summary.json`` and the cloud labels as COCO JSON (``cloud_coco.json`` +
``cloud_coco_results.json``). Per-row failures become error records; only refused credentials stop
the run (``CollectionStopped``, naming the backend and the token's env var).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray

from coin_ray import storage
from coin_ray.cloud.backends import NEEDS_TOKEN, build_backend, client_for, model_id
from coin_ray.cloud.budget import (SpendLedger, adopt_run_ledger, budget_line, budget_summary, call_cap,
                                   spend_folder)
from coin_ray.cloud.cache import AnswerCache
from coin_ray.cloud.errors import UNKNOWN_CATEGORIES, AuthError, Secret, read_token
from coin_ray.cloud.export_coco import export_coco
from coin_ray.cloud.label import RunTally, label_image
from coin_ray.cloud.mapping import CategoryMap
from coin_ray.config import Config, from_dict, to_dict
from coin_ray.data.images import decode_image, image_id_from_uri
from coin_ray.location import cache_location, legacy_cache_location
from coin_ray.preflight import stop_if_unreachable
from coin_ray.progress import ProgressLine, failure_lines
from coin_ray.ray.limiter import COLLECTION_OVER, ClusterLimiter
from coin_ray.run import RunDir
from coin_ray.schema import Detections, records_to_table

log = logging.getLogger(__name__)

CLOUD_CPUS = 0.25  # callers wait on the network, not the CPU
# Batches each caller actor works on at once: while one batch waits for its slowest image,
# the others keep requests coming (the limiter, not this, bounds what reaches the API).
BATCHES_PER_ACTOR = 4


class CollectionStopped(RuntimeError):
    """The backend refused the credentials; nothing more will be asked."""


class CategoriesUnknown(CollectionStopped):
    """The detector cannot answer some of the run's prompts (a setting to change, exit 2)."""


def _category_map(cfg: Config) -> CategoryMap:
    return CategoryMap.build(cfg.data.categories, cfg.cloud.prompts, cfg.cloud.label_map)


class _CloudCaller:
    """Actor: asks the backend about a batch of images, ``threads`` at a time."""

    def __init__(self, cfg: dict, token: Secret, limiter: ClusterLimiter, cache_roots: tuple[str, ...],
                 threads: int, keep_bytes: bool, budget: "_ClusterBudget | None" = None) -> None:
        cfg_ = from_dict(cfg)
        c = cfg_.cloud
        self.cmap = _category_map(cfg_)
        backend = build_backend(c, cfg_.data.categories, token, cfg_.data.target_images)
        cache = AnswerCache(cache_roots[0], backend.name, cfg_.data.categories, also_read=cache_roots[1:])
        self.client = client_for(c, backend, self.cmap.prompt_list(), cache=cache,
                                 limiter=limiter, budget=budget, seed=cfg_.seed)
        self.pool = ThreadPoolExecutor(max_workers=threads)
        self.keep_bytes = keep_bytes  # only CLIP needs the images again

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        done = list(self.pool.map(lambda a: label_image(self.client, self.cmap, a[0], a[1]),
                                  zip(batch["uri"].tolist(), batch["image_id"].tolist())))
        out = {"cloud": [json.dumps(d.record.to_row()) for d in done],
               "calls": [d.calls for d in done], "cache_hit": [d.cache_hit for d in done],
               "reason": [d.reason for d in done], "unfinished": [d.unfinished for d in done],
               "dropped": [json.dumps(dict(d.dropped)) for d in done]}
        if self.keep_bytes:
            out["image_bytes"] = [d.image_bytes for d in done]
        return out


class _ClusterBudget:
    """Every caller's handle to one ``SpendLedger`` actor (the spend cap is cluster-wide)."""

    def __init__(self, actor: "ray.actor.ActorHandle") -> None:
        self.actor = actor

    def charge(self) -> bool:
        try:
            return ray.get(self.actor.charge.remote())
        except ray.exceptions.RayActorError:  # the driver killed the ledger: the collection is over
            raise AuthError("stopped", COLLECTION_OVER) from None


class _ClipScorer:
    """Actor: CLIP zero-shot probabilities for every cloud box of a batch."""

    def __init__(self, cfg: dict) -> None:
        # Imported here, in the scorer's own actors: torch and transformers would add seconds
        # of start-up to every cloud caller, which only waits on the network.
        from coin_ray.cloud.clip_score import ClipBoxScorer

        cfg_ = from_dict(cfg)
        self.scorer = ClipBoxScorer(cfg_.clip.model, cfg_.data.categories,
                                    templates=cfg_.clip.templates, style=cfg_.data.style,
                                    prompts=cfg_.cloud.prompts, batch_size=cfg_.clip.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        clip_rows = []
        for row, data in zip(batch["cloud"].tolist(), batch["image_bytes"].tolist()):
            cloud = Detections.from_row(json.loads(row))
            image = decode_image(data, cloud.uri) if data and not cloud.error and len(cloud) else None
            clip_rows.append(json.dumps(self.scorer.score(cloud, image).to_row()))
        out = {k: list(v) for k, v in batch.items() if k != "image_bytes"}
        out["clip"] = clip_rows
        return out


class _Progress:
    """Images done / total, rate, ETA and errors on stderr (``coin_ray.progress``)."""

    def __init__(self, total: int, every_s: float = 5.0) -> None:
        self.line = ProgressLine("collect", total, unit="image", every_s=every_s)

    def update(self, tally: RunTally, force: bool = False) -> None:
        self.line.update(tally.images, extra=f"calls {tally.calls}  cache hits {tally.cache_hits}  "
                                              f"errors {tally.errors}  skipped (failed before) {tally.skipped_failed}  "
                                              f"not asked (budget) {tally.not_asked_budget}", force=force)


def _plan(cfg: Config, image_uris: list[str], limiter: ClusterLimiter, token: Secret,
          with_clip: bool, budget: _ClusterBudget | None = None) -> "ray.data.Dataset":
    c = cfg.cloud
    root = cfg.data.target_images
    items = [{"uri": u, "image_id": image_id_from_uri(u, root)} for u in image_uris]
    threads = math.ceil(c.max_in_flight / c.num_actors) + 1
    cache_roots = (cache_location(cfg), legacy_cache_location(cfg))
    ds = ray.data.from_items(items).map_batches(
        _CloudCaller, batch_size=threads, num_cpus=CLOUD_CPUS,
        fn_constructor_kwargs={"cfg": to_dict(cfg), "token": token, "limiter": limiter,
                               "cache_roots": cache_roots, "threads": BATCHES_PER_ACTOR * threads,
                               "keep_bytes": with_clip, "budget": budget},
        compute=ray.data.ActorPoolStrategy(size=c.num_actors,
                                           max_concurrent_calls_per_actor=BATCHES_PER_ACTOR,
                                           enable_true_multi_threading=True))
    if not with_clip:
        return ds
    return ds.map_batches(_ClipScorer, batch_size=cfg.clip.batch_size, num_cpus=1,
                          fn_constructor_kwargs={"cfg": to_dict(cfg)},
                          compute=ray.data.ActorPoolStrategy(size=cfg.clip.num_actors))


def _drain(ds: "ray.data.Dataset", total: int, url: str = "") -> tuple[list[Detections], list[Detections], RunTally]:
    cloud, clip, tally = [], [], RunTally()
    progress = _Progress(total)
    for n, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
        if n == 0:
            stop_if_unreachable([str(r) for r in batch["reason"].tolist()], url)
        for i, row in enumerate(batch["cloud"].tolist()):
            record = Detections.from_row(json.loads(row))
            cloud.append(record)
            if "clip" in batch:
                clip.append(Detections.from_row(json.loads(batch["clip"][i])))
            tally.add(record, int(batch["calls"][i]), bool(batch["cache_hit"][i]),
                      str(batch["reason"][i]), json.loads(batch["dropped"][i]),
                      bool(batch["unfinished"][i]))
        progress.update(tally)
    progress.update(tally, force=True)
    return cloud, clip, tally


def run_collection(cfg: Config, image_uris: list[str], run: RunDir, *,
                   with_clip: bool = True) -> dict[str, Any]:
    """Collect cloud detections (and CLIP scores of their boxes) for ``image_uris``.

    Writes ``run.cloud_detections`` and ``run.clip_scores`` (DETECTION_SCHEMA, sorted by uri;
    boxes xyxy pixels; cloud probs class-only K+1, clip probs K+1 with background 0),
    ``run.collect_summary`` and ``run.cloud_coco`` (+ _results.json). Needs a running Ray (``ray.init``); the limiter actor is killed at the end.

    Raises:
        CollectionStopped: the backend refused the credentials.
        CategoriesUnknown: the detector cannot answer some prompts (the first request says so).
    """
    c = cfg.cloud
    if with_clip and not cfg.clip.model:
        raise ValueError("clip.model is empty: name a CLIP checkpoint (hub id, folder or s3://) "
                         "or pass with_clip=False for a label-only run")
    token = read_token(c.token_env, c.backend, c.backend in NEEDS_TOKEN)
    limiter = ClusterLimiter.create(cfg.resolved_run_id(), c.requests_per_second,
                                    c.max_in_flight, lease_s=4 * c.timeout_s + c.poll_deadline_s)
    cap = call_cap(c.max_calls, c.max_spend, c.price_per_call)
    ledger = ray.remote(num_cpus=0)(SpendLedger).remote(_ledger_folder(cfg, run), cap, cfg.resolved_run_id())
    start = time.monotonic()
    try:
        plan = _plan(cfg, image_uris, limiter, token, with_clip, _ClusterBudget(ledger))
        cloud, clip, tally = _drain(plan, len(image_uris), c.url)
        limiter_stats = limiter.stats()
        spent = ray.get(ledger.totals.remote())
    except Exception as err:
        stopped = _stop_reason(limiter)
        if stopped:
            kind = CategoriesUnknown if stopped.startswith(UNKNOWN_CATEGORIES) else CollectionStopped
            raise kind(stopped) from None
        raise err
    finally:
        limiter.kill()
        ray.kill(ledger)
    seconds = time.monotonic() - start
    cloud.sort(key=lambda r: r.uri)
    clip.sort(key=lambda r: r.uri)
    storage.write_parquet(records_to_table(cloud), run.cloud_detections)
    if with_clip:
        storage.write_parquet(records_to_table(clip), run.clip_scores)
    # Label-only users want the labels without training: COCO JSON next to the Parquet.
    export_coco(cloud, cfg.data.categories, run.cloud_coco,
                root=cfg.data.target_images)
    summary = {**tally.as_dict(c.price_per_call), "backend": c.backend, "model": _model_name(cfg, token),
               "seconds": round(seconds, 3), "calls_per_s": round(tally.calls / max(seconds, 1e-9), 3),
               "limiter_grants": limiter_stats["granted"]}
    summary["budget"] = budget_summary(spent, c.price_per_call, c.max_spend)
    if cap:
        print(budget_line(summary["budget"], tally.not_asked_budget), file=sys.stderr, flush=True)
    for line in failure_lines("collect", tally.failures, tally.failed, run.cloud_detections):
        print(line, file=sys.stderr, flush=True)
    log.info("collection: %s", json.dumps(summary))
    _warn_if_nothing(summary)  # after the log line: the console shows the warning once
    storage.write_text(run.collect_summary, json.dumps(summary, indent=2))
    return summary


def _ledger_folder(cfg: Config, run: RunDir) -> str:
    """The spend ledger of ``cfg``'s backend in the answer cache; a ledger an older version
    kept in ``run`` is counted there first."""
    folder = spend_folder(cache_location(cfg), cfg.cloud.backend)
    adopt_run_ledger(run.collect_spend, folder, f"from-{cfg.resolved_run_id()}")
    return folder


def _model_name(cfg: Config, token: Secret) -> str:
    """The model the answers came from, as the cache keys name it (for ``http``: the name
    the server reports, not its possibly temporary URL)."""
    c = cfg.cloud
    try:
        return model_id(c, build_backend(c, cfg.data.categories, token, cfg.data.target_images))
    except Exception:  # noqa: BLE001 (a backend that cannot be rebuilt here: keep what the config says)
        return c.model or c.url


def _stop_reason(limiter: ClusterLimiter) -> str:
    try:
        return limiter.stats()["stopped"]
    except Exception:  # the limiter itself may be gone; then there is no stop reason
        return ""


def _warn_if_nothing(summary: dict[str, Any]) -> None:
    """autodistill users lost days to runs that silently labelled nothing: say it loudly."""
    if summary["images"] and summary["boxes"] == 0:
        summary["warning"] = (f"NOTHING WAS LABELLED: 0 boxes on {summary['images']} images "
                              f"({summary['errors']} errors, {summary['dropped_total']} labels "
                              "dropped as unmapped). Check prompts, label_map and threshold.")
        print("!" * 72 + f"\n{summary['warning']}\n" + "!" * 72, file=sys.stderr, flush=True)
