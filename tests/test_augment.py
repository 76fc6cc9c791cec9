"""Weak and strong views of distillation: boxes follow the flip, photometry moves no box, seeded."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from coin_ray.separate import SourceBoxes, separate
from coin_ray.train.augment import adjust_hue, hflip_boxes, strong_view, student_views, weak_view

K = 3


def _src(boxes, labels):
    labels = torch.tensor(labels)
    return SourceBoxes(torch.tensor(boxes, dtype=torch.float32), labels, torch.full((len(labels),), 0.9),
                       torch.nn.functional.one_hot(labels, K + 1).float())


def _scene():
    image = torch.zeros(3, 20, 40)
    image[:, 2:8, 4:10] = 1.0  # a white square at x 4..10
    cloud = _src([[4, 2, 10, 8], [20, 10, 30, 18]], [0, 1])
    clip = _src([[4, 2, 10, 8], [30, 0, 40, 5]], [0, 2])
    return image, separate(cloud, clip)


def test_hflip_boxes_mirrors_xyxy_pixels():
    boxes = torch.tensor([[4.0, 2.0, 10.0, 8.0], [0.0, 0.0, 40.0, 20.0]])
    assert hflip_boxes(boxes, 40).tolist() == [[30.0, 2.0, 36.0, 8.0], [0.0, 0.0, 40.0, 20.0]]
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 40), 40), boxes)


def test_a_flipped_view_carries_its_boxes_onto_the_same_pixels():
    image, sep = _scene()
    for seed in range(8):
        view, moved = weak_view(image, sep, torch.Generator().manual_seed(seed))
        x1, y1, x2, y2 = moved.consistent.boxes[0].int().tolist()
        assert bool((view[:, y1:y2, x1:x2] == 1.0).all()), seed  # the square is still inside its box
        assert view.sum() == image.sum()
    flips = [not torch.equal(weak_view(image, sep, torch.Generator().manual_seed(s))[0], image) for s in range(64)]
    assert 16 < sum(flips) < 48  # about half


def test_strong_view_changes_pixels_stays_in_range_and_is_seeded():
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    a = strong_view(image, torch.Generator().manual_seed(1))
    b = strong_view(image, torch.Generator().manual_seed(1))
    c = strong_view(image, torch.Generator().manual_seed(2))
    assert a.shape == image.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert not torch.equal(a, image)


def test_student_views_keep_labels_and_probs_and_can_be_switched_off():
    image, sep = _scene()
    images, seps = student_views([image], [sep], torch.Generator().manual_seed(0), flip=False, strong=False)
    assert images[0] is image and seps[0] is sep
    images, seps = student_views([image], [sep], torch.Generator().manual_seed(3), flip=True, strong=True)
    assert torch.equal(seps[0].inconsistent.cloud_probs, sep.inconsistent.cloud_probs)
    assert seps[0].private.labels.tolist() == sep.private.labels.tolist()


@pytest.mark.parametrize("shift", [-0.5, -0.1, -0.013, 0.0, 0.07, 0.1, 0.5])
def test_adjust_hue_is_torchvisions_hsv_hue_shift(shift):
    gen = torch.Generator().manual_seed(0)
    smooth = torch.rand(3, 24, 40, generator=gen)
    ties = torch.randint(0, 5, (3, 24, 40), generator=gen).float() / 4  # equal channels, grays, black, white
    for image in (smooth, ties):
        assert torch.allclose(adjust_hue(image, shift), TF.adjust_hue(image, shift), atol=1e-5)
    gray = torch.full((3, 4, 4), 0.3)
    assert torch.equal(adjust_hue(gray, shift), gray)  # no chroma, no hue to turn
