"""The exported detector on Ray Serve: replicas with dynamic request batching, speaking the
project's ``http`` protocol (and, with ``ServeSettings.dds``, the DDS V2 task + poll shapes).

    url = serve_detector("runs/<id>/export", ServeSettings(max_batch_size=8), port=8000)

Everything a request needs checked, decoded or answered is a plain function of
``coin_ray.deploy`` (routes, token, caps, prompts, answers); this module only wires them
into Ray Serve:

- ``DetectorReplica`` loads the export once per replica (ONNX by default, TorchScript as
  fallback) and detects through one ``@serve.batch`` method: concurrent requests are
  stacked into one detector call of up to ``max_batch_size`` images, waiting at most
  ``batch_wait_s`` for a batch to fill. The detector runs in a worker thread, so the
  replica's event loop keeps taking requests (and health checks) meanwhile.
- ``TaskStore`` (dds only, one replica, no CPU) keeps the DDS tasks, so that a status poll
  finds its task whichever detector replica created it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter

import numpy as np
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from coin_ray.cloud import dds_serve
from coin_ray.cloud.http_backend import answer_to_json
from coin_ray.deploy import (ModelCard, RequestError, ServeSettings, answer_for, authorised, http_request,
                             model_card, presented_token, route, task_request)
from coin_ray.export import load_exported
from coin_ray.train.data import image_tensor

log = logging.getLogger("coin_ray.serve")

APP_NAME = "coin-ray-detector"
MAX_TASKS = 10_000  # DDS tasks a server remembers (the oldest are forgotten first)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class TaskStore:
    """The DDS task book shared by every detector replica."""

    def __init__(self) -> None:
        # Task ids must not be guessable by other clients: a fresh random seed per server.
        self.book = dds_serve.TaskBook(seed=secrets.randbits(64), max_tasks=MAX_TASKS)

    def existing(self, idempotency_key: str) -> str | None:
        return self.book.existing(idempotency_key)

    def create(self, idempotency_key: str, image_sha: str, objects: list[dict]) -> str:
        # Tasks finish at creation (the detection already ran): no delay, never failed.
        return self.book.create(idempotency_key, image_sha, 0.0, 0.0, objects)

    def status(self, task_id: str) -> dict | None:
        return self.book.status(task_id)


@serve.deployment
class DetectorReplica:
    """One replica: the exported detector behind the routes of ``coin_ray.deploy``."""

    def __init__(self, export_uri: str, card: ModelCard, settings: ServeSettings, tasks=None) -> None:
        torch.set_num_threads(settings.threads_per_replica)
        self.detector = load_exported(export_uri, runtime=card.runtime, num_threads=settings.threads_per_replica)
        self.card, self.settings, self.tasks = card, settings, tasks
        self.requests: Counter = Counter()  # "<route> <status>" -> count, this replica's
        self.detect_batch.set_max_batch_size(settings.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # replaced by the settings in __init__
    async def detect_batch(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Decoded images (H, W, 3) uint8 of concurrent requests -> their detections, one call."""
        return await asyncio.to_thread(detect_images, self.detector, images)

    async def __call__(self, request: Request) -> JSONResponse:
        path = relative_path(request)
        dds, name = path.startswith("/v2/"), "unrouted"
        try:
            name = route(request.method, path, self.settings.dds)
            if name != "health" and not authorised(presented_token(request.headers, dds), self.settings.token_sha256):
                raise RequestError(401, "missing or wrong token")
            body = await read_capped(request, self.settings.max_request_bytes) if request.method == "POST" else b""
            status, reply = await getattr(self, f"_{name}")(body, path, request)
        except RequestError as err:
            status, reply = err.status, ({"code": err.status, "msg": err.message} if dds else {"error": err.message})
        except Exception as err:  # noqa: BLE001 (nothing a request sends may take the replica down)
            log.exception("request %s %s failed", request.method, path)
            status = 500
            reply = {"code": 500, "msg": f"server error: {type(err).__name__}"} if dds \
                else {"error": f"server error: {type(err).__name__}"}
        self.requests[f"{name} {status}"] += 1
        return JSONResponse(reply, status_code=status)

    async def _health(self, body: bytes, path: str, request: Request) -> tuple[int, dict]:
        return 200, self.card.to_json()

    async def _model(self, body: bytes, path: str, request: Request) -> tuple[int, dict]:
        settings = {k: v for k, v in vars(self.settings).items() if k != "token_sha256"}
        return 200, {**self.card.to_json(), "settings": settings, "token": bool(self.settings.token_sha256),
                     "replica_requests": dict(self.requests)}

    async def _detect(self, body: bytes, path: str, request: Request) -> tuple[int, dict]:
        wanted = http_request(body, self.card.categories, self.settings)
        found = await self.detect_batch(wanted.image)
        answer = answer_for(found, wanted, self.card.categories)
        return 200, answer_to_json(answer, self.card.categories, self.card.model_name)

    async def _task(self, body: bytes, path: str, request: Request) -> tuple[int, dict]:
        key = request.headers.get("idempotency-key", "")
        task_id = await self.tasks.existing.remote(key) if key else None
        if task_id is None:  # a retried creation is answered with its task, not detected again
            wanted = task_request(body, self.card.categories, self.settings)
            found = await self.detect_batch(wanted.image)
            objects = dds_serve.answer_to_objects(answer_for(found, wanted, self.card.categories))
            task_id = await self.tasks.create.remote(key, wanted.image_sha256, objects)
        return 200, {"code": 0, "msg": "ok", "data": {"task_uuid": task_id}}

    async def _status(self, body: bytes, path: str, request: Request) -> tuple[int, dict]:
        task_id = path.rsplit("/", 1)[-1]
        status = await self.tasks.status.remote(task_id)
        if status is None:
            raise RequestError(404, f"task {task_id} not found")
        return 200, {"code": 0, "msg": "ok", "data": status}


