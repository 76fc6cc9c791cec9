"""Content-addressed store of backend answers: never pay twice for the same question.

The key is a SHA-256 over the image bytes' hash, the backend, the model, the prompts (in
order) and the threshold; any change to one of them is a different question. Entries are
JSON files ``<root>/<backend>/<key[:2]>/<key>.json`` in a local folder or under s3://,
written atomically (``coin_ray.storage``) before the answer is used, so a killed run
keeps everything it was answered. Entries hold boxes, phrases and scores only: never a
token or a header.

Beside an answer, a question may have a state file (JSON, same folder):
    <key>.pending   a created task not answered yet: {"handle": {...}, "generation": g}
                    (written before polling, so a timeout, a retry or a resumed run polls it)
    <key>.failed    the service refused the image or its task failed: {"reason", "error",
                    "generation"}; a re-run skips it unless asked to retry failures
    <key>.lock      held while one caller asks the question (``claimed``): a second run
                    asking the same image at the same time waits, then finds the answer
``generation`` counts tasks created for the question after the service lost or failed one;
it is part of the Idempotency-Key, so a retried creation reuses its key and a deliberate
new one does not.

Several runs may share one cache at once. On local disk (or NFS) every write is a rename
and ``claimed`` is a kernel lock (``storage.locked``), so nothing is corrupted and no image
is paid twice. On S3 every entry is one PUT (never half-written) but there is no lock: two
runs asking the same image at the same moment may both pay for it, except on task backends
(dds), whose creations carry the same Idempotency-Key for the same question.

``also_read`` names older caches (``<storage>/cache`` of earlier versions): their answers
and states are found too, and an answer found there is copied into ``root``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

from coin_ray import storage
from coin_ray.cloud.base import CloudAnswer
from coin_ray.cloud.errors import TransientError
from coin_ray.cloud.http_backend import answer_from_json, answer_to_json


def cache_key(image_bytes: bytes, backend: str, model: str, prompts: list[str],
              threshold: float) -> str:
    """64 hex characters identifying one question to one backend."""
    question = {"image_sha256": hashlib.sha256(image_bytes).hexdigest(), "backend": backend,
                "model": model, "prompts": list(prompts), "threshold": round(float(threshold), 6)}
    return hashlib.sha256(json.dumps(question, sort_keys=True).encode()).hexdigest()


def idempotency_key(key: str, generation: int = 0) -> str:
    """32 hex characters, the same for every creation attempt of one question and generation.

    ``key`` (``cache_key``) covers the image digest, backend, model, prompts and threshold.
    """
    return hashlib.sha256(f"{key}:{generation}".encode()).hexdigest()[:32]


class AnswerCache:
    """Answers of one backend under ``root`` (local folder or s3:// prefix).

    ``categories`` names the probs columns of answers that carry full distributions.
    """

    def __init__(self, root: str, backend: str, categories: list[str] | None = None,
                 also_read: tuple[str, ...] = ()) -> None:
        self.root = root
        self.backend = backend
        self.categories = categories
        self.also_read = tuple(r for r in also_read if r and r != root)

    def path(self, key: str, root: str = "") -> str:
        return storage.join(root or self.root, self.backend, key[:2], f"{key}.json")

    def get(self, key: str) -> CloudAnswer | None:
        """The stored answer, or None when absent or unreadable (then it is asked again)."""
        for root in (self.root, *self.also_read):
            try:
                body = json.loads(storage.read_bytes(self.path(key, root)))
                answer = answer_from_json(body, self.categories)
            except (FileNotFoundError, ValueError, TransientError):
                continue
            if root != self.root:  # migrate: the next run (any storage) finds it in the cache
                storage.write_bytes(self.path(key), json.dumps(body).encode())
            return answer
        return None

    def claimed(self, key: str) -> contextlib.AbstractContextManager[bool]:
        """Hold ``key``'s claim while asking it (waits for another caller's; see the module doc)."""
        return storage.locked(self._state_path(key, "lock"))

    def _state_path(self, key: str, kind: str, root: str = "") -> str:
        return self.path(key, root)[:-len(".json")] + "." + kind

    def put(self, key: str, answer: CloudAnswer, model: str = "") -> None:
        body = answer_to_json(answer, self.categories, model)
        storage.write_bytes(self.path(key), json.dumps(body).encode())

    def state(self, key: str, kind: str) -> dict | None:
        """The ``kind`` ("pending" or "failed") state of ``key``, or None (absent, unreadable).

        An older cache's state counts too: a task paid for there is polled, not created again.
        """
        for root in (self.root, *self.also_read):
            try:
                got = json.loads(storage.read_bytes(self._state_path(key, kind, root)))
            except (FileNotFoundError, ValueError, TransientError):
                continue
            if isinstance(got, dict):
                return got
        return None

    def put_state(self, key: str, kind: str, state: dict) -> None:
        storage.write_bytes(self._state_path(key, kind), json.dumps(state).encode())

    def drop_state(self, key: str, kind: str) -> None:
        """Remove the ``kind`` state of ``key`` (nothing happens when there is none); an older
        cache's is left, as everything there (the answer now in ``root`` is found first)."""
        storage.delete(self._state_path(key, kind))
