"""Label-only output: collected cloud detections as COCO JSON (no training needed).

    export_coco(records, categories, "runs/r1/export/labels_coco.json", root=images_folder)

writes a COCO *annotations* file (images, annotations with an extra "score", categories;
category ids are 1-based in category order) and, next to it, the same boxes as a COCO
*results* list (``*_results.json``) for tools that evaluate detections. Boxes go from xyxy
pixels to COCO's xywh pixels. Error records are left out of both (an image the backend
never answered is not an image without objects) and counted in ``info``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from coin_ray import storage
from coin_ray.schema import Detections


def _file_name(uri: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return uri[len(prefix):] if root and uri.startswith(prefix) else uri


def to_coco(records: Iterable[Detections], categories: list[str], root: str = "") -> dict[str, Any]:
    """A COCO annotations dict; image ids are 1-based in record order."""
    images, annotations, errors = [], [], 0
    for rec in records:
        if rec.error:
            errors += 1
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": _file_name(rec.uri, root),
                       "width": int(rec.width), "height": int(rec.height),
                       "coin_image_id": rec.image_id})
        for box, label, score in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.scores.tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(label) + 1, "bbox": [box[0], box[1], w, h],
                                "area": w * h, "iscrowd": 0, "score": float(score)})
    return {"info": {"description": "coin-ray cloud labels", "error_images": errors},
            "images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)]}


def to_coco_results(coco: dict[str, Any]) -> list[dict[str, Any]]:
    """The annotations of a ``to_coco`` dict as a COCO results list."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "score": a["score"]} for a in coco["annotations"]]


def export_coco(records: Iterable[Detections], categories: list[str], out_uri: str,
                root: str = "") -> dict[str, Any]:
    """Write the annotations JSON to ``out_uri`` and the results list beside it; returns counts."""
    coco = to_coco(records, categories, root)
    storage.write_text(out_uri, json.dumps(coco))
    results_uri = out_uri[:-len(".json")] + "_results.json" if out_uri.endswith(".json") \
        else out_uri + "_results.json"
    storage.write_text(results_uri, json.dumps(to_coco_results(coco)))
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "error_images": coco["info"]["error_images"], "results": results_uri}
