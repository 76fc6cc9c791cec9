"""Cost of one COIN distillation step against a plain supervised step of the same detector.

Both steps run on the same batch, in the same process, alternating, on the same student
architecture (a randomly initialised CLIP of the given size, saved and loaded like a real
checkpoint). The COIN step includes everything the paper's step does: the teacher's
detection pass, separation, the student's pass over proposals and the three sets, the
CKG's forward, its second-order gradient alignment and its optimizer step, the student's
backward and step, the prototype and EMA-teacher updates. The supervised step is
``compute_losses`` on the cloud boxes + backward + optimizer step.

    .venv/bin/python benchmarks/step_cost.py --steps 8 --images 2 --size 160
    .venv/bin/python benchmarks/step_cost.py --target-backbone mobilenet_v3   # the light student

Times are process CPU time (``time.process_time``), not wall time: on a shared machine
the wall clock mostly measures the neighbours. Prints the median of each and their ratios (the aim is <= 1.5x): before burn-up
the frozen teacher's detections are reused per image, after it the teacher detects on
every batch; the last line weighs the two by the burn-up fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

from coin_ray.config import DistillConfig, from_dict
from coin_ray.models.build import build_student
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.separate import SourceBoxes, as_source
from coin_ray.train.distill import Batch, Phase, build_state, distill_step

CATEGORIES = ["truck", "car", "rider", "person", "train", "motorcycle", "bicycle", "bus"]


def make_batch(teacher: OpenVocabularyRCNN, images: list[torch.Tensor], per_image: int) -> Batch:
    """Cloud detections that half agree with the teacher's, so every set is populated."""
    k = teacher.num_classes
    cloud = []
    for det in teacher.detect(images):
        src = as_source(det)
        src = src.select(torch.arange(min(per_image, len(src))))
        labels = src.labels.clone()
        labels[1::2] = (labels[1::2] + 1) % k
        probs = torch.nn.functional.one_hot(labels, k + 1).float() * 0.8 + 0.2 / (k + 1)
        cloud.append(SourceBoxes(src.boxes, labels, torch.full((len(labels),), 0.9), probs))
    return Batch(images, cloud)


def supervised_step(model: OpenVocabularyRCNN, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    targets = [{"boxes": c.boxes, "labels": c.labels, "probs": c.probs} for c in batch.cloud]
    losses = model.compute_losses(batch.images, targets).losses
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=160, help="shorter image side")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=8, help="cloud boxes per image")
    parser.add_argument("--burn-up", type=float, default=0.7, help="fraction of steps before burn-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--target-backbone", default="clip", choices=["clip", "mobilenet_v3", "resnet18"],
                        help="the student (and supervised) detector: model.target_backbone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip = str(write_clip(tmp, CATEGORIES + ["a", "photo", "of", "background"], image_size=224,
                              patch_size=16, hidden_size=args.hidden, projection_dim=args.hidden,
                              num_layers=args.layers))
        target_cfg = from_dict({"seed": 1, "data": {"categories": CATEGORIES, "style": ""},
                                "model": {"min_size": args.size, "max_size": 2 * args.size,
                                          "detections_per_image": 20, "score_threshold": 0.0,
                                          "target_backbone": args.target_backbone}})
        mc = dataclasses.replace(target_cfg.model, target_backbone="clip")
        teacher = OpenVocabularyRCNN.from_clip(clip, CATEGORIES, mc, style="", seed=0)
        # Two identical fresh targets: one distilled, one trained plainly on the same batch.
        student = build_student(target_cfg, teacher)
        plain = build_student(target_cfg, teacher)
    cfg = DistillConfig(steps=args.steps, min_score=0.0, min_clip_score=0.0, pi=0.0)
    state = build_state(teacher, student, cfg)
    plain.train()
    plain_opt = torch.optim.AdamW(plain.param_groups(cfg.lr), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    h, w = args.size, int(args.size * 1.5)
    batch = make_batch(state.teacher, [torch.rand(3, h, w, generator=gen) for _ in range(args.images)], args.boxes)

    batch.image_ids = [f"img{i}" for i in range(args.images)]
    times: dict[str, list[float]] = {"before": [], "after": [], "plain": []}
    metrics: dict[str, float] = {}
    # Before-burn-up steps first (the teacher's cache lives until burn-up), then after;
    # a supervised step after each COIN step, so both see the same machine state.
    for phase in ("before", "after"):
        for step in range(args.steps + 1):  # the first round of each phase is a warm-up
            t0 = time.process_time()
            metrics = distill_step(state, batch, Phase(after_burn_up=phase == "after"), cfg)
            t1 = time.process_time()
            supervised_step(plain, plain_opt, batch)
            t2 = time.process_time()
            if step:
                times[phase].append(t1 - t0)
                times["plain"].append(t2 - t1)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"target={args.target_backbone} threads={torch.get_num_threads()} images={args.images} size={h}x{w} hidden={args.hidden} "
          f"layers={args.layers} sets: consistent={metrics['sep_consistent']} "
          f"inconsistent={metrics['sep_inconsistent']} private={metrics['sep_private']}")
    print(f"supervised step               {med['plain'] * 1000:8.1f} ms CPU (median of {2 * args.steps})")
    print(f"COIN step before burn-up      {med['before'] * 1000:8.1f} ms  ratio {med['before'] / med['plain']:.2f}x")
    print(f"COIN step after burn-up       {med['after'] * 1000:8.1f} ms  ratio {med['after'] / med['plain']:.2f}x")
    print(f"COIN, burn-up at {args.burn_up:.0%} of steps  ratio "
          f"{(args.burn_up * med['before'] + (1 - args.burn_up) * med['after']) / med['plain']:.2f}x")


if __name__ == "__main__":
    main()
