"""The task side of ``python -m coin_ray.serve --protocol dds``: DDS V2 task + poll over any backend.

A loopback stand-in for the DeepDataSpace V2 API (the shapes ``coin_ray.cloud.dds`` speaks),
so the ``dds`` backend, its task bookkeeping and the chaos benchmark run against a real
server without the vendor:

    POST /v2/task/<kind>/detection   header Token, Idempotency-Key
        -> {"code": 0, "data": {"task_uuid"}}; the same key returns the same task
    GET  /v2/task_status/<uuid>      -> {"code": 0, "data": {"status": "running" | "success"
        | "failed", "result": {"objects": [{"bbox", "category", "score"}]}}}; 404 when unknown

Each task takes ``Knobs.task_s`` seconds (times U(0.5, 1.5)) and fails with probability
``Knobs.fail_task``. ``TaskBook`` counts creations per image (SHA-256 of the uploaded
bytes), which is what a paying user cares about: ``duplicate_creations`` is the number of
tasks created beyond the first for the same image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coin_ray.cloud.base import CloudAnswer, at_least, request_threshold
from coin_ray.data.images import ImageDecodeError, decode_image

log = logging.getLogger("coin_ray.serve")


@dataclass
class _Task:
    image_sha: str
    ready_at: float
    failed: bool
    objects: list[dict[str, Any]] = field(default_factory=list)


class TaskBook:
    """Tasks by id, idempotency keys, and creation counters; thread-safe.

    ``max_tasks`` > 0 keeps only the newest that many tasks (a long-running server's
    memory stays bounded; clients poll soon after creating); 0 keeps every task.
    """

    def __init__(self, seed: int = 0, max_tasks: int = 0) -> None:
        self.lock = threading.Lock()
        self.max_tasks = max_tasks
        self.tasks: dict[str, _Task] = {}
        self.by_key: dict[str, str] = {}
        self.creations: Counter = Counter()  # image sha -> tasks created for it
        self.replays = 0  # creations answered with an existing task (same Idempotency-Key)
        self.polls = 0
        self.rng = random.Random(seed)

    def existing(self, idempotency_key: str) -> str | None:
        """The task already created under ``idempotency_key``, if any (counted as a replay)."""
        with self.lock:
            task = self.by_key.get(idempotency_key) if idempotency_key else None
            self.replays += int(task is not None)
            return task

    def create(self, idempotency_key: str, image_sha: str, task_s: float, fail_task: float,
               objects: list[dict[str, Any]]) -> str:
        """Register a new task (or return the one already under ``idempotency_key``)."""
        with self.lock:
            if idempotency_key and idempotency_key in self.by_key:
                self.replays += 1
                return self.by_key[idempotency_key]
            task_id = uuid.UUID(int=self.rng.getrandbits(128)).hex
            ready = time.time() + task_s * self.rng.uniform(0.5, 1.5)
            failed = self.rng.random() < fail_task
            self.tasks[task_id] = _Task(image_sha, ready, failed, objects)
            if idempotency_key:
                self.by_key[idempotency_key] = task_id
            self.creations[image_sha] += 1
            self._forget_oldest()
            return task_id

    def _forget_oldest(self) -> None:
        """Drop the oldest tasks over ``max_tasks`` and their idempotency keys (lock held)."""
        while self.max_tasks and len(self.tasks) > self.max_tasks:
            gone = next(iter(self.tasks))  # dicts keep insertion order: the oldest first
            del self.tasks[gone]
            for key in [k for k, t in self.by_key.items() if t == gone]:
                del self.by_key[key]

    def status(self, task_id: str) -> dict[str, Any] | None:
        """The ``data`` of a status reply, or None for an unknown task."""
        with self.lock:
            self.polls += 1
            task = self.tasks.get(task_id)
        if task is None:
            return None
        if time.time() < task.ready_at:
            return {"status": "running"}
        if task.failed:
            return {"status": "failed", "error": "injected task failure"}
        return {"status": "success", "result": {"objects": task.objects}}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"creations": sum(self.creations.values()),
                    "images_created": len(self.creations),
                    "duplicate_creations": sum(n - 1 for n in self.creations.values()),
                    "idempotent_replays": self.replays, "polls": self.polls,
                    "tasks_failed": sum(t.failed for t in self.tasks.values())}


def parse_task_request(body: dict[str, Any]) -> tuple[bytes, list[str], float]:
    """(image bytes, prompts, bbox_threshold: 0 when absent) of a create request; raises
    ValueError when malformed (a threshold outside [0, 1] included)."""
    try:
        data = base64.b64decode(str(body["image"]).split(",", 1)[1], validate=True)
        prompts = [p.strip() for p in str(body["prompt"]["text"]).split(".") if p.strip()]
        threshold = body.get("bbox_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise ValueError("bbox_threshold is not a number")
        threshold = request_threshold(threshold)
    except (KeyError, IndexError, TypeError, ValueError) as err:  # binascii.Error is a ValueError
        raise ValueError(f"bad task request: {err}") from None
    return data, prompts, threshold


def answer_to_objects(answer: CloudAnswer) -> list[dict[str, Any]]:
    """A backend answer as V2 ``objects`` (bbox xyxy pixels of the uploaded image)."""
    boxes = np.asarray(answer.boxes, np.float32).reshape(-1, 4).tolist()
    return [{"bbox": b, "category": p, "score": float(s)}
            for b, p, s in zip(boxes, answer.phrases, np.asarray(answer.scores).reshape(-1))]


def image_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _authorised(handler: Any) -> bool:
    token = handler.server.knobs.token
    given = handler.headers.get("Token", "")
    return not token or hmac.compare_digest(given.encode(), token.encode())


def handle_create(handler: Any) -> None:
    """POST /v2/task/<kind>/detection on ``handler`` (a ``coin_ray.serve`` request handler).

    Order: count, auth (401), rate limit (429), injected 500/429/malformed (no task), then
    the task is created (or found by its Idempotency-Key); an injected hang comes after
    creation, so the client never sees a task that exists, as after a lost reply.
    """
    server = handler.server
    handler._count(detect=True)
    body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
    if not _authorised(handler):
        return handler._json(401, {"code": 401, "msg": "missing or wrong token"})
    wait = server.admit()
    if wait is not None:
        return handler._json(429, {"code": 429, "msg": "rate limit"},
                             {"Retry-After": server.retry_after(wait)})
    fault = server.draw_fault()
    if fault != "hang" and handler._inject_fault(fault):
        return None
    key = handler.headers.get("Idempotency-Key", "")
    task_id = server.tasks.existing(key)
    if task_id is None:
        try:
            task_id = _new_task(server, key, json.loads(body))
        except ValueError as err:
            return handler._json(400, {"code": 400, "msg": str(err)[:300]})
        except Exception as err:  # a backend failure is the server's 500, never a crash
            log.exception("backend failed")
            return handler._json(500, {"code": 500, "msg": f"backend failed: {type(err).__name__}"})
    if fault == "hang":
        handler._inject_fault(fault)
        return None
    return handler._json(200, {"code": 0, "msg": "ok", "data": {"task_uuid": task_id}})


def _new_task(server: Any, key: str, body: Any) -> str:
    """Decode the upload, run the backend now (the answer waits for the task's time)."""
    data, prompts, threshold = parse_task_request(body)
    try:
        image = decode_image(data, "request")
    except ImageDecodeError as err:
        raise ValueError(str(err)) from None
    unknown = getattr(server.backend, "unknown_prompts", lambda _: [])(prompts)
    if unknown:  # a 400 naming them, not a task that answers nothing
        raise ValueError(f"unknown categories: {', '.join(unknown)} (this detector knows: "
                         f"{', '.join(getattr(server.backend, 'categories', []))})")
    time.sleep(server.knobs.latency_s)
    answer = at_least(server.backend.detect(data, image, prompts), threshold)
    return server.tasks.create(key, image_sha(data), server.knobs.task_s, server.knobs.fail_task,
                               answer_to_objects(answer))


def handle_status(handler: Any, task_id: str) -> None:
    """GET /v2/task_status/<uuid>: running, success with objects, failed, or 404 when unknown."""
    if not _authorised(handler):
        return handler._json(401, {"code": 401, "msg": "missing or wrong token"})
    if handler._inject_fault(handler.server.draw_fault()):
        return None
    status = handler.server.tasks.status(task_id)
    if status is None:
        return handler._json(404, {"code": 404, "msg": f"task {task_id} not found"})
    return handler._json(200, {"code": 0, "msg": "ok", "data": status})
