"""The COIN distillation step over the Oracle's supervised step, in one process (issue 26).

    .venv/bin/python benchmarks/step_ratio.py                       # demo shapes, one thread
    .venv/bin/python benchmarks/step_ratio.py --images 40 --teacher-steps 150 --steps 12

Both steps train the same target detector (``model.target_backbone``, mobilenet_v3 as
``scripts/demo`` distils) on the same batches of ``--batch`` images of the world's target
train split, alternating, at one torch thread:

    COIN      ``coin_ray.train.distill.distill_step``: the teacher's (cached, frozen)
              detections, separation, the student's pass, CKG forward and its second-order
              update, the losses, backward and step, prototype updates
    Oracle    ``coin_ray.train.disseminate.disseminate_step`` on the images' ground truth,
              as ``coin_ray.train.oracle`` trains it (L_RPN + L_ROI + lambda L_align, EMA)

Loading and decoding the batch is outside both timings (the two loops do it alike). The
student's views (flip, strong augmentation) are drawn by the batch loader, which runs a
step ahead in its own thread (``coin_ray.train.distill.batches_ahead``); they are timed on
their own and printed as a second ratio, step + views, the cost per step when no core is
free to overlap them.
What it needs is made once and cached under ``--cache`` (default ~/coin-ray-runs/step-ratio):
the world's stand-in cloud detections of the first ``--images`` target images, a CLIP
detector disseminated ``--teacher-steps`` steps on them, and that detector's detections (the
clip_det stage's, which the frozen teacher reuses). Images, CLIP, detectors and batch are
the demo's; the teacher is less trained than the demo's (600 steps over 300 images), so its
set sizes are printed with the times.

Times are process CPU time (one thread: the same as its own wall time, but not the
neighbours'); medians. The ratio before burn-up, after it, and the two weighted by the
burn-up fraction (``train.distill.burn_up``) are printed and written to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from coin_ray import storage  # noqa: E402
from coin_ray.cloud.mapping import CategoryMap, answer_to_detections  # noqa: E402
from coin_ray.config import Config, load_config, with_updates  # noqa: E402
from coin_ray.data.datasets import load_coco  # noqa: E402
from coin_ray.data.images import load_image  # noqa: E402
from coin_ray.demo import demo_world, with_demo_world  # noqa: E402
from coin_ray.models.build import build_student, load_detector, save_detector  # noqa: E402
from coin_ray.schema import Detections, records_to_table, table_to_records  # noqa: E402
from coin_ray.train import distill  # noqa: E402
from coin_ray.train.data import DetectionDataset, image_tensor, step_indices  # noqa: E402
from coin_ray.train.disseminate import build_optimizer, disseminate, disseminate_step  # noqa: E402
from coin_ray.train.augment import draw_student_view  # noqa: E402
from coin_ray.train.loop import step_generator, view_generator  # noqa: E402
from coin_ray.train.oracle import ground_truth_records, oracle_schedule  # noqa: E402
from coin_ray.train.schedule import Phase, build_distill_scheduler  # noqa: E402
from coin_ray.world.cloud_standin import StandInCloudDetector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cloud_detections(cfg: Config, uris: list[str], world) -> list[Detections]:
    """The world's stand-in cloud detector on ``uris``, as the collect stage records them."""
    cloud = StandInCloudDetector.load(world.cloud_detector, score_threshold=cfg.cloud.threshold)
    cmap = CategoryMap.build(cfg.data.categories)
    out = []
    for i, uri in enumerate(uris):
        image = load_image(uri)
        answer = cloud.detect(b"", image, cmap.prompt_list())
        record, _ = answer_to_detections(answer, cmap, f"{i:06d}", uri, image.shape[1], image.shape[0])
        out.append(record)
    return out


def prepare(cfg: Config, images: int, teacher_steps: int, cache: str) -> tuple[str, list[Detections], list[Detections]]:
    """(teacher uri, cloud records, the teacher's records) of the first ``images`` target
    images, made once under ``cache`` (see the module doc)."""
    world = demo_world(cfg)
    split = load_coco(str(world.target_train_json), str(world.target_train_images), cfg.data.categories)
    uris = [g.uri for g in split.items[:images]]
    root = storage.join(cache, f"{cfg.data.world}-{images}-images-{teacher_steps}-steps")
    paths = {name: storage.join(root, name) for name in ("cloud.parquet", "teacher.pt", "clip_det.parquet")}
    if not storage.exists(paths["cloud.parquet"]):
        storage.write_parquet(records_to_table(cloud_detections(cfg, uris, world)), paths["cloud.parquet"])
    cloud = table_to_records(storage.read_parquet(paths["cloud.parquet"]))
    if not storage.exists(paths["teacher.pt"]):
        teacher = disseminate(with_updates(cfg, [f"train.disseminate.steps={teacher_steps}",
                                                 "train.disseminate.labels=cloud"]), cloud)
        save_detector(teacher, paths["teacher.pt"])
    if not storage.exists(paths["clip_det.parquet"]):
        teacher = load_detector(paths["teacher.pt"]).eval()
        found = []
        for rec in cloud:
            [det] = teacher.detect([image_tensor(load_image(rec.uri))])
            det = {k: v.numpy() for k, v in det.items()}
            found.append(Detections(rec.image_id, rec.uri, rec.width, rec.height, det["boxes"], det["labels"],
                                    det["scores"], det["probs"], "clip_det"))
        storage.write_parquet(records_to_table(found), paths["clip_det.parquet"])
    return paths["teacher.pt"], cloud, table_to_records(storage.read_parquet(paths["clip_det.parquet"]))


