"""RoIAlign forward + backward: torchvision's ``roi_align`` against ``roi_align_rows`` (CPU).

    .venv/bin/python benchmarks/roi_align.py [--threads 2] [--repeats 20]

The shapes the demo's training stages pool (batch of 4 images of 160x256, stride 8, so a
20x32 map; regions spread over the image, some past its edges): the light target's 7x7 RoIs
of its 24-channel map, 512 per image, and the CLIP detector's 4x4 RoIs of its 64-wide
trunk, 128 per image. The two implementations alternate on the same inputs, so machine
noise hits both alike; prints each median, the ratio, and checks the values are identical.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import roi_align

from coin_ray.models.roi_align import roi_align_rows

SHAPES = {"light target (24 ch, 7x7, 512/image)": (24, 7, 512),
          "CLIP detector trunk (64 ch, 4x4, 128/image)": (64, 4, 128)}


def regions(per_image: int, generator: torch.Generator) -> list[torch.Tensor]:
    boxes = []
    for _ in range(4):
        corner = torch.rand(per_image, 2, generator=generator) * torch.tensor([256.0, 160.0]) - 8
        size = 8 + torch.rand(per_image, 2, generator=generator) * 100
        boxes.append(torch.cat([corner, corner + size], dim=1))
    return boxes


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    for name, (channels, size, per_image) in SHAPES.items():
        features = torch.randn(4, channels, 20, 32, generator=generator, requires_grad=True)
        boxes = regions(per_image, generator)
        upstream = torch.randn(4 * per_image, channels, size, size, generator=generator)
        theirs = lambda: roi_align(features, boxes, size, 1 / 8, sampling_ratio=1, aligned=True)  # noqa: E731
        ours = lambda: roi_align_rows(features, boxes, size, 1 / 8)  # noqa: E731
        same = torch.equal(theirs(), ours())
        times: dict[str, list[float]] = {"torchvision": [], "rows": []}
        for i in range(args.repeats + 2):
            for key, pool in (("torchvision", theirs), ("rows", ours)):
                seconds = timed(lambda: torch.autograd.grad(pool(), features, upstream))
                if i >= 2:  # warm-up
                    times[key].append(seconds)
        tv, rows = statistics.median(times["torchvision"]), statistics.median(times["rows"])
        print(f"{name}, {args.threads} thread(s), forward + backward: torchvision {tv * 1000:.1f} ms, "
              f"roi_align_rows {rows * 1000:.1f} ms ({tv / rows:.1f}x faster); forward identical: {same}")


if __name__ == "__main__":
    main()
