"""Dawid-Skene source confusions: exact numbers on small synthetic cases, and the step's table."""

from __future__ import annotations

import numpy as np
import pytest

from coin_ray.confusion import (MISSING, box_annotations, box_posteriors, corrected_record, dawid_skene, m_step,
                                majority_posterior)
from coin_ray.schema import Detections


def three_annotators(per_class: int = 4) -> np.ndarray:
    """Items of true class 0, 1, 2 (``per_class`` each): annotators 0 and 1 are always right,
    annotator 2 always calls class 2 class 1."""
    truth = np.repeat(np.arange(3), per_class)
    third = np.where(truth == 2, 1, truth)
    return np.stack([truth, truth, third], axis=1)


def test_two_agreeing_annotators_and_one_that_calls_class_2_class_1():
    est = dawid_skene(three_annotators(), 3, sources=("a", "b", "c"), smoothing=0.0)
    np.testing.assert_allclose(est.prior, [1 / 3, 1 / 3, 1 / 3], atol=1e-9)
    np.testing.assert_allclose(est.source("a"), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(est.source("b"), np.eye(3), atol=1e-9)
    np.testing.assert_allclose(est.source("c"), [[1, 0, 0], [0, 1, 0], [0, 1, 0]], atol=1e-9)
    assert est.items == 12


def test_the_majority_start_splits_votes_and_skips_missing_labels():
    labels = np.array([[2, 2, 1], [0, MISSING, 1], [MISSING, MISSING, MISSING]])
    np.testing.assert_allclose(majority_posterior(labels, 3),
                               [[0, 1 / 3, 2 / 3], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])


def test_smoothing_adds_pseudo_counts_to_every_cell():
    # Under the true posterior, class-2 items (4 of them) with smoothing s give row 2 of the
    # third annotator (s, 4 + s, s) / (4 + 3 s); the prior is the posterior's mean.
    s = 0.5
    labels = three_annotators()
    prior, confusion = m_step(labels, np.eye(3)[labels[:, 0]], s)
    np.testing.assert_allclose(confusion[2, 2], np.array([s, 4 + s, s]) / (4 + 3 * s))
    np.testing.assert_allclose(confusion[0, 1], np.array([s, 4 + s, s]) / (4 + 3 * s))
    np.testing.assert_allclose(prior, [1 / 3] * 3)


def test_box_posteriors_follow_the_estimated_confusions():
    # Two classes and background (L = 3). The cloud calls every class-1 box and every
    # background box class 0; CLIP's crop and the CLIP detector are right.
    truth = np.repeat([0, 1, 2], [6, 3, 3])
    cloud = np.where(truth == 0, 0, 0)
    est = dawid_skene(np.stack([cloud, truth, truth], axis=1), 3, smoothing=0.0)
    np.testing.assert_allclose(est.source("cloud"), [[1, 0, 0], [1, 0, 0], [1, 0, 0]], atol=1e-9)
    post = box_posteriors(np.array([[0, 1, 1], [0, 0, 0], [0, 2, 2], [0, MISSING, 1]]), est)
    np.testing.assert_allclose(post, [[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], atol=1e-9)


def test_corrected_records_take_the_posterior_as_probs_and_its_class_where_it_is_sure():
    cloud = record([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]], [0, 0, 1, 0],
                   [0.9, 0.9, 0.9, 0.1])
    posterior = np.array([[0.05, 0.95, 0.0], [0.4, 0.6, 0.0], [0.0, 0.0, 1.0]])  # the 3 boxes >= min_score
    out = corrected_record(cloud, posterior, min_score=0.3, threshold=0.9)
    # Sure of class 1: relabelled. Unsure: the cloud's label stays. Sure of background: the
    # label stays (no object class to teach), the probs say background. Under min_score: untouched.
    np.testing.assert_array_equal(out.labels, [1, 0, 1, 0])
    np.testing.assert_allclose(out.probs[:3], posterior)
    np.testing.assert_allclose(out.probs[3], cloud.probs[3])
    np.testing.assert_array_equal(out.scores, cloud.scores)
    np.testing.assert_array_equal(cloud.labels, [0, 0, 1, 0])  # the input record is not changed


def test_the_estimate_round_trips_through_json():
    from coin_ray.confusion import SourceConfusions

    est = dawid_skene(three_annotators(), 3, smoothing=0.01)
    back = SourceConfusions.from_dict(est.to_dict(["x", "y"]))
    np.testing.assert_allclose(back.confusion, est.confusion, atol=1e-6)
    assert est.to_dict(["x", "y"])["classes"] == ["x", "y", "background"]


def record(boxes, labels, scores, k=2, source="cloud"):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    probs = np.zeros((len(boxes), k + 1), np.float32)
    probs[np.arange(len(boxes)), labels] = 1.0
    return Detections("i", "u", 100, 100, boxes, np.asarray(labels, np.int64),
                      np.asarray(scores, np.float32), probs, source)


def test_box_annotations_read_the_crop_label_and_match_the_detector_one_to_one():
    cloud = record([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0, 1, 0], [0.9, 0.8, 0.1])
    clip = record([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [1, 2, 0], [0.5, 0.5, 0.5],
                  source="clip")
    det = record([[0, 0, 10, 11], [80, 80, 90, 90]], [1, 0], [0.6, 0.05], source="clip_det")
    out = box_annotations(cloud, clip, det, min_score=0.3, min_clip_score=0.1, match_iou=0.5)
    # The third cloud box scores under min_score; the second finds no detector box (K = 2).
    np.testing.assert_array_equal(out, [[0, 1, 1], [1, 2, 2]])
    alone = box_annotations(cloud, None, None, min_score=0.3, min_clip_score=0.1, match_iou=0.5)
    np.testing.assert_array_equal(alone, [[0, MISSING, MISSING], [1, MISSING, MISSING]])


def test_an_image_whose_boxes_all_score_below_the_cut_passes_unchanged():
    from coin_ray.confusion import cloud_annotations, corrected_cloud, estimate_source_confusions

    low = record([[0, 0, 10, 10]], [1], [0.1])
    sure = [record([[0, 0, 10, 10]], [t], [0.9]) for t in (0, 0, 1)]
    annotations = cloud_annotations([low, *sure], sure, sure, min_score=0.3, min_clip_score=0.1, match_iou=0.5)
    est = estimate_source_confusions(annotations, 2)
    out = corrected_cloud([low, *sure], annotations, est, min_score=0.3, threshold=0.9)
    assert out[0] is low and est.items == 3
    with pytest.raises(ValueError, match="3 annotators"):
        dawid_skene(np.zeros((4, 2), np.int64), 3)
