"""Weak and strong views for distillation's mean-teacher recipe.

The teacher (CLIP detector) detects on the plain image; the student learns from a weak
view (a horizontal flip, boxes flipped with it) made strong (colour jitter, grayscale,
blur, cutout). A student that must give the teacher's answer on a harder view of the same
image learns more than the teacher knows: the usual reason a self-trained student ends up
above its teachers. Photometric changes and cutout move no box, so only the flip touches
the separation's boxes.

Shapes: images (3,H,W) float32 in [0,1]; boxes (N,4) xyxy pixels of that image. Every random
draw comes from the ``torch.Generator`` passed in, so a step is reproducible under a seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from coin_ray.separate import Separation

FLIP_PROBABILITY = 0.5


@dataclass(frozen=True)
class StrongAugment:
    """The student's photometric view (the reference's SimCLR-style recipe, plus cutout)."""

    jitter_probability: float = 0.8
    brightness: float = 0.4  # factors drawn from [1 - x, 1 + x]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # shift drawn from [-x, x] (a fraction of the colour wheel)
    grayscale_probability: float = 0.2
    blur_probability: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutout_probabilities: tuple[float, ...] = (0.7, 0.5, 0.3)  # one independent draw per patch
    cutout_area: tuple[float, float] = (0.02, 0.2)  # fraction of the image per patch


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator)) < p


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """xyxy pixel boxes (N,4) of an image ``width`` pixels wide, mirrored left to right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def hflip_separation(sep: Separation, width: int) -> Separation:
    """The same separation on the mirrored image (every set's boxes flipped)."""
    return Separation(dataclasses.replace(sep.consistent, boxes=hflip_boxes(sep.consistent.boxes, width)),
                      dataclasses.replace(sep.inconsistent, boxes=hflip_boxes(sep.inconsistent.boxes, width)),
                      dataclasses.replace(sep.private, boxes=hflip_boxes(sep.private.boxes, width)))


def weak_view(image: torch.Tensor, sep: Separation, generator: torch.Generator
              ) -> tuple[torch.Tensor, Separation]:
    """A horizontal flip with probability 0.5: image (3,H,W) and its separation together."""
    view = draw_student_view(image, generator, flip=True, strong=False)
    return view.image, view_separation(sep, view)


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """``image`` (3,H,W) in [0,1] with its HSV hue turned by ``shift`` (a fraction of the
    colour wheel, in [-0.5, 0.5]); value and saturation are kept.

    The same HSV hue shift as torchvision's ``adjust_hue`` (equal to about 1e-6), written
    as value minus chroma times the hue's piecewise-linear ramp per channel, which skips the
    round trip through an HSV image: 2-3x faster on the CPU, where it was the dearest part
    of a student's strong view.
    """
    r, g, b = image.unbind(-3)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # The hue in sixths of the wheel, [0, 6), from whichever channel is the largest.
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.remainder(hue + 6.0 * shift, 6.0)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=image.dtype, device=image.device).view(3, 1, 1)
    k = torch.remainder(offsets + hue, 6.0)
    return value - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _jitter(image: torch.Tensor, aug: StrongAugment, generator: torch.Generator) -> torch.Tensor:
    # Brightness, contrast, saturation and hue in a random order, as colour jitter does.
    ops = [
        lambda x: TF.adjust_brightness(x, _uniform(generator, 1 - aug.brightness, 1 + aug.brightness)),
        lambda x: TF.adjust_contrast(x, _uniform(generator, 1 - aug.contrast, 1 + aug.contrast)),
        lambda x: TF.adjust_saturation(x, _uniform(generator, 1 - aug.saturation, 1 + aug.saturation)),
        lambda x: adjust_hue(x, _uniform(generator, -aug.hue, aug.hue)),
    ]
    for k in torch.randperm(len(ops), generator=generator).tolist():
        image = ops[k](image)
    return image


def _cutout(image: torch.Tensor, aug: StrongAugment, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    for p in aug.cutout_probabilities:
        if not _chance(generator, p):
            continue
        area = _uniform(generator, *aug.cutout_area) * h * w
        aspect = _uniform(generator, 0.3, 3.3)
        ph = max(1, min(h, int(round((area * aspect) ** 0.5))))
        pw = max(1, min(w, int(round((area / aspect) ** 0.5))))
        y = int(torch.randint(0, h - ph + 1, (), generator=generator))
        x = int(torch.randint(0, w - pw + 1, (), generator=generator))
        image = TF.erase(image, y, x, ph, pw, torch.rand((3, 1, 1), generator=generator).to(image))
    return image


def strong_view(image: torch.Tensor, generator: torch.Generator, aug: StrongAugment = StrongAugment()
                ) -> torch.Tensor:
    """The student's photometric view of ``image`` (3,H,W) in [0,1]; boxes are unchanged."""
    out = image
    if _chance(generator, aug.jitter_probability):
        out = _jitter(out, aug, generator)
    if _chance(generator, aug.grayscale_probability):
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if _chance(generator, aug.blur_probability):
        sigma = _uniform(generator, *aug.blur_sigma)
        kernel = 2 * int(round(3 * sigma)) + 1
        out = TF.gaussian_blur(out, [kernel, kernel], [sigma, sigma])
    return _cutout(out.clamp(0.0, 1.0), aug, generator)


@dataclass(frozen=True)
class StudentView:
    """What the student sees of one image: ``image`` (3,H,W) in [0,1], the weak view
    (mirrored when ``flipped``) made strong; the separation follows with ``view_separation``."""

    image: torch.Tensor
    flipped: bool


def draw_student_view(image: torch.Tensor, generator: torch.Generator, *, flip: bool, strong: bool
                      ) -> StudentView:
    """The student's view of ``image`` (3,H,W): a flip with probability 0.5 (``flip``), then
    the strong photometric view (``strong``). Needs no boxes, so the batch loader can draw it
    ahead of the step (``coin_ray.train.distill.load_batch``)."""
    flipped = flip and _chance(generator, FLIP_PROBABILITY)
    out = image.flip(-1) if flipped else image
    return StudentView(strong_view(out, generator) if strong else out, flipped)


def view_separation(sep: Separation, view: StudentView) -> Separation:
    """``sep`` (boxes in the plain image's pixels) in the frame of ``view``."""
    return hflip_separation(sep, view.image.shape[-1]) if view.flipped else sep


def student_views(images: list[torch.Tensor], seps: list[Separation], generator: torch.Generator, *,
                  flip: bool, strong: bool) -> tuple[list[torch.Tensor], list[Separation]]:
    """What the student sees: per image the weak view (``flip``) made strong (``strong``)."""
    views = [draw_student_view(image, generator, flip=flip, strong=strong) for image in images]
    return [v.image for v in views], [view_separation(sep, v) for sep, v in zip(seps, views)]
