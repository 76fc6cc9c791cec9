"""Knowledge separation: matching on hand-made boxes, set membership, probs, statistics."""

import numpy as np
import torch

from coin_ray.boxes import match_one_to_one
from coin_ray.schema import Detections
from coin_ray.separate import FusionStats, SeparationStats, SourceBoxes, as_source, separate

K = 3


def _src(boxes, labels, scores, probs=None) -> SourceBoxes:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels, dtype=torch.int64)
    scores = torch.tensor(scores, dtype=torch.float32)
    if probs is None:
        probs = torch.nn.functional.one_hot(labels, K + 1).float() * scores[:, None]
        probs[:, K] = 1 - scores
    return SourceBoxes(boxes, labels, scores, torch.as_tensor(probs, dtype=torch.float32).reshape(-1, K + 1))


def test_matching_tie_goes_to_lower_indices():
    # Two identical cloud boxes and one CLIP box on them: IoU ties at 1.0; cloud box 0 wins.
    cloud = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=torch.float32)
    clip = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    assert match_one_to_one(cloud, clip, 0.5).tolist() == [[0, 0]]


def test_matching_one_box_overlapping_two_takes_the_better_and_leaves_the_other():
    cloud = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    # IoU 0.8 and 1.0 with the cloud box: the exact one is taken, the other stays free.
    clip = torch.tensor([[0, 0, 10, 8], [0, 0, 10, 10]], dtype=torch.float32)
    assert match_one_to_one(cloud, clip, 0.5).tolist() == [[0, 1]]


def test_matching_respects_the_threshold():
    cloud = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    clip = torch.tensor([[0, 0, 10, 4]], dtype=torch.float32)  # IoU 0.4
    assert match_one_to_one(cloud, clip, 0.5).shape == (0, 2)
    assert match_one_to_one(cloud, clip, 0.4).tolist() == [[0, 0]]


def test_matching_prefers_a_same_label_partner_among_those_above_the_threshold():
    # A cloud car; the CLIP detector's per-class duplicates on it: truck (IoU 1.0) and car
    # (IoU 0.8). By IoU alone the truck wins and the pair disagrees; with labels the car
    # partner is taken and the truck duplicate stays free (private).
    cloud = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    clip = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 8]], dtype=torch.float32)
    car, truck = 0, 1
    assert match_one_to_one(cloud, clip, 0.5).tolist() == [[0, 0]]
    assert match_one_to_one(cloud, clip, 0.5, labels_a=torch.tensor([car]),
                            labels_b=torch.tensor([truck, car])).tolist() == [[0, 1]]
    # A same-label partner below the threshold is no partner: the other-label one is taken.
    low = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 4]], dtype=torch.float32)  # IoU 1.0, 0.4
    assert match_one_to_one(cloud, low, 0.5, labels_a=torch.tensor([car]),
                            labels_b=torch.tensor([truck, car])).tolist() == [[0, 0]]
    sep = separate(_src([[0, 0, 10, 10]], [car], [0.9]), _src(clip.tolist(), [truck, car], [0.6, 0.5]))
    assert (len(sep.consistent), len(sep.inconsistent), len(sep.private)) == (1, 0, 1)
    assert sep.private.labels.tolist() == [truck]


