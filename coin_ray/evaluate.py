"""Evaluation through pycocotools: per-class AP50, mAP50 (the paper's metric), COCO mAP.

Detections are matched to a ``LabelledSplit`` by ``uri`` (by image_id only for records
without one), so records of several splits can be evaluated together: those of other
images are counted as unmatched, never scored. Results are laid out as the paper's Table 1:
one row per method, one column per class, mAP last.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coin_ray.data.datasets import LabelledSplit
from coin_ray.schema import Detections

# Short column names as in the paper's tables (full names are used for other categories).
SHORT_NAMES = {"motorcycle": "Mcycle", "bicycle": "Bcycle"}


@dataclass
class EvalResult:
    """AP in percent. ``ap50`` maps category name -> AP50 (NaN where the class has no GT)."""

    ap50: dict[str, float]
    map50: float
    map_coco: float  # mAP@[.5:.95]
    num_images: int
    num_detections: int
    unmatched_records: int = 0  # detection records whose image is not in the split

    def to_json(self) -> dict:
        """Fields as plain JSON values, NaN written as None (JSON has no NaN)."""
        return _nan_to_none(asdict(self))


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def coco_ground_truth(split: LabelledSplit) -> dict:
    """The split as an in-memory COCO instances dict (image ids 1..N, category ids 1..K)."""
    images, annotations = [], []
    for img_id, gt in enumerate(split.items, start=1):
        images.append({"id": img_id, "width": gt.width, "height": gt.height, "file_name": gt.uri})
        for box, label, ignore in zip(gt.boxes.tolist(), gt.labels.tolist(), gt.ignore.tolist()):
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": label + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(ignore),
                                "ignore": int(ignore)})
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(split.categories)]
    return {"images": images, "annotations": annotations, "categories": categories}


def coco_results(split: LabelledSplit, records: list[Detections]) -> tuple[list[dict], int]:
    """Detections as COCO results (xywh) keyed to the split's image ids; also the number of
    records that matched no image of the split."""
    by_uri = {gt.uri: i for i, gt in enumerate(split.items, start=1)}
    by_id = {gt.image_id: i for i, gt in enumerate(split.items, start=1)}
    results, unmatched = [], 0
    for rec in records:
        # Only the uri identifies an image: train and val folders may both hold "000000.jpg".
        img_id = by_uri.get(rec.uri) if rec.uri else by_id.get(rec.image_id)
        if img_id is None:
            unmatched += 1
            continue
        for box, label, score in zip(rec.boxes.tolist(), rec.labels.tolist(), rec.scores.tolist()):
            x1, y1, x2, y2 = box
            results.append({"image_id": img_id, "category_id": int(label) + 1,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return results, unmatched


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def evaluate(split: LabelledSplit, records: list[Detections]) -> EvalResult:
    """AP50 per class, mAP50 and COCO mAP of ``records`` against ``split`` (pycocotools).

    Classes without ground truth get NaN AP50 and are left out of the means, as
    pycocotools does.
    """
    gt = COCO()
    gt.dataset = coco_ground_truth(split)
    _quiet(gt.createIndex)
    results, unmatched = coco_results(split, records)
    nan_ap = {c: float("nan") for c in split.categories}
    if not results:
        has_gt = {split.categories[a["category_id"] - 1] for a in gt.dataset["annotations"]}
        ap = {c: (0.0 if c in has_gt else float("nan")) for c in split.categories}
        return EvalResult(ap, 0.0 if has_gt else float("nan"), 0.0, len(split.items), 0, unmatched)
    dt = _quiet(gt.loadRes, results)
    ev = COCOeval(gt, dt, iouType="bbox")
    _quiet(ev.evaluate)
    _quiet(ev.accumulate)
    _quiet(ev.summarize)
    # precision: [T iou thresholds, R recall points, K classes, A areas, M max dets]
    precision = ev.eval["precision"][0, :, :, 0, -1]
    ap50 = dict(nan_ap)
    for k, name in enumerate(split.categories):
        column = precision[:, k]
        valid = column[column > -1]
        if valid.size:
            ap50[name] = float(valid.mean() * 100)
    values = [v for v in ap50.values() if not math.isnan(v)]
    map50 = float(np.mean(values)) if values else float("nan")
    return EvalResult(ap50, map50, float(ev.stats[0] * 100), len(split.items), len(results), unmatched)


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def table1_markdown(results: dict[str, EvalResult], categories: list[str]) -> str:
    """The paper's Table 1 layout: one row per method, AP50 per class, mAP50 last."""
    header = ["Method", *[SHORT_NAMES.get(c, c.title()) for c in categories], "mAP50"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, res in results.items():
        cells = [method, *[_fmt(res.ap50.get(c, float("nan"))) for c in categories], _fmt(res.map50)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table1_json(results: dict[str, EvalResult]) -> str:
    """The same table as JSON: {method: EvalResult fields} (NaN written as null)."""
    return json.dumps({m: r.to_json() for m, r in results.items()}, indent=2)


def comparison_line(results: dict[str, EvalResult], ours: str = "COIN", reference: str = "Cloud det") -> str:
    """One sentence saying what Table 1 means for the user ("" without both rows).

    ``ours`` is the detector the run produced (small, owned, free to run); ``reference`` the
    cloud detector it learnt from. mAP50 in percent on the labelled target split.
    """
    if ours not in results or reference not in results:
        return ""
    mine, theirs = results[ours], results[reference]
    diff = mine.map50 - theirs.map50
    standing = "level with" if abs(diff) < 0.05 else f"{abs(diff):.1f} mAP50 {'above' if diff > 0 else 'below'}"
    return (f"Your detector ({ours}, {mine.map50:.1f} mAP50) is {standing} the cloud detector it learnt from "
            f"({theirs.map50:.1f}) on the {theirs.num_images} labelled target images: "
            f"{'it can replace the cloud calls on this domain' if diff > 0 else 'keep calling the cloud detector, or train longer (train.distill.epochs)'}.")
