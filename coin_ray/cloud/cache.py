"""Content-addressed store of backend answers: never pay twice for the same question.

The key is a SHA-256 over the image bytes' hash, the backend, the model, the prompts (in
order) and the threshold; any change to one of them is a different question. Entries are
JSON files ``<root>/<backend>/<key[:2]>/<key>.json`` in a local folder or under s3://,
written atomically (``coin_ray.storage``) before the answer is used, so a killed run
keeps everything it was answered. Entries hold boxes, phrases and scores only: never a
token or a header.
"""

from __future__ import annotations

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


class AnswerCache:
    """Answers of one backend under ``root`` (local folder or s3:// prefix).

    ``categories`` names the probs columns of answers that carry full distributions.
    """

    def __init__(self, root: str, backend: str, categories: list[str] | None = None) -> None:
        self.root = root
        self.backend = backend
        self.categories = categories

    def path(self, key: str) -> str:
        return storage.join(self.root, self.backend, key[:2], f"{key}.json")

    def get(self, key: str) -> CloudAnswer | None:
        """The stored answer, or None when absent or unreadable (then it is asked again)."""
        path = self.path(key)
        try:
            return answer_from_json(json.loads(storage.read_bytes(path)), self.categories)
        except (FileNotFoundError, ValueError, TransientError):
            return None

    def put(self, key: str, answer: CloudAnswer, model: str = "") -> None:
        body = answer_to_json(answer, self.categories, model)
        storage.write_bytes(self.path(key), json.dumps(body).encode())
