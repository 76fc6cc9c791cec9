"""The per-class agreement table of the cloud and CLIP labels on cloud boxes."""

from __future__ import annotations

import numpy as np

from coin_ray.data.datasets import GroundTruth, LabelledSplit
from coin_ray.schema import SOURCE_CLIP, SOURCE_CLIP_DET, SOURCE_CLOUD, Detections
from coin_ray.source_agreement import OUTCOMES, agreement_table, background_rates, hit_labels, table_markdown

CATS = ["car", "person"]
GT = GroundTruth("a", "a.png", 100, 100, np.array([[0, 0, 10, 10], [20, 20, 40, 40], [60, 60, 80, 80]], np.float32),
                 np.array([0, 1, 1]), np.array([False, False, True]))
# Cloud boxes: on the car, on the person (twice), on the ignored person, on nothing.
BOXES = np.array([[0, 0, 10, 11], [20, 20, 40, 40], [21, 21, 40, 40], [60, 60, 80, 80], [85, 85, 99, 99]], np.float32)


def _cloud() -> Detections:
    return Detections.from_class_only("a", "a.png", 100, 100, BOXES, [0, 0, 1, 1, 0], [0.9, 0.8, 0.3, 0.7, 0.6], 2,
                                      SOURCE_CLOUD)


def _clip() -> Detections:
    probs = np.array([[0.2, 0.7, 0.1],   # car box: CLIP says person (wrong), cloud right
                      [0.1, 0.8, 0.1],   # person box: CLIP right, cloud wrong
                      [0.1, 0.2, 0.7],   # person box: CLIP says background (wrong), cloud right
                      [0.5, 0.4, 0.1],   # ignored object: not counted
                      [0.1, 0.1, 0.8]], np.float32)  # junk box called background
    return Detections("a", "a.png", 100, 100, BOXES, probs[:, :2].argmax(1), probs[:, :2].max(1), probs, SOURCE_CLIP)


def test_hit_labels_skip_ignored_objects():
    assert hit_labels(GT, BOXES).tolist() == [0, 1, 1, -1, -1]


def test_aligned_clip_table_has_exact_counts():
    table = agreement_table(LabelledSplit(CATS, [GT]), [_cloud()], [_clip()])
    assert table["car"] == dict(zip(OUTCOMES, [0, 1, 0, 0]))
    assert table["person"] == dict(zip(OUTCOMES, [1, 1, 0, 0]))
    assert table["all"] == dict(zip(OUTCOMES, [1, 2, 0, 0]))
    assert agreement_table(LabelledSplit(CATS, [GT]), [_cloud()], [_clip()], min_score=0.5)["all"] == \
        dict(zip(OUTCOMES, [1, 1, 0, 0]))
    rates = background_rates(LabelledSplit(CATS, [GT]), [_cloud()], [_clip()])
    assert rates == {"junk_boxes": 2, "junk_called_background": 0.5, "object_boxes": 3,
                     "objects_called_background": 1 / 3}
    assert "| person | 1 | 1 | 0 | 0 |" in table_markdown(table)


def test_detector_table_matches_boxes_by_iou():
    det = Detections("a", "a.png", 100, 100, np.array([[0, 0, 10, 10], [20, 20, 41, 41]], np.float32), [0, 1],
                     [0.9, 0.9], np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]], np.float32), SOURCE_CLIP_DET)
    table = agreement_table(LabelledSplit(CATS, [GT]), [_cloud()], [det], aligned=False)
    # car: both right; person box 1: det right, cloud wrong; person box 2: both right.
    assert table["all"] == dict(zip(OUTCOMES, [1, 0, 2, 0]))
    none = Detections.empty("a", "a.png", 100, 100, SOURCE_CLIP_DET, 2)
    assert agreement_table(LabelledSplit(CATS, [GT]), [_cloud()], [none], aligned=False)["all"] == \
        dict(zip(OUTCOMES, [0, 2, 0, 1]))