def detect_images(detector, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Run an exported detector (``coin_ray.export.load_exported``) on decoded (H, W, 3) uint8
    images in one call; per image {"boxes" (N,4) xyxy pixels, "labels", "scores", "probs"} as numpy."""
    found = detector.detect([image_tensor(img) for img in images])
    return [{key: value.numpy() for key, value in det.items()} for det in found]


def relative_path(request: Request) -> str:
    """The request's path below the application's route prefix ("/v1/detect" under "/a")."""
    path, prefix = request.scope.get("path", "/"), request.scope.get("root_path", "").rstrip("/")
    return (path[len(prefix):] or "/") if prefix and path.startswith(prefix) else path


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"request body of {declared} bytes is over the cap of {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"request body over the cap of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def deployment_options(settings: ServeSettings) -> dict:
    """Ray Serve options of the detector deployment: resources, concurrency, replicas."""
    options = {"ray_actor_options": {"num_cpus": settings.cpus_per_replica},
               # A replica holds a full batch and a queue behind it: below the clients in flight,
               # Serve's router backs off and retries (benchmarks/serve.py, unbatched at 32 clients:
               # 13.7 req/s with a cap of 16, 39.4 with 64).
               "max_ongoing_requests": max(4 * settings.max_batch_size, 64)}
    if settings.min_replicas == settings.max_replicas:
        options["num_replicas"] = settings.min_replicas
    else:
        options["autoscaling_config"] = {"min_replicas": settings.min_replicas,
                                         "max_replicas": settings.max_replicas,
                                         "target_ongoing_requests": settings.target_ongoing_requests}
    return options


def detector_app(export_uri: str, settings: ServeSettings, card: ModelCard | None = None):
    """The Ray Serve application serving ``export_uri`` (not yet running)."""
    settings.check()
    card = card or model_card(export_uri, settings.runtime)
    tasks = TaskStore.bind() if settings.dds else None
    return DetectorReplica.options(**deployment_options(settings)).bind(export_uri, card, settings, tasks)


def serve_detector(export_uri: str, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
                   name: str = APP_NAME, route_prefix: str = "/") -> str:
    """Start Serve's HTTP proxy on ``host:port`` (if not yet started) and run the detector
    application under ``route_prefix``; returns its base URL once it is ready. Ray must be
    initialised; ``serve.delete(name)`` or ``serve.shutdown()`` stops it."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(detector_app(export_uri, settings), name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"
