"""Knowledge separation over every target image on Ray Data: the sets distillation starts from.

    run_separation(cfg, run_dir) -> "<run_dir>/separate/sets.parquet"

An actor pool matches each image's cloud detections (``collect/cloud.parquet``) with the
CLIP detector's (``clip_det/detections.parquet``) through ``coin_ray.separate.separate``,
as before burn-up (a pair takes the cloud box), and the sets are stored one row per box
(SETS_SCHEMA), next to ``summary.json`` with the count of each set.

Distillation does not read this file: it separates online in its workers, because after
burn-up the teacher moves every step (see ``coin_ray.train.distill``). This stage records
the starting point for inspection, plots and the separation statistics.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import ray

from coin_ray import storage
from coin_ray.config import Config
from coin_ray.schema import DETECTION_SCHEMA, Detections, table_to_records
from coin_ray.separate import Separation, as_source, separate

SETS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()), pa.field("uri", pa.string()),
    pa.field("set", pa.string()),  # consistent | inconsistent | private
    pa.field("source", pa.string()),  # both | cloud | clip_det (who found the box)
    pa.field("box", pa.list_(pa.float32(), 4)),  # xyxy pixels of the original image
    pa.field("cloud_label", pa.int64()), pa.field("clip_label", pa.int64()),  # -1: not found by it
    pa.field("cloud_score", pa.float32()), pa.field("clip_score", pa.float32()),
    pa.field("cloud_probs", pa.list_(pa.float32())), pa.field("clip_probs", pa.list_(pa.float32())),
])


def set_rows(record: Detections, sep: Separation) -> list[dict]:
    """The rows of one image's separation (see SETS_SCHEMA)."""
    base = {"image_id": record.image_id, "uri": record.uri}
    rows = []
    for name, pairs in (("consistent", sep.consistent), ("inconsistent", sep.inconsistent)):
        for i in range(len(pairs)):
            rows.append({**base, "set": name, "source": "both", "box": pairs.boxes[i].tolist(),
                         "cloud_label": int(pairs.cloud_labels[i]), "clip_label": int(pairs.clip_labels[i]),
                         "cloud_score": float(pairs.cloud_scores[i]), "clip_score": float(pairs.clip_scores[i]),
                         "cloud_probs": pairs.cloud_probs[i].tolist(), "clip_probs": pairs.clip_probs[i].tolist()})
    p = sep.private
    for i in range(len(p)):
        mine = {"label": int(p.labels[i]), "score": float(p.scores[i]), "probs": p.probs[i].tolist()}
        none = {"label": -1, "score": 0.0, "probs": []}
        cloud, clip = (mine, none) if bool(p.from_cloud[i]) else (none, mine)
        rows.append({**base, "set": "private", "source": "cloud" if bool(p.from_cloud[i]) else "clip_det",
                     "box": p.boxes[i].tolist(), "cloud_label": cloud["label"], "clip_label": clip["label"],
                     "cloud_score": cloud["score"], "clip_score": clip["score"],
                     "cloud_probs": cloud["probs"], "clip_probs": clip["probs"]})
    return rows


def _by_uri(uri: str) -> dict[str, Detections]:
    return {r.uri: r for r in table_to_records(storage.read_parquet(uri, DETECTION_SCHEMA)) if r.ok}


class Separator:
    """Ray Data callable class: a batch {"uri"} -> an Arrow table of set rows."""

    def __init__(self, cloud_uri: str, clip_det_uri: str, num_classes: int, min_score: float,
                 min_clip_score: float, iou_threshold: float) -> None:
        self.num_classes = num_classes
        self.min_clip_score = min_clip_score
        self.cloud = _by_uri(cloud_uri)
        self.clip_det = _by_uri(clip_det_uri)
        self.min_score = min_score
        self.iou_threshold = iou_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for uri in map(str, batch["uri"]):
            cloud, clip_det = self.cloud[uri], self.clip_det[uri]
            sep = separate(as_source(cloud, self.min_score, self.num_classes),
                           as_source(clip_det, self.min_clip_score, self.num_classes),
                           iou_threshold=self.iou_threshold)
            rows.extend(set_rows(cloud, sep))
        return pa.Table.from_pylist(rows, schema=SETS_SCHEMA)


def run_separation(cfg: Config, run_dir: str, num_actors: int = 1) -> str:
    """Separate every image found by both stages; write the sets and their counts.

    Images whose cloud or CLIP-detector record is an error record are left out.
    """
    cloud_uri = storage.join(run_dir, "collect", "cloud.parquet")
    clip_det_uri = storage.join(run_dir, "clip_det", "detections.parquet")
    out = storage.join(run_dir, "separate", "sets.parquet")
    uris = sorted(set(_by_uri(cloud_uri)) & set(_by_uri(clip_det_uri)))
    d = cfg.train.distill
    tables = []
    if uris:
        ds = ray.data.from_items([{"uri": u} for u in uris]).map_batches(
            Separator, fn_constructor_kwargs={"cloud_uri": cloud_uri, "clip_det_uri": clip_det_uri,
                                              "num_classes": cfg.num_classes, "min_score": d.min_score,
                                              "min_clip_score": d.min_clip_score, "iou_threshold": d.match_iou},
            compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=cfg.ray.cpus_per_worker,
            batch_format="numpy", batch_size=64)
        tables = ray.get(ds.to_arrow_refs())
    table = pa.concat_tables(tables).sort_by([("uri", "ascending")]) if tables else SETS_SCHEMA.empty_table()
    storage.write_parquet(table, out)
    counts = {name: int(sum(1 for s in table.column("set").to_pylist() if s == name))
              for name in ("consistent", "inconsistent", "private")}
    storage.write_text(storage.join(run_dir, "separate", "summary.json"),
                       json.dumps({"images": len(uris), "counts": counts}, indent=2))
    return out

