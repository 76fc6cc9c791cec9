"""Batch inference with the exported target detector on Ray Data, written as COCO results.

    summary = predict("runs/<id>/export", "s3://bucket/new-images", "s3://bucket/out/results.json")

An actor pool loads the TorchScript or ONNX export (``coin_ray.export``) once per actor; each
actor reads its batch of images by uri (local or s3://), detects, and returns Detections
rows (boxes xyxy in original-image pixels). An unreadable image becomes an error record
(counted in the summary), never a failed job. The driver writes one COCO results JSON:
a list of {"image_id", "category_id", "bbox": [x, y, w, h] pixels, "score"}.

Ids: with a COCO annotations file for the images, its image ids (matched by
``images/<file_name>``) and category ids (matched by name); otherwise image ids 1..N in
sorted uri order and category ids label + 1, with the id -> file list written beside the
results as ``<name>.images.json`` (``results.json`` -> ``results.images.json``): COCO's
``images`` (id, file_name = the image's uri, width, height) and ``categories`` (id, name),
so the results and that file together read as a COCO dataset with detections.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
import torch

from coin_ray import storage
from coin_ray.data.datasets import list_image_folder
from coin_ray.data.images import IMAGE_SUFFIXES, image_id_from_uri, read_image_record
from coin_ray.export import image_tensor, load_exported
from coin_ray.schema import SOURCE_COIN, Detections, records_to_table, table_to_records


class ExportedPredictor:
    """Ray Data callable class: a batch {"uri", "image_id"} -> an Arrow table of Detections."""

    def __init__(self, export_uri: str, num_threads: int = 1, runtime: str = "torchscript") -> None:
        torch.set_num_threads(max(1, num_threads))
        self.detector = load_exported(export_uri, runtime=runtime, num_threads=num_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = [read_image_record(str(u), str(i)) for u, i in zip(batch["uri"], batch["image_id"])]
        readable = [rec for rec in images if rec.ok]
        found = self.detector.detect([image_tensor(rec.image) for rec in readable]) if readable else []
        by_uri = {rec.uri: det for rec, det in zip(readable, found)}
        k = len(self.detector.categories)
        records = []
        for rec in images:
            if not rec.ok:
                records.append(Detections.empty(rec.image_id, rec.uri, 0, 0, SOURCE_COIN, k, error=rec.error))
                continue
            d = {name: value.numpy() for name, value in by_uri[rec.uri].items()}
            records.append(Detections(rec.image_id, rec.uri, rec.width, rec.height, d["boxes"], d["labels"],
                                      d["scores"], d["probs"], SOURCE_COIN))
        return records_to_table(records)


def detect_all(export_uri: str, uris: list[str], *, root: str = "", batch_size: int = 8,
               num_actors: int = 1, cpus_per_actor: float = 1.0, runtime: str = "torchscript"
               ) -> list[Detections]:
    """Detections for every uri (error records included), sorted by uri; ``runtime`` as in
    ``coin_ray.export.load_exported``."""
    if not uris:
        return []
    items = [{"uri": u, "image_id": image_id_from_uri(u, root)} for u in uris]
    ds = ray.data.from_items(items).map_batches(
        ExportedPredictor, batch_size=batch_size,
        fn_constructor_kwargs={"export_uri": export_uri, "num_threads": max(1, int(cpus_per_actor)),
                               "runtime": runtime},
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cpus_per_actor,
        batch_format="pyarrow")
    tables = ray.get(ds.to_arrow_refs())
    return sorted((r for t in tables for r in table_to_records(t)), key=lambda r: r.uri)


def _normalise(name: str) -> str:
    return name.lower().replace("_", " ").strip()


def coco_ids(categories: list[str], uris: list[str], images_uri: str, annotations_uri: str = ""
             ) -> tuple[dict[str, int], dict[int, int]]:
    """(uri -> image id, label -> category id): from the annotations file when given, else
    1..N in ``uris`` order and label + 1. Labels whose name the file lacks are left out."""
    if not annotations_uri:
        return {u: i for i, u in enumerate(uris, start=1)}, {k: k + 1 for k in range(len(categories))}
    data = json.loads(storage.read_text(annotations_uri))
    image_ids = {storage.join(images_uri, img["file_name"]): int(img["id"]) for img in data.get("images", [])}
    by_name = {_normalise(c["name"]): int(c["id"]) for c in data.get("categories", [])}
    category_ids = {k: by_name[_normalise(c)] for k, c in enumerate(categories) if _normalise(c) in by_name}
    return image_ids, category_ids


def coco_results(records: list[Detections], image_ids: dict[str, int], category_ids: dict[int, int]
                 ) -> list[dict]:
    """COCO results (bbox xywh pixels) for records whose image and label have an id."""
    out = []
    for rec in records:
        image_id = image_ids.get(rec.uri)
        if image_id is None or not rec.ok:
            continue
        for (x1, y1, x2, y2), label, score in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.scores.tolist()):
            if int(label) in category_ids:
                out.append({"image_id": image_id, "category_id": category_ids[int(label)],
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(score), 5)})
    return out


@dataclass
class PredictSummary:
    out: str
    images: int
    detections: int
    errors: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)  # (uri, error) of unreadable images
    index: str = ""  # the <name>.images.json written beside the results, or "" with annotations


def predict(export_uri: str, images_uri: str, out_uri: str, *, annotations_uri: str = "",
            batch_size: int = 0, num_actors: int = 1, cpus_per_actor: float = 1.0,
            runtime: str = "torchscript") -> PredictSummary:
    """Detect on every image under ``images_uri`` and write COCO results JSON to ``out_uri``.

    ``batch_size`` 0 = the largest batch size the export was traced with. Ray must be
    initialised. Non-image files are skipped; unreadable images are counted as errors.
    """
    start = time.monotonic()
    meta = json.loads(storage.read_text(storage.join(export_uri, "export.json")))
    uris = [u for u in list_image_folder(images_uri) if u.lower().endswith(IMAGE_SUFFIXES)]
    records = detect_all(export_uri, uris, root=images_uri, batch_size=batch_size or max(meta["batch_sizes"]),
                         num_actors=num_actors, cpus_per_actor=cpus_per_actor, runtime=runtime)
    image_ids, category_ids = coco_ids(meta["categories"], uris, images_uri, annotations_uri)
    results = coco_results(records, image_ids, category_ids)
    storage.write_text(out_uri, json.dumps(results))
    index_uri = ""
    if not annotations_uri:  # the ids are ours: say which file and category each one is
        index = [{"id": image_ids[r.uri], "file_name": r.uri, "width": r.width, "height": r.height}
                 for r in records if r.ok]
        cats = [{"id": category_ids[k], "name": c} for k, c in enumerate(meta["categories"])]
        index_uri = out_uri.rsplit(".", 1)[0] + ".images.json"
        storage.write_text(index_uri, json.dumps({"images": index, "categories": cats}))
    failures = [(r.uri, r.error) for r in records if not r.ok]
    return PredictSummary(out_uri, len(uris), len(results), len(failures), time.monotonic() - start,
                          failures, index_uri)