def time_steps(cfg: Config, teacher_uri: str, cloud: list[Detections], teacher_records: list[Detections],
               truth: list[Detections], steps: int) -> dict[str, list[float]]:
    """CPU seconds of each COIN step (before and after burn-up) and of the Oracle's step on
    the same batches; the first step of each phase is a warm-up and is not kept."""
    d = cfg.train.distill
    variants = {"coin": distill.distill_step}
    states = {}
    for name in variants:
        states[name] = distill.build_run_state(cfg, teacher_uri)
        distill.remember_teacher_detections(states[name], DetectionDataset(cloud, cfg.num_classes), teacher_records,
                                            d.min_clip_score)
        states[name].student.train()
    schedule = oracle_schedule(cfg)
    oracle = build_student(cfg, load_detector(teacher_uri)).train()
    optimizer = build_optimizer(oracle, schedule)
    scheduler = build_distill_scheduler(optimizer, d)
    coin_data, gt_data = DetectionDataset(cloud, cfg.num_classes), DetectionDataset(truth, cfg.num_classes)
    times: dict[str, list[float]] = {"oracle": []}
    sets = {}
    for phase in (Phase(after_burn_up=False), Phase(after_burn_up=True)):
        tag = "after" if phase.after_burn_up else "before"
        for step in range(steps + 1):
            indices = step_indices(len(coin_data), d.batch_size, step, cfg.seed)
            batch = distill.load_batch(coin_data, indices, torch.device("cpu"))
            # The student's views, as the loader thread of run_steps draws them ahead of the step.
            generator = view_generator(cfg.seed, 0, step + 1)
            start = time.process_time()
            batch.views = [draw_student_view(image, generator, flip=d.flip, strong=d.strong_augment)
                           for image in batch.images]
            if step:
                times.setdefault(f"views_{tag}", []).append(time.process_time() - start)
            for name, fn in variants.items():
                states[name].generator = step_generator(cfg.seed, 0, step + 1)
                start = time.process_time()
                metrics = fn(states[name], batch, phase, d)
                if step:
                    times.setdefault(f"{name}_{tag}", []).append(time.process_time() - start)
                sets[tag] = {k: metrics[k] for k in ("sep_consistent", "sep_inconsistent", "sep_private")}
            images, targets = batch.images, [gt_data[i][1] for i in indices]
            start = time.process_time()
            disseminate_step(oracle, images, targets, optimizer, scheduler, schedule, step_generator(cfg.seed, 0, step + 1))
            if step:
                times["oracle"].append(time.process_time() - start)
    times["sets"] = sets  # type: ignore[assignment]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="demo", choices=["tiny", "demo", "bench"])
    parser.add_argument("--images", type=int, default=40, help="target train images used (the batches' pool)")
    parser.add_argument("--teacher-steps", type=int, default=150, help="dissemination steps of the teacher")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per phase (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path.home() / "coin-ray-runs" / "step-ratio"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "step-ratio.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = with_demo_world(load_config(None, [f"data.world={args.world}", "model.target_backbone=mobilenet_v3",
                                             *args.overrides]))
    teacher_uri, cloud, teacher_records = prepare(cfg, args.images, args.teacher_steps, args.cache)
    world = demo_world(cfg)
    split = load_coco(str(world.target_train_json), str(world.target_train_images), cfg.data.categories)
    by_uri = {r.uri: r for r in ground_truth_records(split)}
    truth = [by_uri[r.uri] for r in cloud]
    cfg = with_updates(cfg, [f"train.distill.steps={max(1, 2 * args.steps)}"])  # the schedule's length only
    times = time_steps(cfg, teacher_uri, cloud, teacher_records, truth, args.steps)
    sets = times.pop("sets")
    med = {k: statistics.median(v) for k, v in times.items()}
    burn = cfg.train.distill.burn_up
    out = {"world": args.world, "images": args.images, "teacher_steps": args.teacher_steps,
           "batch": cfg.train.distill.batch_size, "threads": torch.get_num_threads(),
           "target_backbone": cfg.model.target_backbone, "timed_steps_per_phase": args.steps,
           "burn_up": burn, "sets_last_batch": sets, "machine": platform.processor() or platform.machine(),
           "median_cpu_ms": {k: round(v * 1000, 1) for k, v in med.items()}}
    print(f"target={cfg.model.target_backbone} batch={cfg.train.distill.batch_size} threads={torch.get_num_threads()} "
          f"{args.world} images, {args.images} of them; last batch's sets {sets}")
    print(f"Oracle supervised step     {med['oracle'] * 1000:8.1f} ms CPU")
    ratio = {tag: med[f"coin_{tag}"] / med["oracle"] for tag in ("before", "after")}
    ratio["weighted"] = burn * ratio["before"] + (1 - burn) * ratio["after"]
    out["ratio_coin"] = {k: round(v, 3) for k, v in ratio.items()}
    print(f"COIN step                  before burn-up {med['coin_before'] * 1000:7.1f} ms ({ratio['before']:.2f}x), "
          f"after {med['coin_after'] * 1000:7.1f} ms ({ratio['after']:.2f}x), "
          f"weighted by burn-up {burn:g}: {ratio['weighted']:.2f}x (goal <= 1.3x)")
    # The views are drawn by the loader thread, off the step; with no core to spare they cost this much more.
    with_views = {tag: (med[f"coin_{tag}"] + med[f"views_{tag}"]) / med["oracle"] for tag in ("before", "after")}
    with_views["weighted"] = burn * with_views["before"] + (1 - burn) * with_views["after"]
    out["ratio_coin_with_views"] = {k: round(v, 3) for k, v in with_views.items()}
    print(f"student views (loader)     {med['views_before'] * 1000:8.1f} ms CPU per batch; step + views "
          f"{with_views['weighted']:.2f}x weighted")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
