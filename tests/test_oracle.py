"""The Oracle row: the target detector trained on ground truth (train.oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coin_ray.config import from_dict
from coin_ray.data.datasets import GroundTruth, LabelledSplit
from coin_ray.models.clip_factory import write_clip
from coin_ray.models.light_rcnn import LightRCNN
from coin_ray.models.build import save_detector
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.train.oracle import ground_truth_records, oracle_schedule, train_oracle

CATEGORIES = ["car", "person", "bus"]


# One intra-op thread (tests/conftest.py): learned numbers then match across machines.
pytestmark = pytest.mark.usefixtures("one_thread")


def _split(root) -> LabelledSplit:
    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        uri = str(root / f"{i}.png")
        Image.fromarray(image).save(uri)
        items.append(GroundTruth(str(i), uri, 80, 64, np.array([[4, 4, 30, 40], [35, 10, 60, 50]], np.float32),
                                 np.array([0, 2 - i]), np.array([False, i == 1])))
    return LabelledSplit(CATEGORIES, items)


def test_ground_truth_records_are_hard_and_skip_ignored(tmp_path):
    records = ground_truth_records(_split(tmp_path))
    assert [r.labels.tolist() for r in records] == [[0, 2], [0]]
    assert records[0].scores.tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(records[0].probs, [[1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(records[1].boxes, [[4, 4, 30, 40]])


def test_oracle_trains_the_distilled_target_on_the_distill_schedule(tmp_path):
    clip = write_clip(tmp_path / "clip", CATEGORIES + ["a", "photo", "of", "background"],
                      hidden_size=32, projection_dim=24, num_layers=2)
    overrides = ["model.min_size=64", "model.max_size=96", "model.target_backbone=mobilenet_v3",
                 "train.distill.steps=2", "train.distill.batch_size=2", "train.distill.lr=0.001",
                 f"clip.model={clip}", "data.style="]
    cfg = from_dict({"data": {"categories": CATEGORIES}}, overrides)
    teacher = OpenVocabularyRCNN.from_clip(str(clip), CATEGORIES, cfg.model, seed=0)
    save_detector(teacher, str(tmp_path / "teacher.pt"))
    schedule = oracle_schedule(cfg)
    assert (schedule.steps, schedule.batch_size, schedule.lr, schedule.min_cloud_score) == (2, 2, 0.001, 0.0)
    seen = []
    model = train_oracle(cfg, str(tmp_path / "teacher.pt"), _split(tmp_path),
                         on_step=lambda step, metrics: seen.append((step, metrics["loss"])))
    assert isinstance(model, LightRCNN) and [s for s, _ in seen] == [1, 2]
    assert all(np.isfinite(loss) for _, loss in seen)
