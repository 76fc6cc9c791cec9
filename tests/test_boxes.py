import torch

from coin_ray.boxes import fuse_boxes, match_one_to_one, pairwise_iou


def test_iou_on_hand_made_boxes():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [20, 20, 30, 30], [0, 0, 10, 5]])
    iou = pairwise_iou(a, b)
    assert torch.allclose(iou[0], torch.tensor([25 / 175, 0.0, 0.5]))
    assert pairwise_iou(a, torch.zeros((0, 4))).shape == (2, 0)


def test_matching_is_one_to_one_best_first():
    cloud = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110]])
    clip = torch.tensor([[0.0, 0, 10, 9], [0, 0, 10, 10], [50, 50, 60, 60]])
    pairs = match_one_to_one(cloud, clip)
    assert pairs.tolist() == [[0, 1]]  # the exact box wins; the second-best stays unmatched


def test_matching_ties_break_by_index_and_threshold_is_inclusive():
    box = torch.tensor([[0.0, 0, 10, 10]])
    assert match_one_to_one(box, box.repeat(2, 1)).tolist() == [[0, 0]]
    half = torch.tensor([[0.0, 0, 10, 5]])
    assert match_one_to_one(box, half, 0.5).tolist() == [[0, 0]]
    assert match_one_to_one(box, half, 0.51).tolist() == []
    assert match_one_to_one(torch.zeros((0, 4)), torch.zeros((0, 4))).shape == (0, 2)


def test_fusion_is_score_weighted():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[10.0, 10, 20, 20]])
    fused = fuse_boxes(a, torch.tensor([0.75]), b, torch.tensor([0.25]))
    assert torch.allclose(fused, torch.tensor([[2.5, 2.5, 12.5, 12.5]]))
    assert torch.allclose(fuse_boxes(a, torch.zeros(1), b, torch.zeros(1)), torch.tensor([[5.0, 5, 15, 15]]))
