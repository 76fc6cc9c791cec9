"""Writing Foggy-Shapes splits to disk: JPEG images plus COCO JSON ground truth.

A split is a folder ``<split>/images/*.jpg`` and ``<split>/annotations.json`` whose
``file_name`` entries are relative to ``images/``; category ids are 1..K in
``FOGGY_SHAPES_CATEGORIES`` order; boxes are COCO ``[x, y, w, h]`` in pixels around the
visible pixels of each object.

Scenes come in three sets: source-train, target-train and val. The source and target val
splits show the *same* val scenes, clear and foggy, so the drop of a detector from one to
the other is due to the fog alone. Every image has its own generator, seeded by
(world seed, scene set, index), so images can be made in any order or in parallel.

Besides COCO's keys, ``annotations.json`` has a top-level ``"distractors"`` list
({"image_id", "bbox" [x, y, w, h] px, "kind"}): the visible extent of each non-category
object (tree, pole, crate, bush). COCO readers ignore it; the stand-in CLIP learns from it
what a box around no category looks like.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from coin_ray.config import FOGGY_SHAPES_CATEGORIES
from coin_ray.world.domains import apply_domain
from coin_ray.world.scenes import GroundTruth, SceneObject, render_scene, sample_scene

JPEG_QUALITY = 92
SCENE_SETS = {"source_train": 1, "target_train": 2, "val": 3}
DOMAIN_CODES = {"clear": 0, "fog": 1}


@dataclass(frozen=True)
class SplitSpec:
    """One split: which scene set, which domain, how many images of what size."""

    name: str
    scene_set: str
    domain: str
    count: int
    width: int
    height: int


def render_image(seed: int, scene_set: str, index: int, domain: str, width: int,
                 height: int) -> tuple[np.ndarray, list[GroundTruth], dict[str, float]]:
    """One image of the world: ((H, W, 3) uint8 RGB, ground truth, style params)."""
    return _render(seed, scene_set, index, domain, width, height)[:3]


def _render(seed: int, scene_set: str, index: int, domain: str, width: int, height: int
            ) -> tuple[np.ndarray, list[GroundTruth], dict[str, float], list[tuple[tuple[float, ...], str]]]:
    """``render_image`` plus the distractors' visible boxes: [(xyxy px, kind)]."""
    scene_rng = np.random.default_rng([seed, SCENE_SETS[scene_set], index])
    spec = sample_scene(scene_rng, width, height)
    clear, depth, instances, gt = render_scene(spec)
    style_rng = np.random.default_rng([seed, SCENE_SETS[scene_set], index, DOMAIN_CODES[domain]])
    image, params = apply_domain(clear, depth, domain, style_rng)
    return image, gt, params, distractor_boxes(spec.objects, instances)


def distractor_boxes(objects: tuple[SceneObject, ...], instances: np.ndarray
                     ) -> list[tuple[tuple[float, float, float, float], str]]:
    """[(xyxy px box of the visible pixels, kind)] of the non-category objects in ``instances`` (H, W)."""
    out = []
    for obj in objects:
        if obj.kind in FOGGY_SHAPES_CATEGORIES:
            continue
        ys, xs = np.nonzero(instances == obj.obj_id)
        if len(xs):
            out.append(((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), obj.kind))
    return out


def _write_chunk(args: tuple[str, int, SplitSpec, list[int]]) -> list[dict[str, Any]]:
    folder, seed, split, indices = args
    rows = []
    for i in indices:
        image, gt, params, distractors = _render(seed, split.scene_set, i, split.domain, split.width, split.height)
        name = f"{i:06d}.jpg"
        Image.fromarray(image).save(Path(folder) / name, quality=JPEG_QUALITY)
        rows.append({"index": i, "file_name": name, "params": params,
                     "boxes": [(g.box, g.category) for g in gt], "distractors": distractors})
    return rows


def coco_dict(rows: list[dict[str, Any]], width: int, height: int) -> dict[str, Any]:
    """COCO ground truth from per-image rows ({"index", "file_name", "params", "boxes"[, "distractors"]})."""
    images, annotations, distractors = [], [], []
    for row in sorted(rows, key=lambda r: r["index"]):
        image_id = row["index"] + 1
        images.append({"id": image_id, "file_name": row["file_name"], "width": width,
                       "height": height, **{f"style_{k}": v for k, v in row["params"].items()}})
        for (x0, y0, x1, y1), category in row["boxes"]:
            w, h = float(x1 - x0), float(y1 - y0)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(category) + 1,
                                "bbox": [float(x0), float(y0), w, h], "area": w * h, "iscrowd": 0})
        for (x0, y0, x1, y1), kind in row.get("distractors", []):
            distractors.append({"image_id": image_id, "bbox": [x0, y0, x1 - x0, y1 - y0], "kind": kind})
    categories = [{"id": k + 1, "name": n, "supercategory": "street"}
                  for k, n in enumerate(FOGGY_SHAPES_CATEGORIES)]
    return {"images": images, "annotations": annotations, "categories": categories, "distractors": distractors}


def write_split(root: str | Path, split: SplitSpec, seed: int, workers: int = 1) -> Path:
    """Render ``split`` into ``root/<name>/images`` and write its COCO JSON.

    Returns:
        the path of ``annotations.json``.
    """
    folder = Path(root) / split.name / "images"
    folder.mkdir(parents=True, exist_ok=True)
    chunks = [(str(folder), seed, split, list(range(i, split.count, max(workers, 1))))
              for i in range(max(workers, 1))]
    if workers > 1 and split.count >= 32 and "fork" in multiprocessing.get_all_start_methods():
        # fork: the children only run numpy/PIL, and need no re-import of the caller's script
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = [r for part in pool.map(_write_chunk, chunks) for r in part]
    else:
        rows = [r for chunk in chunks for r in _write_chunk(chunk)]
    out = Path(root) / split.name / "annotations.json"
    out.write_text(json.dumps(coco_dict(rows, split.width, split.height)))
    return out


def default_workers() -> int:
    """Processes for rendering: the CPUs this process may use, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
