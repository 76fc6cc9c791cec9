"""Enough to train on (issue 27, 4.3): a category with only a few boxes (or none at all), or a
small consistent set, is one warning line with the counts."""

from __future__ import annotations

import numpy as np
import pytest

from coin_ray.data_check import category_counts, consistent_counts, too_few
from coin_ray.schema import Detections

CATS = ["car", "person", "traffic light"]


def record(uri: str, boxes, labels, scores, source: str = "cloud") -> Detections:
    probs = np.eye(len(CATS) + 1, dtype=np.float32)[labels] if len(labels) else np.zeros((0, len(CATS) + 1))
    return Detections(uri, uri, 100, 100, np.asarray(boxes, np.float32).reshape(-1, 4), labels, scores, probs, source)


def test_boxes_are_counted_per_category_above_the_score():
    records = [record("a", [[0, 0, 10, 10], [20, 20, 40, 40]], [0, 0], [0.9, 0.2]),
               record("b", [[0, 0, 10, 10]], [1], [0.5]), record("c", [], [], [])]
    assert category_counts(records, CATS, min_score=0.3) == {"car": 1, "person": 1, "traffic light": 0}
    assert category_counts(records, CATS) == {"car": 2, "person": 1, "traffic light": 0}


def test_one_cloud_box_warns_naming_the_counts_and_none_says_nothing_to_train_on():
    line = too_few("cloud boxes to train on", {"car": 1, "person": 0, "traffic light": 7}, 5)
    assert line.count("\n") == 0 and "car 1, person 0, traffic light 7" in line
    assert "2 of 3 categories under 5" in line and line.endswith("little of car, person")
    assert too_few("x", {"car": 5, "person": 9}, 5) is None
    none = too_few("cloud boxes", {"car": 0, "person": 0}, 5)
    assert none.startswith("[coin-ray] warning: 0 cloud boxes (car 0, person 0): nothing to train on")


def test_the_consistent_set_is_counted_as_separation_makes_it():
    cloud = [record("a", [[0, 0, 10, 10], [50, 50, 90, 90]], [0, 1], [0.9, 0.9]),
             record("b", [[0, 0, 10, 10]], [2], [0.9])]
    clip = [record("a", [[1, 1, 10, 10], [50, 50, 90, 90]], [0, 2], [0.8, 0.8], "clip_det"),
            record("b", [[0, 0, 10, 10]], [2], [0.05], "clip_det")]  # below min_clip_score
    counts = consistent_counts(cloud, clip, CATS, min_score=0.3, min_clip_score=0.1, iou=0.5)
    assert counts == {"car": 1, "person": 0, "traffic light": 0}


def test_the_disseminate_stage_checks_the_collected_boxes_first(tmp_path, capsys):
    from coin_ray import storage
    from coin_ray.config import load_config
    from coin_ray.ray.stages import check_cloud_boxes
    from coin_ray.run import RunDir
    from coin_ray.schema import records_to_table

    run = RunDir(str(tmp_path / "run"))
    cfg = load_config(None, ["data.categories=[car,person,traffic light]"])
    one_box = [record("a.png", [[0, 0, 10, 10]], [0], [0.9]), record("b.png", [], [], [])]
    storage.write_parquet(records_to_table(one_box), run.cloud_detections)
    assert check_cloud_boxes(cfg, run) == {"car": 1, "person": 0, "traffic light": 0}
    assert "few cloud boxes to train on (2 images, score >= 0.3): car 1, person 0, traffic light 0" \
        in capsys.readouterr().out
    storage.write_parquet(records_to_table([record("b.png", [], [], [])]), run.cloud_detections)
    assert sum(check_cloud_boxes(cfg, run).values()) == 0
    assert "0 cloud boxes to train on (1 images, score >= 0.3)" in capsys.readouterr().out
