"""Time one dissemination step (L_RPN + L_ROI + lambda L_align + prototype EMA) on CPU.

    .venv/bin/python benchmarks/disseminate_step.py [--threads 1] [--steps 20]

The demo setting: batch 4 of 256x160 images, a 64-px / patch-8 / width-64 stand-in CLIP,
8 categories, 5 boxes per image. Both region heads (``model.region_features`` pooled and
crops) are timed in the same process, their steps interleaved so that machine noise hits
both alike; prints each one's median and mean after 3 warm-up steps, and crops / pooled.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from coin_ray.config import FOGGY_SHAPES_CATEGORIES, from_dict
from coin_ray.models.build import build_detector
from coin_ray.models.clip_factory import write_clip
from coin_ray.train.disseminate import build_optimizer, disseminate_step
from coin_ray.train.loop import build_scheduler


def batch(n: int, k: int, generator: torch.Generator) -> tuple[list, list]:
    images = [torch.rand(3, 160, 256, generator=generator) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([200.0, 110.0])
        wh = 16 + torch.rand(5, 2, generator=generator) * 40
        labels = torch.randint(0, k, (5,), generator=generator)
        probs = torch.nn.functional.one_hot(labels, k + 1).float()
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1), "labels": labels, "probs": probs})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clip_dir = write_clip(tempfile.mkdtemp(), FOGGY_SHAPES_CATEGORIES + ["a", "photo", "of"])
    runs = {}
    for head in ("pooled", "crops"):
        cfg = from_dict({"clip": {"model": str(clip_dir)}, "model": {"region_features": head},
                         "train": {"disseminate": {"steps": args.steps + 3}}})
        model = build_detector(cfg).train()
        optimizer = build_optimizer(model, cfg.train.disseminate)
        runs[head] = (cfg, model, optimizer, build_scheduler(optimizer, cfg.train.disseminate.steps), [])
    generator = torch.Generator().manual_seed(0)
    images, targets = batch(cfg.train.disseminate.batch_size, cfg.num_classes, generator)
    for step in range(args.steps + 3):
        for cfg, model, optimizer, scheduler, times in runs.values():
            start = time.perf_counter()
            disseminate_step(model, images, targets, optimizer, scheduler, cfg.train.disseminate, generator)
            times.append(time.perf_counter() - start)
    medians = {}
    for head, (cfg, *_, times) in runs.items():
        times = times[3:]
        medians[head] = statistics.median(times)
        print(f"dissemination step ({head}), batch {cfg.train.disseminate.batch_size} x 160x256, "
              f"{args.threads} thread(s): median {medians[head] * 1000:.0f} ms, "
              f"mean {statistics.mean(times) * 1000:.0f} ms over {len(times)} steps")
    print(f"crops / pooled: {medians['crops'] / medians['pooled']:.2f}x")


if __name__ == "__main__":
    main()
