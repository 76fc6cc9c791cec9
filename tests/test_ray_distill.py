"""Stage 3 under Ray Train: 2 gloo workers with the second-order CKG loss, a kill, a resume."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
from PIL import Image

from coin_ray import storage
from coin_ray.config import from_dict
from coin_ray.models.build import build_detector, load_detector, save_detector
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.light_rcnn import LightRCNN
from coin_ray.ray.distill import distill_worker, run_distill
from coin_ray.run import RunDir
from coin_ray.schema import SOURCE_CLIP_DET, Detections, records_to_table
from coin_ray.train.data import image_tensor

pytestmark = pytest.mark.slow

CATEGORIES = ["car", "person", "bus"]


def make_run(root: Path, clip_dir: str, steps: int, target_backbone: str = "clip", fusion: str = "ckg") -> object:
    """A run dir with a 'disseminated' detector, its detections (the clip_det stage) and cloud
    records that half agree with them."""
    cfg = from_dict({
        "data": {"categories": CATEGORIES}, "clip": {"model": clip_dir}, "storage": str(root),
        "model": {"min_size": 64, "max_size": 96, "num_extra_context": 1, "detections_per_image": 6,
                  "score_threshold": 0.0, "target_backbone": target_backbone},
        "train": {"distill": {"steps": steps, "batch_size": 1, "burn_up": 0.25, "checkpoint_every": 2,
                              "log_every": 1, "min_score": 0.0, "min_clip_score": 0.0, "pi": 0.0,
                              # A long half-life: the EMA path runs, but the teacher stays near
                              # the CLIP detector, so its boxes keep matching the cloud's.
                              "teacher_half_life": 100.0, "fusion": fusion}},
        "ray": {"num_workers": 2, "cpus_per_worker": 1.0}})
    teacher = build_detector(cfg).eval()
    save_detector(teacher, str(root / "disseminate" / "model.pt"))
    run = RunDir(str(root))
    run.mark_done("disseminate")
    rng = np.random.default_rng(0)
    records, detected = [], []
    for i in range(4):
        uri = str(root / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, size=(72, 96, 3), dtype=np.uint8)).save(uri)
        det = teacher.detect([image_tensor(np.asarray(Image.open(uri)))])[0]
        detected.append(Detections(f"img{i}", uri, 96, 72, det["boxes"].numpy(), det["labels"].numpy(),
                                   det["scores"].numpy(), det["probs"].numpy(), SOURCE_CLIP_DET))
        labels = det["labels"][:4].clone()
        labels[1::2] = (labels[1::2] + 1) % len(CATEGORIES)
        records.append(Detections.from_class_only(f"img{i}", uri, 96, 72, det["boxes"][:4].numpy(),
                                                  labels.numpy(), np.full(len(labels), 0.9, np.float32),
                                                  len(CATEGORIES), "cloud"))
    storage.write_parquet(records_to_table(records), run.cloud_detections)
    storage.write_parquet(records_to_table(detected), run.clip_detections)
    run.mark_done("clip_det")
    return cfg


def flat_grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in module.parameters() if p.requires_grad])


def check_then_fail_once(step_to_fail: int, folder: str, step: int, state) -> None:
    """Rank 0 records, per step, how far the ranks' gradients are apart; every rank raises
    once after ``step_to_fail``."""
    rank = ray.train.get_context().get_world_rank()
    row = {"step": step}
    for name, module in (("student", state.detector), ("ckg", state.ckg)):
        grads = flat_grads(module)
        gathered = [torch.zeros_like(grads) for _ in range(2)]
        dist.all_gather(gathered, grads)
        row |= {f"{name}_diff": float((gathered[0] - gathered[1]).abs().max()), f"{name}_norm": float(grads.norm())}
    if rank == 0:
        with open(Path(folder) / "steps.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    marker = Path(folder) / f"failed-{rank}"
    if step == step_to_fail and not marker.exists():
        marker.touch()
        raise RuntimeError("injected worker failure")


@pytest.mark.timeout(480)
@pytest.mark.parametrize("target_backbone,fusion", [("clip", "ckg"), ("mobilenet_v3", "ds")])
def test_two_gloo_workers_agree_on_gradients_checkpoint_get_killed_and_resume(local_ray, tmp_path,
                                                                              target_backbone, fusion):
    clip_dir = str(write_clip(tmp_path / "clip", CATEGORIES + ["a", "photo", "of"], hidden_size=32,
                              projection_dim=32, num_layers=2))
    run_dir = tmp_path / "run"
    cfg = make_run(run_dir, clip_dir, steps=4, target_backbone=target_backbone, fusion=fusion)
    loop = functools.partial(distill_worker, after_step=functools.partial(check_then_fail_once, 3, str(tmp_path)))
    model_uri = run_distill(cfg, RunDir(str(run_dir)), loop=loop)

    rows = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    # Checkpoint at step 2, killed after step 3, resumed at step 3 (not 1, not 4).
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4]
    # With the CKG, the second-order loss was active at every step: the teacher stays the CLIP
    # detector (its EMA for the CLIP student), whose detections half agree with the cloud's.
    # Fusion ds leaves the CKG untrained.
    assert all((r["ckg_norm"] > 0) == (fusion == "ckg") for r in rows), [r["ckg_norm"] for r in rows]
    for r in rows:
        assert r["student_norm"] > 0
        assert r["student_diff"] <= 1e-6 * max(1.0, r["student_norm"])
        assert r["ckg_diff"] <= 1e-6 * max(1.0, r["ckg_norm"])
    logged = [json.loads(line)["step"] for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard" / "distill").iterdir())

    model = load_detector(model_uri)
    counts = model.meta["separation"]["counts"]  # counted since the resume (steps 3-4)
    if fusion == "ckg":
        assert counts["inconsistent_cloud"] > 0
    else:  # the estimated confusions settle the half of the labels the cloud flipped
        assert counts["relabelled"] > 0
    sets = json.loads((run_dir / "distill" / "sets.json").read_text())
    assert sets["separation"]["counts"] == counts and sets["fusion_name"] == fusion
    # Fusion ds estimated the sources' confusions from the stored records, on every box.
    assert ("confusions" in sets) == (fusion == "ds")
    if fusion == "ds":
        assert sets["confusions"]["items"] == 16 and sets["confusions"]["classes"] == CATEGORIES + ["background"]
    if target_backbone == "clip":
        fresh = build_detector(cfg)
    else:
        fresh = LightRCNN.from_teacher(load_detector(str(run_dir / "disseminate" / "model.pt")), cfg.model,
                                       seed=cfg.seed)
        assert type(model) is LightRCNN
    assert not torch.equal(model.roi_heads.box_predictor.weight, fresh.roi_heads.box_predictor.weight)
