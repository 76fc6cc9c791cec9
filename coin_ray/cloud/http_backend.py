"""The ``http`` backend: the project's own small JSON protocol for self-hosted detectors.

Protocol (version 1; served by ``python -m coin_ray.serve``)

    POST <url>/v1/detect
        Content-Type: application/json
        Authorization: Bearer <token>          only when the client has a token
        {"image": "<base64 of the image file, or of a PNG of its decoded pixels>",
         "prompts": ["car", "bus", ...],        text prompts, one or more per category
         "threshold": 0.25}                     minimum score the server should return
    200 {"boxes":  [[x1, y1, x2, y2], ...],     absolute pixels of the image sent
         "phrases": ["car", ...],               one label per box (a prompt or a name)
         "scores": [0.9, ...],                  one score per box, in [0, 1]
         "probs": [[...], ...] | null,          optional full distributions, K+1 per box ...
         "categories": ["car", ...] | null,     ... whose first K columns are these names
         "model": "<name of the model>"}
    400 {"error": "..."}   the request is wrong (not an image, missing field): not retried
    400 {"error": "...", "unknown_categories": ["traffic light"], "categories": ["car", ...]}
                           a closed-vocabulary detector (the Foggy-Shapes stand-in) cannot
                           answer these prompts; "categories" (or null) is what it knows.
                           The client raises UnknownCategories and the run stops in one line.
    401 / 403              token missing or refused: the client stops the run
    429 + Retry-After: <seconds, decimals allowed>   over the server's rate limit
    5xx                    server trouble: retried with backoff

    GET <url>/v1/health -> {"backend": "<name>", "model": "<name>"}
    GET <url>/stats     -> request counters (see ``coin_ray.serve``)
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.errors import PermanentError, Secret, TransientError, UnknownCategories
from coin_ray.cloud.imageio import upload_bytes
from coin_ray.cloud.rest import request_json


def request_to_json(image_bytes: bytes, prompts: list[str], threshold: float) -> dict[str, Any]:
    """The body of ``POST /v1/detect`` for ``image_bytes`` (an encoded image file)."""
    return {"image": base64.b64encode(image_bytes).decode("ascii"), "prompts": list(prompts),
            "threshold": float(threshold)}


def request_from_json(body: Any) -> tuple[bytes, list[str], float | None]:
    """(image file bytes, prompts, threshold or None when absent) of a parsed request body.

    Raises:
        ValueError: a field is missing or of the wrong type, or "image" is not base64
            (the message names which).
    """
    if not isinstance(body, dict):
        raise ValueError("the body is not a JSON object")
    for key in ("image", "prompts"):
        if key not in body:
            raise ValueError(f"missing field {key!r}")
    if not isinstance(body["image"], str):
        raise ValueError("field 'image' is not a base64 string")
    try:
        image_bytes = base64.b64decode(body["image"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("field 'image' is not valid base64") from None
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValueError("field 'prompts' is not a list of strings")
    threshold = body.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ValueError("field 'threshold' is not a number")
    return image_bytes, list(prompts), None if threshold is None else float(threshold)


def answer_to_json(answer: CloudAnswer, categories: list[str] | None = None,
                   model: str = "") -> dict[str, Any]:
    """The 200 body for ``answer`` (probs only together with the names of their columns)."""
    # Probs travel only when their columns are exactly the named categories plus background.
    with_probs = (answer.probs is not None and categories is not None
                  and np.asarray(answer.probs).shape == (len(answer.phrases), len(categories) + 1))
    return {
        "boxes": np.asarray(answer.boxes, np.float32).reshape(-1, 4).tolist(),
        "phrases": list(answer.phrases),
        "scores": np.asarray(answer.scores, np.float32).reshape(-1).tolist(),
        "probs": np.asarray(answer.probs, np.float32).tolist() if with_probs else None,
        "categories": list(categories) if with_probs else None,
        "model": model,
    }


def unknown_prompts_reply(unknown: list[str], known: list[str] | None) -> dict[str, Any]:
    """The 400 body for prompts the serving detector cannot answer (see the protocol above)."""
    return {"error": f"unknown categories: {', '.join(unknown)}"
                     + (f" (this detector knows: {', '.join(known)})" if known else ""),
            "unknown_categories": list(unknown), "categories": list(known) if known else None}


def unknown_categories_in(err: PermanentError, where: str) -> UnknownCategories | None:
    """The ``UnknownCategories`` a 400 body of ``unknown_prompts_reply`` stands for, else None."""
    body = err.body
    if not isinstance(body, dict) or not isinstance(body.get("unknown_categories"), list):
        return None
    known = body.get("categories")
    return UnknownCategories([str(u) for u in body["unknown_categories"]],
                             [str(k) for k in known] if isinstance(known, list) else None, where)


def answer_from_json(body: Any, categories: list[str] | None = None) -> CloudAnswer:
    """Parse a 200 body; probs are re-ordered to ``categories`` (K+1, background last).

    Probs are kept only when every one of ``categories`` is among the server's columns;
    otherwise the answer is treated as class-only.

    Raises:
        TransientError("malformed body"): fields missing or of inconsistent lengths.
    """
    try:
        boxes = np.asarray(body["boxes"], np.float32).reshape(-1, 4)
        phrases = [str(p) for p in body["phrases"]]
        scores = np.asarray(body["scores"], np.float32).reshape(-1)
        if not (len(boxes) == len(phrases) == len(scores)):
            raise ValueError("boxes, phrases and scores differ in length")
        probs = _reorder_probs(body.get("probs"), body.get("categories"), categories, len(boxes))
    except (KeyError, TypeError, ValueError) as err:
        raise TransientError("malformed body", str(err)[:200]) from None
    return CloudAnswer(boxes, phrases, scores, probs)


def _reorder_probs(probs: Any, theirs: Any, ours: list[str] | None, n: int) -> np.ndarray | None:
    if probs is None or theirs is None or ours is None or not set(ours) <= set(theirs):
        return None
    probs = np.asarray(probs, np.float32).reshape(n, len(theirs) + 1)
    cols = [list(theirs).index(c) for c in ours] + [len(theirs)]
    out = probs[:, cols]
    total = out.sum(axis=1, keepdims=True)
    # Categories the run does not ask for take their mass with them: renormalise.
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


class HttpBackend:
    """Client of the protocol above; one instance per caller, thread-safe (no shared state)."""

    name = "http"

    def __init__(self, url: str, *, threshold: float = 0.25, timeout_s: float = 30.0,
                 token: Secret | None = None, categories: list[str] | None = None) -> None:
        if not url:
            raise ValueError("backend 'http' needs cloud.url (e.g. http://127.0.0.1:8500)")
        self.url = url.rstrip("/")
        self.threshold = threshold
        self.timeout_s = timeout_s
        self.token = token or Secret("")
        self.categories = categories

    def server_model(self) -> str:
        """The model the server says it runs (GET /v1/health); raises CloudError if unreachable."""
        reply = request_json("GET", f"{self.url}/v1/health", None, {}, self.timeout_s, self.token)
        return str(reply.get("model", "")) if isinstance(reply, dict) else ""

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """POST the image in the pipeline's frame; boxes come back in pixels of ``image`` (xyxy).

        The file itself is sent when a plain decoder sees ``image`` in it; a rotated, CMYK,
        palette or 16-bit file is sent as a PNG of ``image`` (``imageio.upload_bytes``).
        Raises UnknownCategories when the server cannot answer some of ``prompts``.
        """
        headers = {"Authorization": f"Bearer {self.token.reveal()}"} if self.token else {}
        data, _, _ = upload_bytes(image_bytes, image)
        body = request_to_json(data, prompts, self.threshold)
        try:
            reply = request_json("POST", f"{self.url}/v1/detect", body, headers, self.timeout_s,
                                 self.token)
        except PermanentError as err:
            unknown = unknown_categories_in(err, self.url)
            if unknown is not None:
                raise unknown from None
            raise
        return answer_from_json(reply, self.categories)
