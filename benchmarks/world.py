"""How long does a Foggy-Shapes world take to build, and how good are its stand-ins? (run by hand)

    .venv/bin/python benchmarks/world.py [--size demo] [--cache DIR] [--reuse] [--bootstrap 20]

Builds the world in a fresh cache folder (or reuses ``--cache`` with ``--reuse``), then
prints: build time; the stand-in cloud detector's mAP50 on source val (clear) and target
val (the same scenes in fog), with a bootstrap standard deviation over val images (how
much of a difference the val split can resolve); the stand-in CLIP's zero-shot accuracy
on ground-truth crops of both splits (8-way, plain prompts and prompts with the style
phrase).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

import numpy as np

from coin_ray.config import DEFAULT_TEMPLATES
from coin_ray.data.datasets import LabelledSplit, load_coco
from coin_ray.evaluate import evaluate
from coin_ray.world.build import build_world
from coin_ray.world.cloud_standin import StandInCloudDetector
from coin_ray.world.quality import clip_crop_accuracy, detect_split, gt_crops


def bootstrap_std(split: LabelledSplit, records: list, rounds: int, seed: int = 0) -> float:
    """Std of mAP50 over image resamples of the split (with replacement)."""
    if rounds <= 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    by_uri = {r.uri: r for r in records}
    values = []
    for _ in range(rounds):
        pick = rng.integers(len(split.items), size=len(split.items))
        items, recs = [], []
        for n, i in enumerate(pick):  # a resampled image becomes a new image (unique uri)
            gt = split.items[i]
            uri = f"{gt.uri}#{n}"
            items.append(type(gt)(f"{gt.image_id}#{n}", uri, gt.width, gt.height, gt.boxes, gt.labels, gt.ignore))
            rec = by_uri[gt.uri]
            recs.append(type(rec)(f"{rec.image_id}#{n}", uri, rec.width, rec.height, rec.boxes, rec.labels,
                                  rec.scores, rec.probs, rec.source))
        values.append(evaluate(LabelledSplit(split.categories, items), recs).map50)
    return float(np.std(values))


def _cpu_seconds() -> tuple[float, float]:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="demo", choices=["tiny", "demo", "bench"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="", help="cache folder (default: a fresh temporary one)")
    p.add_argument("--reuse", action="store_true", help="reuse a world already in --cache")
    p.add_argument("--bootstrap", type=int, default=20)
    args = p.parse_args()
    cache = args.cache or tempfile.mkdtemp(prefix="coin_ray_world_")
    start, cpu = time.time(), _cpu_seconds()
    world = build_world(args.size, cache_dir=cache, seed=args.seed)
    build_s, cpu = time.time() - start, [b - a for a, b in zip(cpu, _cpu_seconds())]
    print(f"\n== Foggy-Shapes {args.size} (seed {args.seed}) at {world.root}")
    # CPU seconds say what the build costs when the machine is shared (wall time then lies).
    print(f"build time: {build_s:.0f} s wall, CPU {cpu[0]:.0f} s in this process + {cpu[1]:.0f} s in "
          f"children (rendering, CLIP){' (reused)' if args.reuse else ''}; load average {os.getloadavg()[0]:.1f}")
    detector = StandInCloudDetector.load(world.cloud_detector)
    styled = [t[:-1] + f", {world.style}." for t in DEFAULT_TEMPLATES]
    rows = []
    for name, images, json_path in [("source val (clear)", world.source_val_images, world.source_val_json),
                                    ("target val (fog)", world.target_val_images, world.target_val_json)]:
        split = load_coco(str(json_path), str(images), world.categories)
        records = detect_split(detector, split)
        result = evaluate(split, records)
        crops, labels = gt_crops(split)
        plain = clip_crop_accuracy(world.clip_dir, crops, labels, world.categories, DEFAULT_TEMPLATES)
        style = clip_crop_accuracy(world.clip_dir, crops, labels, world.categories, styled)
        rows.append((name, len(split.items), result, bootstrap_std(split, records, args.bootstrap),
                     len(crops), plain, style))
    print("| split | images | cloud det mAP50 | bootstrap std | CLIP crops | CLIP acc | CLIP acc (style) |")
    print("|---|---|---|---|---|---|---|")
    for name, n, result, std, n_crops, plain, style in rows:
        print(f"| {name} | {n} | {result.map50:.1f} | {std:.1f} | {n_crops} | {100 * plain:.1f} | {100 * style:.1f} |")
    for name, _, result, *_ in rows:
        print(f"{name} AP50: " + ", ".join(f"{k} {v:.1f}" for k, v in result.ap50.items()))
    drop = rows[0][2].map50 - rows[1][2].map50
    print(f"domain shift (source - target mAP50): {drop:.1f} points")


if __name__ == "__main__":
    main()