def test_sets_membership_and_probs():
    cloud = _src([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0, 1, 2], [0.9, 0.8, 0.7])
    clip = _src([[0, 0, 10, 10], [21, 21, 31, 31], [80, 80, 90, 90]], [0, 2, 1], [0.6, 0.5, 0.4])
    sep = separate(cloud, clip, iou_threshold=0.5)

    assert sep.consistent.cloud_labels.tolist() == [0]
    assert sep.consistent.clip_labels.tolist() == [0]
    assert torch.equal(sep.consistent.boxes, cloud.boxes[:1])
    assert torch.equal(sep.consistent.cloud_probs, cloud.probs[:1])
    assert torch.equal(sep.consistent.clip_probs, clip.probs[:1])

    assert sep.inconsistent.cloud_labels.tolist() == [1]
    assert sep.inconsistent.clip_labels.tolist() == [2]
    assert torch.equal(sep.inconsistent.boxes, cloud.boxes[1:2])  # before burn-up: cloud box
    assert torch.equal(sep.inconsistent.cloud_probs, cloud.probs[1:2])
    assert torch.equal(sep.inconsistent.clip_probs, clip.probs[1:2])
    assert sep.inconsistent.clip_scores.tolist() == [0.5]

    assert sep.private.from_cloud.tolist() == [True, False]
    assert sep.private.labels.tolist() == [2, 1]
    assert torch.equal(sep.private.boxes, torch.stack([cloud.boxes[2], clip.boxes[2]]))
    assert torch.equal(sep.private.probs, torch.stack([cloud.probs[2], clip.probs[2]]))
    assert torch.allclose(sep.private.scores, torch.tensor([0.7, 0.4]))


def test_after_burn_up_the_pair_box_is_score_weighted():
    cloud = _src([[0, 0, 10, 10]], [1], [0.75])
    clip = _src([[2, 2, 12, 12]], [1], [0.25])
    sep = separate(cloud, clip, iou_threshold=0.3, fuse=True)
    assert torch.allclose(sep.consistent.boxes, torch.tensor([[0.5, 0.5, 10.5, 10.5]]))


def test_no_boxes_on_one_side_and_both_empty():
    cloud = _src([[0, 0, 10, 10], [5, 5, 9, 9]], [0, 1], [0.9, 0.8])
    empty = _src(np.zeros((0, 4)), [], [], np.zeros((0, K + 1)))
    sep = separate(cloud, empty)
    assert len(sep.consistent) == len(sep.inconsistent) == 0
    assert sep.private.from_cloud.tolist() == [True, True]
    assert sep.private.probs.shape == (2, K + 1)

    sep = separate(empty, cloud)
    assert sep.private.from_cloud.tolist() == [False, False]

    sep = separate(empty, empty)
    assert len(sep.consistent) == len(sep.inconsistent) == len(sep.private) == 0
    assert sep.consistent.boxes.shape == (0, 4)
    assert sep.private.probs.shape == (0, K + 1)


def test_as_source_reads_records_and_dicts_and_drops_low_scores():
    record = Detections.from_class_only("a", "a.png", 100, 100, np.array([[0, 0, 5, 5], [1, 1, 6, 6]]),
                                        np.array([0, 2]), np.array([0.9, 0.1]), K, "cloud")
    src = as_source(record, min_score=0.3)
    assert src.labels.tolist() == [0] and src.probs.shape == (1, K + 1)
    out = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
           "scores": torch.zeros(0), "probs": torch.zeros(0, K + 1)}
    assert len(as_source(out)) == 0
    assert len(as_source(Detections.empty("b", "b.png", 4, 4, "cloud", K))) == 0
    # An empty record read back from Parquet has probs of width 0; num_classes shapes them.
    flat = {"boxes": np.zeros((0, 4)), "labels": [], "scores": [], "probs": np.zeros((0, 0))}
    assert as_source(flat, num_classes=K).probs.shape == (0, K + 1)
    sep = separate(as_source(flat), as_source(flat))  # both sides unknown width: still separates
    assert len(sep.private) == 0


def test_every_box_lands_in_exactly_one_set():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(12, 2, generator=gen) * 80
    boxes = torch.cat([xy, xy + 10 + torch.rand(12, 2, generator=gen) * 10], dim=1)
    cloud = _src(boxes[:7].tolist(), torch.randint(0, K, (7,), generator=gen).tolist(), [0.9] * 7)
    jitter = boxes[3:] + torch.rand(9, 4, generator=gen)
    clip = _src(jitter.tolist(), torch.randint(0, K, (9,), generator=gen).tolist(), [0.6] * 9)
    sep = separate(cloud, clip)
    pairs = len(sep.consistent) + len(sep.inconsistent)
    assert pairs * 2 + len(sep.private) == len(cloud) + len(clip)
    assert int(sep.private.from_cloud.sum()) == len(cloud) - pairs


