"""The ``dds`` backend: Grounding DINO 1.5/1.6 and DINO-X through DeepDataSpace's V2 REST API.

    1. POST <endpoint>/v2/task/grounding_dino/detection (or /v2/task/dinox/detection)
       headers Token: <token>, Idempotency-Key: <the same for every retry of one creation>
       {"model", "image": "data:<mime>;base64,...", "prompt": {"type": "text", "text": "car.bus"},
        "targets": ["bbox"], "bbox_threshold", "iou_threshold"} -> {"code": 0, "data": {"task_uuid"}}
    2. GET <endpoint>/v2/task_status/<uuid> until data.status is "success" or "failed",
       under an overall deadline (the service may never finish a task); 404 = task gone.
    result {"objects": [{"bbox": [x1, y1, x2, y2], "category": "car", "score": 0.6}]}

Creating is the paid call; ``create_task`` and ``poll_task`` are separate so the client can
keep a created task's id and poll it again after a timeout or a kill (``TaskBackend``).
Images are sent in the pipeline's frame (``imageio.upload_bytes``); those with a side above
1536 px are shrunk first and boxes scaled back. ``DDS_CLOUDAPI_ENDPOINT`` overrides the
endpoint (as the vendor SDK does).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from typing import Any

import numpy as np

from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.errors import PermanentError, Secret, TaskFailed, TaskGone, TransientError
from coin_ray.cloud.imageio import upload_bytes
from coin_ray.cloud.rest import request_json

DEFAULT_ENDPOINT = "https://api.deepdataspace.com"
MAX_SIDE = 1536
RETRY_CODE = 202001  # the service's "try again"


class DdsBackend:
    name = "dds"

    def __init__(self, *, token: Secret, model: str = "GroundingDino-1.5-Pro", endpoint: str = "",
                 threshold: float = 0.25, iou_threshold: float = 0.8, timeout_s: float = 30.0,
                 poll_deadline_s: float = 120.0, poll_interval_s: float = 1.0) -> None:
        self.token = token
        self.model_name = model or "GroundingDino-1.5-Pro"
        self.endpoint = (os.environ.get("DDS_CLOUDAPI_ENDPOINT") or endpoint
                         or DEFAULT_ENDPOINT).rstrip("/")
        self.threshold = threshold
        self.iou_threshold = iou_threshold
        self.timeout_s = timeout_s
        self.poll_deadline_s = poll_deadline_s
        self.poll_interval_s = poll_interval_s

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """Create a task and poll it; boxes in pixels of ``image`` (xyxy)."""
        handle = self.create_task(image_bytes, image, prompts, uuid.uuid4().hex)
        return self.poll_task(handle, image)

    def create_task(self, image_bytes: bytes, image: np.ndarray, prompts: list[str],
                    idempotency_key: str) -> dict:
        """POST the task (the paid call); returns {"task_uuid", "scale"}."""
        data, mime, scale = upload_bytes(image_bytes, image, MAX_SIDE)
        kind = "dinox" if self.model_name.lower().startswith("dino-x") else "grounding_dino"
        body = {"model": self.model_name,
                "image": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}",
                "prompt": {"type": "text", "text": ".".join(p.replace(".", " ") for p in prompts)},
                "targets": ["bbox"], "bbox_threshold": self.threshold,
                "iou_threshold": self.iou_threshold}
        headers = {"Token": self.token.reveal(), "Idempotency-Key": idempotency_key}
        reply = request_json("POST", f"{self.endpoint}/v2/task/{kind}/detection", body,
                             headers, self.timeout_s, self.token)
        task = _data(reply)
        if not isinstance(task.get("task_uuid"), str):
            raise TransientError("malformed body", "no task_uuid in the task reply")
        return {"task_uuid": task["task_uuid"], "scale": scale}

    def poll_task(self, handle: dict, image: np.ndarray) -> CloudAnswer:
        """Poll until success or failure within ``poll_deadline_s``; boxes scaled to ``image``."""
        return _objects_to_answer(self._poll(handle["task_uuid"]), float(handle["scale"]))

    def _poll(self, task_uuid: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.poll_deadline_s
        interval = self.poll_interval_s
        while True:
            try:
                reply = request_json("GET", f"{self.endpoint}/v2/task_status/{task_uuid}", None,
                                     {"Token": self.token.reveal()}, self.timeout_s, self.token)
                status = _data(reply)
                if status.get("status") == "success":
                    return status.get("result") or {}
                if status.get("status") == "failed":
                    raise TaskFailed("dds task failed", str(status.get("error", ""))[:200])
            except TransientError:
                pass  # a flaky status call is retried until the deadline, the task lives on
            except PermanentError as err:
                if err.reason == "http 404":
                    raise TaskGone("dds task gone", f"task {task_uuid} is unknown") from None
                raise
            if time.monotonic() + interval > deadline:
                raise TransientError("poll deadline",
                                     f"task not finished within {self.poll_deadline_s:g} s")
            time.sleep(interval)
            interval = min(interval * 1.5, 5.0)


def _data(reply: Any) -> dict[str, Any]:
    """The ``data`` of a V2 reply; non-zero codes become errors."""
    if not isinstance(reply, dict) or "code" not in reply:
        raise TransientError("malformed body", "reply without a code")
    if reply["code"] == RETRY_CODE:
        raise TransientError("dds retry", str(reply.get("msg", ""))[:200])
    if reply["code"] != 0:
        raise PermanentError(f"dds code {reply['code']}", str(reply.get("msg", ""))[:200])
    data = reply.get("data")
    if not isinstance(data, dict):
        raise TransientError("malformed body", "reply without data")
    return data


def _objects_to_answer(result: dict[str, Any], scale: float) -> CloudAnswer:
    try:
        objects = result.get("objects") or []
        boxes = np.asarray([o["bbox"] for o in objects], np.float32).reshape(-1, 4) * scale
        phrases = [str(o["category"]) for o in objects]
        scores = np.asarray([o["score"] for o in objects], np.float32)
    except (KeyError, TypeError, ValueError) as err:
        raise TransientError("malformed body", f"bad objects: {err}"[:200]) from None
    return CloudAnswer(boxes, phrases, scores)
