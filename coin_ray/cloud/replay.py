"""The ``replay`` backend: answers collected before, served again without calling anyone.

Sources:
    a Parquet file of ``Detections`` (this project's cloud.parquet): boxes, labels, probs
    a COCO annotations-style JSON ({"images", "annotations", "categories"}; annotation
        "score" optional, default 1), e.g. this project's COCO export
    a COCO results list ([{"image_id", "category_id", "bbox", "score"}]) plus the COCO
        annotations JSON that names its images and categories

Answers are looked up by the SHA-256 of the image bytes, so a replay backend works behind
the detector server too (which sees bytes, not file names). Images are read once, at
construction, from the URIs the source names (relative names are resolved under
``images_root``). An image the source does not know gets an empty answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from coin_ray import storage
from coin_ray.cloud.base import CloudAnswer
from coin_ray.schema import class_only_probs, table_to_records


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ReplayBackend:
    name = "replay"

    def __init__(self, path: str, *, categories: list[str] | None = None, images_root: str = "",
                 annotations: str = "") -> None:
        if not path:
            raise ValueError("backend 'replay' needs cloud.url: a .parquet or COCO .json file")
        self.model_name = path
        self.images_root = images_root
        if path.endswith(".parquet"):
            if not categories:
                raise ValueError("replaying Parquet needs the run's categories")
            self.categories: list[str] | None = list(categories)
            by_uri = _from_parquet(path, self.categories)
        else:
            by_uri, self.categories = _from_coco(path, annotations)
        self.answers = {_sha(storage.read_bytes(self._resolve(uri))): answer
                        for uri, answer in by_uri.items()}

    def _resolve(self, uri: str) -> str:
        if storage.is_s3(uri) or uri.startswith("/") or not self.images_root:
            return uri
        return storage.join(self.images_root, uri)

    def detect(self, image_bytes: bytes, image: np.ndarray, prompts: list[str]) -> CloudAnswer:
        """The stored answer for these bytes (xyxy pixels), or an empty one."""
        answer = self.answers.get(_sha(image_bytes))
        if answer is None:
            return CloudAnswer(np.zeros((0, 4), np.float32), [], np.zeros(0, np.float32))
        return answer


def _from_parquet(path: str, categories: list[str]) -> dict[str, CloudAnswer]:
    out = {}
    for rec in table_to_records(storage.read_parquet(path)):
        if rec.error:
            continue  # an error is not an answer: the image is asked again
        # Class-only probs are rebuilt from label and score; only real distributions travel.
        rebuilt = class_only_probs(rec.labels, rec.scores, len(categories))
        full = rec.probs.shape == rebuilt.shape and not np.allclose(rec.probs, rebuilt)
        out[rec.uri] = CloudAnswer(rec.boxes, [categories[i] for i in rec.labels], rec.scores,
                                   rec.probs if full else None)
    return out


def _from_coco(path: str, annotations: str) -> tuple[dict[str, CloudAnswer], list[str]]:
    data: Any = json.loads(storage.read_bytes(path))
    if isinstance(data, list):
        if not annotations:
            raise ValueError(f"{path} is a COCO results list: the COCO annotations JSON naming "
                             "its images and categories is needed too")
        meta = json.loads(storage.read_bytes(annotations))
        dets = data
    else:
        meta, dets = data, data.get("annotations", [])
    files = {img["id"]: img["file_name"] for img in meta["images"]}
    names = {c["id"]: c["name"] for c in meta["categories"]}
    grouped: dict[str, list[dict[str, Any]]] = {f: [] for f in files.values()}
    for det in dets:
        grouped[files[det["image_id"]]].append(det)
    out = {}
    for file_name, items in grouped.items():
        xywh = np.asarray([d["bbox"] for d in items], np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        out[file_name] = CloudAnswer(boxes, [names[d["category_id"]] for d in items],
                                     np.asarray([d.get("score", 1.0) for d in items], np.float32))
    return out, [names[k] for k in sorted(names)]