def test_stats_count_sets_and_judge_labels_against_ground_truth():
    cloud = _src([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0, 1, 2], [0.9, 0.8, 0.7])
    clip = _src([[0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90]], [0, 2, 1], [0.6, 0.5, 0.4])
    sep = separate(cloud, clip)
    gt_boxes = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], dtype=torch.float32)
    gt_labels = torch.tensor([0, 2, 1])
    stats = SeparationStats()
    stats.add(sep, gt_boxes, gt_labels)
    stats.add(sep)  # no ground truth: counted, not judged
    assert stats.counts == {"consistent": 2, "inconsistent_cloud": 2, "inconsistent_clip": 2,
                            "private_cloud": 2, "private_clip": 2}
    acc = stats.accuracy()
    assert acc["consistent"] == 1.0
    assert acc["inconsistent_cloud"] == 0.0 and acc["inconsistent_clip"] == 1.0
    assert acc["private_cloud"] == 0.0 and acc["private_clip"] == 0.0


def test_fusion_stats_count_pairs_passing_pi_and_judge_them_by_ground_truth():
    fused = torch.tensor([[0.8, 0.1, 0.05, 0.05],   # image 0: passes, label 0
                          [0.4, 0.3, 0.2, 0.1],     # image 0: below pi
                          [0.05, 0.05, 0.8, 0.1]])  # image 1: passes, label 2
    boxes = [torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32),
             torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)]
    gt = [{"boxes": torch.tensor([[0, 0, 10, 10]]), "labels": torch.tensor([0])},
          {"boxes": torch.tensor([[0, 0, 10, 10]]), "labels": torch.tensor([1])}]
    stats = FusionStats()
    stats.add(fused, 0.7, boxes, gt)
    assert (stats.pairs, stats.passed, stats.judged, stats.right) == (3, 2, 2, 1)
    stats.add(fused[:1], 0.7, boxes[:1])  # no ground truth: counted, not judged
    assert stats.summary() == {"pairs": 4, "passed": 3, "judged": 2, "right": 1, "pass_rate": 0.75,
                               "right_rate": 0.5}


def test_disagreements_the_corrected_clouds_posterior_settles_join_the_consistent_set():
    from coin_ray.separate import admit_confident

    # Cloud boxes corrected by the estimated confusions: probs are the posterior (K+1 = 4).
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]]
    posterior = [[0.02, 0.95, 0.03, 0.0], [0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]]
    cloud = _src(boxes, [1, 0, 0, 2], [0.9, 0.8, 0.7, 0.9], probs=posterior)
    clip = _src(boxes, [2, 2, 1, 2], [0.6, 0.6, 0.6, 0.6])
    sep = separate(cloud, clip)
    out = admit_confident(sep, 0.9)
    # Box 0: sure of class 1 though the detector says 2 -> consistent as 1. Box 1: unsure.
    # Box 2: sure of background -> stays inconsistent. Box 3 agreed already.
    assert out.consistent.cloud_labels.tolist() == [2, 1] and out.consistent.clip_labels.tolist() == [2, 1]
    assert out.consistent.boxes[1].tolist() == [0, 0, 10, 10]
    assert out.inconsistent.cloud_labels.tolist() == [0, 0] and out.inconsistent.clip_labels.tolist() == [2, 1]
    assert torch.equal(out.private.boxes, sep.private.boxes)
    assert admit_confident(sep, 0.99).consistent.cloud_labels.tolist() == [2]


def test_stats_count_each_set_per_label():
    stats = SeparationStats()
    stats.add(separate(_src([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1], [0.9, 0.9]),
                       _src([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 2], [0.6, 0.6])))
    stats.count("admitted", torch.tensor([2, 2]))
    by_class = stats.summary()["by_class"]
    assert by_class["consistent"] == {"0": 1}
    assert by_class["inconsistent_cloud"] == {"1": 1} and by_class["inconsistent_clip"] == {"2": 1}
    assert by_class["admitted"] == {"2": 2} and stats.counts["admitted"] == 2
