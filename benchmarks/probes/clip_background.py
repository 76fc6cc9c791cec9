"""Does the stand-in CLIP know background? Crop accuracy on objects and on non-object crops.
Backs docs/fidelity.md, "The CLIP detector" (the stand-in CLIP and background).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probes/clip_background.py --world-root DIR \\
        --clip before=OLD_WORLD/clip --clip after=DIR/clip [--split target_val] [--per-kind 300]

Scores, with the collector's scorer (``ClipBoxScorer``: K names + background, the default
prompt ensemble and the world's style phrase), the ground-truth boxes of a split and
``--per-kind`` non-object boxes of each kind the stand-in learns background from (scene
windows, distractor objects, parts of objects; drawn by ``clip_standin._background_box``
with a fixed seed from the split's own images, so no crop was seen in training). Prints,
per CLIP: object accuracy over K+1 and over the K names, the share of objects called
background, and per background kind the share called background. Every CLIP sees the
same crops; ``--world-root`` must be a world whose annotations list distractors (version 3).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from coin_ray.cloud.clip_score import ClipBoxScorer
from coin_ray.config import DEFAULT_TEMPLATES, FOGGY_SHAPES_CATEGORIES
from coin_ray.world.build import STYLE
from coin_ray.world.clip_standin import BACKGROUND_KINDS, _background_box, load_distractors
from coin_ray.world.cloud_standin import load_coco_split


def sample_background(data: list, distractors: list, kind: str, count: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """``count`` (image index, xyxy box) non-object boxes of one kind."""
    rng = np.random.default_rng([seed, list(BACKGROUND_KINDS).index(kind)])
    out: list[tuple[int, np.ndarray]] = []
    for _ in range(200 * count):
        if len(out) == count:
            break
        found = _background_box(rng, data, distractors, kind)
        if found is not None:
            out.append(found)
    return out


def score_boxes(scorer: ClipBoxScorer, data: list, boxes: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """(N, K+1) CLIP probs of the listed (image index, box), in order."""
    out = np.zeros((len(boxes), len(scorer.categories) + 1), np.float32)
    by_image: dict[int, list[int]] = {}
    for n, (i, _) in enumerate(boxes):
        by_image.setdefault(i, []).append(n)
    for i, rows in by_image.items():
        out[rows] = scorer.probs(data[i][0], np.stack([boxes[n][1] for n in rows]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-root", required=True)
    p.add_argument("--clip", action="append", required=True, help="name=folder (repeatable)")
    p.add_argument("--split", default="target_val", choices=["target_val", "source_val", "target_train"])
    p.add_argument("--per-kind", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="")
    args = p.parse_args()
    folder = f"{args.world_root}/{args.split}"
    data = [(img, b, lab - 1) for img, b, lab in load_coco_split(f"{folder}/images", f"{folder}/annotations.json")]
    distractors = load_distractors(f"{folder}/annotations.json")
    objects = [(i, box) for i, (_, boxes, _) in enumerate(data) for box in boxes]
    labels = np.concatenate([lab for _, _, lab in data])
    background = {kind: sample_background(data, distractors, kind, args.per_kind, args.seed) for kind in BACKGROUND_KINDS}
    k = len(FOGGY_SHAPES_CATEGORIES)
    results = {}
    print(f"\n{args.split}: {len(objects)} objects, " + ", ".join(f"{len(v)} {n}" for n, v in background.items()))
    print("| CLIP | objects right (K+1) | objects right (K names) | objects called background | "
          + " | ".join(f"{n} called background" for n in background) + " |")
    print("|---" * (4 + len(background)) + "|")
    for spec in args.clip:
        name, path = spec.split("=", 1)
        scorer = ClipBoxScorer(path, FOGGY_SHAPES_CATEGORIES, templates=DEFAULT_TEMPLATES, style=STYLE)
        probs = score_boxes(scorer, data, objects)
        row = {"objects_k1": float((probs.argmax(1) == labels).mean()),
               "objects_k": float((probs[:, :k].argmax(1) == labels).mean()),
               "objects_background": float((probs.argmax(1) == k).mean())}
        for kind, boxes in background.items():
            row[kind] = float((score_boxes(scorer, data, boxes).argmax(1) == k).mean())
        results[name] = row
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in row.values()) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"split": args.split, "objects": len(objects),
                       "background": {n: len(v) for n, v in background.items()}, "clips": results}, handle, indent=1)


if __name__ == "__main__":
    main()
