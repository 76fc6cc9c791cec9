"""roi_align_rows against torchvision's roi_align (sampling_ratio 1): same forward bits, same gradient."""

import pytest
import torch
from torchvision.ops import roi_align

from coin_ray.models.roi_align import roi_align_rows


def _boxes(generator: torch.Generator, count: int) -> torch.Tensor:
    """Boxes in the pixels of a 64x96 image (stride 8: an 8x12 map), some past its edges,
    some thinner than a cell."""
    corner = torch.rand(count, 2, generator=generator) * torch.tensor([110.0, 80.0]) - 12
    size = torch.rand(count, 2, generator=generator) * 60 + 0.5
    return torch.cat([corner, corner + size], dim=1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("output_size", [4, 7])
def test_matches_torchvision_values_and_gradient(aligned, output_size):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(3, 5, 8, 12, requires_grad=True)
    boxes = [_boxes(gen, 40), torch.zeros(0, 4), _boxes(gen, 25)]  # an image with no regions too
    ours = roi_align_rows(features, boxes, output_size, spatial_scale=1 / 8, aligned=aligned)
    theirs = roi_align(features, boxes, output_size, spatial_scale=1 / 8, sampling_ratio=1, aligned=aligned)
    assert ours.shape == theirs.shape == (65, 5, output_size, output_size)
    assert torch.equal(ours, theirs)  # bit for bit: the same samples, weights and summation order
    upstream = torch.randn(theirs.shape, generator=gen)
    (ours_grad,) = torch.autograd.grad(ours, features, upstream)
    (theirs_grad,) = torch.autograd.grad(theirs, features, upstream)
    assert ours_grad.abs().sum() > 0
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-5)  # only the order of sums differs


def test_a_box_on_one_cell_centre_reads_that_cell():
    features = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    # aligned: pixel box [16, 8, 24, 16] at stride 8 is cell (1, 2) exactly; 1x1 output = its centre
    pooled = roi_align_rows(features, [torch.tensor([[16.0, 8.0, 24.0, 16.0]])], 1, spatial_scale=1 / 8)
    assert pooled.flatten().tolist() == [features[0, 0, 1, 2].item(), features[0, 1, 1, 2].item()]


def test_no_regions_at_all():
    features = torch.randn(2, 3, 4, 4)
    assert roi_align_rows(features, [torch.zeros(0, 4), torch.zeros(0, 4)], 7, 0.25).shape == (0, 3, 7, 7)
