"""Batch detection on Ray Data: an actor pool that loads a detector checkpoint once per actor.

    run_detection(cfg, "<run>/disseminate/model.pt", uris, "<run>/clip_det/detections.parquet")

Each actor rebuilds the detector from ``model.pt`` (coin_ray.models.build.load_detector),
reads its batch of images by uri (local or s3://), detects, and returns Detections rows in
DETECTION_SCHEMA (boxes xyxy in original-image pixels, probs (N,K+1)). An image that cannot
be read becomes an error record, never a failed batch. The driver writes one Parquet file.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from coin_ray import storage
from coin_ray.config import Config
from coin_ray.data.images import image_id_from_uri, read_image_record
from coin_ray.models.build import load_detector
from coin_ray.progress import ProgressLine
from coin_ray.schema import SOURCE_CLIP_DET, SOURCE_COIN, Detections, records_to_table, table_to_records
from coin_ray.train.data import image_tensor


class DetectorActor:
    """Ray Data callable class: a batch {"uri", "image_id"} -> an Arrow table of Detections."""

    def __init__(self, model_path: str, source: str, num_threads: int = 1, use_gpu: bool = False) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = load_detector(model_path, map_location=self.device).eval()
        self.source = source

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = [read_image_record(str(uri), str(image_id))
                  for uri, image_id in zip(batch["uri"], batch["image_id"])]
        readable = [rec for rec in images if rec.ok]
        found = self.model.detect([image_tensor(rec.image).to(self.device) for rec in readable]) if readable else []
        by_uri = {rec.uri: det for rec, det in zip(readable, found)}
        k = self.model.num_classes
        records = []
        for rec in images:
            if not rec.ok:
                records.append(Detections.empty(rec.image_id, rec.uri, 0, 0, self.source, k, error=rec.error))
                continue
            det = {name: value.cpu().numpy() for name, value in by_uri[rec.uri].items()}
            records.append(Detections(rec.image_id, rec.uri, rec.width, rec.height, det["boxes"], det["labels"],
                                      det["scores"], det["probs"], self.source))
        return records_to_table(records)


def actor_resources(cfg: Config) -> dict[str, float]:
    """``map_batches`` resource arguments of one detection actor: num_cpus, num_gpus."""
    resources = cfg.ray.worker_resources()
    return {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0)}


def run_detection(cfg: Config, model_path: str, uris: list[str], out_uri: str,
                  source: str = SOURCE_CLIP_DET, *, batch_size: int | None = None,
                  num_actors: int | None = None) -> str:
    """Detect on every uri with an actor pool and write the Detections to ``out_uri`` (Parquet).

    Args:
        model_path: a model.pt written by ``save_detector`` (local or s3://).
        uris: images to detect on; their image_id is the path relative to
            ``cfg.data.target_images`` when under it, else the file name (as collection does).
        batch_size: images per actor call (default ``cfg.train.disseminate.batch_size``).
        num_actors: pool size (default ``cfg.clip.num_actors``); each actor reserves
            ``cfg.ray.worker_resources()`` (CPUs, and GPUs when ``cfg.ray.use_gpu``).
    Returns:
        ``out_uri``; its records are sorted by uri.
    """
    root = cfg.data.target_images
    items = [{"uri": u, "image_id": image_id_from_uri(u, root)} for u in uris]
    if not items:
        storage.write_parquet(records_to_table([]), out_uri)
        return out_uri
    ds = ray.data.from_items(items).map_batches(
        DetectorActor, batch_size=batch_size or cfg.train.disseminate.batch_size,
        fn_constructor_kwargs={"model_path": model_path, "source": source,
                               "num_threads": int(cfg.ray.cpus_per_worker), "use_gpu": cfg.ray.use_gpu},
        compute=ray.data.ActorPoolStrategy(size=num_actors or cfg.clip.num_actors),
        batch_format="numpy", **actor_resources(cfg))
    progress = ProgressLine("evaluate" if source == SOURCE_COIN else source, len(items), unit="image")
    records = []
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        records += table_to_records(table)
        progress.update(len(records))
    records.sort(key=lambda r: r.uri)
    storage.write_parquet(records_to_table(records), out_uri)
    return out_uri
