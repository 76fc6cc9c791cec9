"""What Ray Train adds to a training stage: the distillation stage through Ray Train against
the same distillation in this process, on the same run, seed and steps.

    .venv/bin/python benchmarks/train_stage.py --from-run runs/run-xxxx --steps 600 \
        model.target_backbone=mobilenet_v3

``--from-run`` is a run whose stages 0-2 (collect, disseminate, clip_det) are done (for
example the demo's, after ``./scripts/demo``); it is only read: the Ray stage runs on a
copy of it in a temporary folder. Both runs use ``ray.cpus_per_worker`` torch threads.
Prints both wall times, their ratio, and whether the two trainings logged the same final
loss (they must: the Ray shell changes where metrics go, not the training). Wall time, so
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from coin_ray.config import load_config, with_updates  # noqa: E402
from coin_ray.data.datasets import target_uris  # noqa: E402
from coin_ray.demo import with_demo_world  # noqa: E402
from coin_ray.ray.pipeline import run_adaptation  # noqa: E402
from coin_ray.run import RunDir  # noqa: E402
from coin_ray.train.data import clip_det_records, cloud_records  # noqa: E402
from coin_ray.train.distill import distill  # noqa: E402

PREPARED = ("collect", "disseminate", "clip_det")


def in_process(cfg, run: RunDir) -> tuple[float, float]:
    """(wall seconds, final loss) of ``distill`` in this process."""
    items = cloud_records(run, target_uris(cfg))  # what the Ray stage's workers train on
    last: dict[str, float] = {}
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    started = time.perf_counter()
    distill(cfg, run.clip_detector, items, on_step=lambda step, metrics: last.update(metrics),
            teacher_records=clip_det_records(run))  # as the Ray stage's workers do
    return time.perf_counter() - started, last["loss"]


def through_ray(cfg, run: RunDir, workdir: Path) -> tuple[float, float]:
    """(wall seconds, final loss) of the distill stage under Ray Train, on a copy of ``run``
    (a requested stage is forgotten and trained from scratch, so its old folder is not copied)."""
    copy = workdir / Path(run.root).name
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("distill"))
    cfg = with_updates(cfg, [f"storage={workdir}", f"run_id={copy.name}"])
    started = time.perf_counter()
    run_adaptation(cfg, stages=["distill"], num_cpus=max(2, int(cfg.ray.cpus_per_worker)))
    seconds = time.perf_counter() - started
    lines = (copy / "distill" / "metrics.jsonl").read_text().splitlines()
    return seconds, json.loads(lines[-1])["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", required=True, help="a run whose collect, disseminate and clip_det are done")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (as the run was made)")
    args = parser.parse_args()
    run = RunDir(args.from_run)
    missing = [s for s in PREPARED if not run.is_done(s)]
    if missing:
        raise SystemExit(f"{args.from_run}: stages {missing} are not done")
    cfg = with_demo_world(load_config(None, [*args.overrides, f"train.distill.steps={args.steps}"]))
    local_s, local_loss = in_process(cfg, run)
    with tempfile.TemporaryDirectory() as tmp:
        ray_s, ray_loss = through_ray(cfg, run, Path(tmp))
    print(f"distill, {args.steps} steps, {cfg.ray.cpus_per_worker:g} thread(s): in-process {local_s:.0f} s, "
          f"Ray Train stage {ray_s:.0f} s ({ray_s / local_s:.2f}x); final loss "
          f"{'the same' if abs(local_loss - ray_loss) < 1e-5 else f'differs ({local_loss:.5f} vs {ray_loss:.5f})'}")


if __name__ == "__main__":
    main()
