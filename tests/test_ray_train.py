"""Ray Train (2 gloo workers) for stage 1: a kill, a resume, and a resubmission of the finished
run; the detection actor pool."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import ray
import torch

from coin_ray import storage
from coin_ray.config import from_dict, with_updates
from coin_ray.data.images import load_image
from coin_ray.models.build import build_detector, load_detector, save_detector
from coin_ray.models.clip_factory import write_clip
from coin_ray.ray.detect import run_detection
from coin_ray.ray.disseminate import disseminate_worker, run_disseminate
from coin_ray.run import RunDir
from coin_ray.schema import SOURCE_CLIP, Detections, records_to_table, table_to_records
from coin_ray.train.data import image_tensor
from test_disseminate import CATEGORIES, make_world

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    words = ["car", "traffic", "light", "person", "a", "photo", "of"]
    return str(write_clip(tmp_path_factory.mktemp("clip"), words))


def run_config(clip_dir: str, run_dir: Path, steps: int) -> object:
    return from_dict({
        "data": {"categories": CATEGORIES},
        "clip": {"model": clip_dir, "num_actors": 2},
        "model": {"min_size": 96, "max_size": 128, "num_extra_context": 1},
        "train": {"disseminate": {"steps": steps, "batch_size": 1, "checkpoint_every": 2, "log_every": 1}},
        "ray": {"num_workers": 2, "cpus_per_worker": 1.0},
        "storage": str(run_dir)})


def fail_once_after(step_to_fail: int, folder: str, step: int) -> None:
    """Records each step rank 0 finishes; every rank raises once, after ``step_to_fail``."""
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        with open(Path(folder) / "steps.txt", "a") as f:
            f.write(f"{step}\n")
    marker = Path(folder) / f"failed-{rank}"
    if step == step_to_fail and not marker.exists():
        marker.touch()
        raise RuntimeError("injected worker failure")


def write_cloud_records(run_dir: Path, image_dir: Path) -> None:
    """cloud.parquet and a clip.parquet relabelling its boxes (stage 1 trains on CLIP's labels)."""
    cloud = make_world(image_dir, 4)
    storage.write_parquet(records_to_table(cloud), RunDir(str(run_dir)).cloud_detections)
    clip = [Detections(r.image_id, r.uri, r.width, r.height, r.boxes, r.labels[::-1], r.scores, r.probs[::-1],
                       SOURCE_CLIP, r.error) for r in cloud]
    storage.write_parquet(records_to_table(clip), RunDir(str(run_dir)).clip_scores)


def steps_done(folder: Path) -> list[int]:
    return [int(s) for s in (folder / "steps.txt").read_text().split()]


@pytest.mark.timeout(540)
def test_two_gloo_workers_checkpoint_get_killed_resume_and_resume_again_when_resubmitted(local_ray, clip_dir,
                                                                                         tmp_path):
    run_dir = tmp_path / "run"
    write_cloud_records(run_dir, tmp_path)
    cfg = run_config(clip_dir, run_dir, steps=4)
    loop = functools.partial(disseminate_worker, after_step=functools.partial(fail_once_after, 3, str(tmp_path)))
    model_uri = run_disseminate(cfg, RunDir(str(run_dir)), loop=loop)

    # Checkpoint at step 2, killed after step 3, resumed at step 3 (not 1, not 4).
    assert steps_done(tmp_path) == [1, 2, 3, 3, 4]
    metrics = (run_dir / "disseminate" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]
    model = load_detector(model_uri)
    assert not torch.equal(model.prototypes.vectors, build_detector(cfg).prototypes.vectors)

    # The finished run submitted again with a longer schedule resumes from its last checkpoint
    # (step 4) and trains step 5 only. (Ray's local mode, num_workers=0, keeps no run state.)
    run_disseminate(with_updates(cfg, ["train.disseminate.steps=5"]), RunDir(str(run_dir)), loop=loop)
    assert steps_done(tmp_path) == [1, 2, 3, 3, 4, 5]


@pytest.mark.timeout(180)
def test_detection_actor_pool_writes_one_record_per_image(local_ray, clip_dir, tmp_path):
    cfg = run_config(clip_dir, tmp_path, steps=1)
    detector = build_detector(cfg).eval()
    save_detector(detector, str(tmp_path / "model.pt"))
    uris = [r.uri for r in make_world(tmp_path, 3) if r.ok] + [str(tmp_path / "missing.png")]
    out = run_detection(cfg, str(tmp_path / "model.pt"), uris, str(tmp_path / "clip_det" / "detections.parquet"),
                        batch_size=2, num_actors=2)
    records = table_to_records(storage.read_parquet(out))
    assert [r.uri for r in records] == sorted(uris)
    assert {r.source for r in records} == {"clip_det"}
    broken = [r for r in records if not r.ok]
    assert len(broken) == 1 and broken[0].uri.endswith("missing.png")
    first = next(r for r in records if r.ok)
    expected = detector.detect([image_tensor(load_image(first.uri))])[0]
    assert (first.width, first.height) == (128, 96)
    assert torch.allclose(torch.as_tensor(first.boxes), expected["boxes"], atol=1e-4)
    assert torch.allclose(torch.as_tensor(first.probs), expected["probs"], atol=1e-5)
    assert first.probs.shape[1] == len(CATEGORIES) + 1
