"""Do the cloud and CLIP know different things? The per-class agreement table on a world's split.
Backs docs/method.md (Foggy-Shapes: the two sources fail differently) and docs/results-history.md, 2026-11-30.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/probes/source_agreement.py [--size demo] [--seed 0]
        [--cloud-confusion RHO] [--cache DIR] [--split target_train] [--clip-det RUN/clip_det/detections.parquet]
        [--json OUT.json]

Builds (or reuses) the Foggy-Shapes world, runs its stand-in cloud detector on every image of
the split (score >= 0.05, as the demo collection serves it) and scores every cloud box with
the stand-in CLIP as the collector does (K names + background, the default prompt ensemble
with the world's style phrase). Prints, per class, among cloud boxes hitting a ground-truth
object (IoU >= 0.5): CLIP right & cloud wrong, cloud right & CLIP wrong, both right, both
wrong (``coin_ray.source_agreement``); how often CLIP calls junk boxes and object boxes
background; and the mAP50 of the cloud and of the CLIP row on the split. With
``--clip-det`` the same table for a CLIP detector's stored detections against the cloud.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from coin_ray.cloud.clip_score import ClipBoxScorer, clip_baseline
from coin_ray.config import DEFAULT_TEMPLATES
from coin_ray.data.datasets import load_coco
from coin_ray.data.images import load_image
from coin_ray.evaluate import evaluate
from coin_ray.schema import Detections, table_to_records
from coin_ray.source_agreement import agreement_table, background_rates, table_markdown
from coin_ray.world.build import build_world, world_at
from coin_ray.world.cloud_standin import StandInCloudDetector
from coin_ray.world.quality import detect_split


def k_way(record: Detections) -> Detections:
    """The record a K-way collector gives: softmax over the K names (background column 0)."""
    if len(record) == 0:
        return record
    probs = record.probs.copy()
    probs[:, -1] = 0.0
    probs /= np.maximum(probs.sum(1, keepdims=True), 1e-12)
    return Detections(record.image_id, record.uri, record.width, record.height, record.boxes,
                      probs[:, :-1].argmax(1), probs[:, :-1].max(1), probs, record.source, record.error)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="demo", choices=["tiny", "demo", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cloud-confusion", type=float, default=0.0)
    p.add_argument("--cache", default=None, help="world cache folder (default: $COIN_RAY_CACHE or ~/.cache)")
    p.add_argument("--world-root", default="", help="use the world built in this folder as it is (no checks, "
                   "no rebuild: e.g. one from an older world version)")
    p.add_argument("--split", default="target_train", choices=["target_train", "target_val"])
    p.add_argument("--clip", default="", help="a CLIP folder instead of the world's stand-in")
    p.add_argument("--k-way", action="store_true",
                   help="score among the K names only, as the collector did before the background class")
    p.add_argument("--clip-det", default="", help="a parquet of CLIP-detector records to compare as well")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args()
    start = time.time()
    world = (world_at(Path(args.world_root), args.size, args.seed, args.cloud_confusion) if args.world_root else
             build_world(args.size, cache_dir=args.cache, seed=args.seed, cloud_confusion=args.cloud_confusion))
    images, annotations = {"target_train": (world.target_train_images, world.target_train_json),
                           "target_val": (world.target_val_images, world.target_val_json)}[args.split]
    split = load_coco(str(annotations), str(images), world.categories)
    cloud = detect_split(StandInCloudDetector.load(world.cloud_detector), split)
    scorer = ClipBoxScorer(args.clip or str(world.clip_dir), world.categories, templates=DEFAULT_TEMPLATES,
                           style=world.style)
    clip = [scorer.score(c, load_image(c.uri)) for c in cloud]
    if args.k_way:
        clip = [k_way(r) for r in clip]
    table = agreement_table(split, cloud, clip, aligned=True)
    rates = background_rates(split, cloud, clip)
    maps = {"cloud": evaluate(split, cloud).map50, "clip_row": evaluate(split, [clip_baseline(r) for r in clip]).map50}
    print(f"\n== {args.size} world (seed {args.seed}, cloud_confusion {args.cloud_confusion:g}), {args.split}"
          f"{', K-way CLIP' if args.k_way else ''}: "
          f"{len(split.items)} images, {sum(len(c) for c in cloud)} cloud boxes ({time.time() - start:.0f}s)")
    print(table_markdown(table, "CLIP"))
    print(f"CLIP calls background {100 * rates['junk_called_background']:.1f}% of {rates['junk_boxes']} junk "
          f"cloud boxes and {100 * rates['objects_called_background']:.1f}% of {rates['object_boxes']} object boxes")
    print(f"mAP50 on {args.split}: cloud {maps['cloud']:.1f}, CLIP row {maps['clip_row']:.1f}")
    out = {"world": args.size, "k_way": args.k_way, "seed": args.seed, "cloud_confusion": args.cloud_confusion, "split": args.split,
           "clip": table, "background": rates, "map50": maps}
    if args.clip_det:
        from coin_ray import storage

        det = table_to_records(storage.read_parquet(args.clip_det))
        out["clip_det"] = agreement_table(split, cloud, det, aligned=False)
        print(table_markdown(out["clip_det"], "CLIP det"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
