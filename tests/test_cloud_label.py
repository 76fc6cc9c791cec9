"""The cloud-label student (train.cloud_label): its targets, its cut, and its Table 1 row."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from coin_ray import storage
from coin_ray.config import load_config, with_updates
from coin_ray.data.datasets import load_coco, val_split
from coin_ray.demo import with_demo_world
from coin_ray.models.build import save_detector
from coin_ray.models.ov_rcnn import OpenVocabularyRCNN
from coin_ray.ray.stages import evaluate_rows, train_cloud_label_student
from coin_ray.report import write_report
from coin_ray.run import RunDir, stage_settings
from coin_ray.schema import Detections, records_to_table
from coin_ray.train.cloud_label import (CLOUD_LABEL_STUDENT, MIN_SCORES, SOURCE_CLOUD_LABEL, cloud_label_records,
                                        pick_min_score)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cloud(image_id: str, scores: list[float], labels: list[int], k: int = 3) -> Detections:
    n = len(scores)
    boxes = np.array([[i, i, i + 10, i + 20] for i in range(n)], np.float32)
    probs = np.full((n, k + 1), 0.1, np.float32)
    return Detections(image_id, f"/img/{image_id}.png", 64, 48, boxes, labels, scores, probs, "cloud")


def test_cloud_boxes_at_or_above_the_cut_become_hard_ground_truth():
    error = Detections("e", "/img/e.png", 64, 48, np.zeros((0, 4)), [], [], np.zeros((0, 4)), "cloud", error="timeout")
    records = [_cloud("a", [0.9, 0.7, 0.5, 0.29], [2, 0, 1, 1]), error, _cloud("b", [0.2], [0])]
    out = cloud_label_records(records, 0.7)
    # The error record goes; the image with no box left stays, as a negative.
    assert [r.image_id for r in out] == ["a", "b"]
    # float32(0.7) = 0.69999999 passes a cut of 0.7: the cut is taken in the scores' float32.
    assert out[0].labels.tolist() == [2, 0] and out[0].scores.tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(out[0].boxes, [[0, 0, 10, 20], [1, 1, 11, 21]])
    np.testing.assert_array_equal(out[0].probs, [[0, 0, 1, 0], [1, 0, 0, 0]])
    assert len(out[1]) == 0
    assert [len(r) for r in cloud_label_records(records, 0.3)] == [3, 0]
    assert {r.source for r in out} == {SOURCE_CLOUD_LABEL}
    assert records[0].scores.tolist() == pytest.approx([0.9, 0.7, 0.5, 0.29])  # input untouched


def test_the_cut_with_the_best_map_wins_ties_go_to_the_lowest():
    # The demo run's 1600-step figures of issue 26: s = 0.7 was best.
    assert pick_min_score({0.3: 31.6, 0.5: 33.6, 0.7: 33.8}) == 0.7
    assert pick_min_score({0.3: 40.0, 0.5: 33.6, 0.7: 33.8}) == 0.3
    assert pick_min_score({0.7: 12.5, 0.3: 12.5, 0.5: 12.0}) == 0.3
    assert pick_min_score({0.3: math.nan, 0.5: 0.0}) == 0.5
    with pytest.raises(ValueError):
        pick_min_score({})


def _train_records(world) -> list[Detections]:
    """The tiny world's target train ground truth as cloud records, scores 0.9 / 0.6 / 0.4
    in turn, so each cut keeps a different set of boxes."""
    split = load_coco(str(world.target_train_json), str(world.target_train_images), world.categories)
    out = []
    for gt in split.items:
        n = len(gt.boxes)
        scores = np.resize(np.array([0.9, 0.6, 0.4], np.float32), n)
        probs = np.eye(len(world.categories) + 1, dtype=np.float32)[gt.labels]
        out.append(Detections(gt.image_id, gt.uri, gt.width, gt.height, gt.boxes, gt.labels, scores, probs, "cloud"))
    return out


def test_the_row_is_in_a_tiny_runs_table_next_to_the_cloud(tiny_world, tmp_path):
    cfg = with_demo_world(load_config(None, [
        "data.world=tiny", f"data.world_cache={tiny_world.root.parent.parent}", f"storage={tmp_path}", "run_id=r", "model.target_backbone=mobilenet_v3",
        "train.distill.steps=1", "train.distill.batch_size=2", "model.min_size=64", "model.max_size=128"]))
    run = RunDir(str(tmp_path / "r"))
    teacher = OpenVocabularyRCNN.from_clip(cfg.clip.model, cfg.data.categories, cfg.model, style=cfg.data.style, seed=0)
    save_detector(teacher, run.clip_detector)
    storage.write_parquet(records_to_table(_train_records(tiny_world)), run.cloud_detections)
    split = val_split(cfg)
    assert evaluate_rows(cfg, run).keys() == {"Cloud det"}  # off by default: no row, no training

    on = with_updates(cfg, ["report.cloud_label_student=true"])
    note = train_cloud_label_student(on, run, split)
    choice = json.loads(storage.read_text(run.cloud_label_choice))
    tried = {float(s): m for s, m in choice["map50_by_min_score"].items()}
    assert sorted(tried) == list(MIN_SCORES) and choice["min_score"] == pick_min_score(tried) == note["min_score"]
    results = evaluate_rows(on, run)
    assert list(results)[:2] == ["Cloud det", CLOUD_LABEL_STUDENT]
    assert results[CLOUD_LABEL_STUDENT].map50 == pytest.approx(tried[choice["min_score"]])
    md = write_report(on, run, split, results, row_notes={CLOUD_LABEL_STUDENT: note})
    assert f"| {CLOUD_LABEL_STUDENT} |" in md and f"score >= {choice['min_score']:g} as ground truth" in md
    assert json.loads(storage.read_text(storage.join(run.report_dir, "metrics.json")))["row_notes"] == {
        CLOUD_LABEL_STUDENT: note}
    # The switch is an evaluate setting (turning it on evaluates again), recorded only when on.
    assert stage_settings(on, "evaluate")["report.cloud_label_student"] is True
    assert "report.cloud_label_student" not in stage_settings(cfg, "evaluate")
    assert evaluate_rows(cfg, run).keys() == {"Cloud det"}  # the stored detections are not shown when off
