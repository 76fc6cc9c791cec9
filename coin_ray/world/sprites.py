"""Composite sprites of Foggy-Shapes: the 8 categories and a few distractors.

Every sprite is drawn in its own metric frame: ``u`` metres along the direction it faces,
``v`` metres up from the ground, origin at the bottom centre. A ``Painter`` maps that
frame to pixels (perspective scale ``s`` px/m at the object's ground row) and paints
each primitive twice: colour into the RGB canvas and the object's id into an instance
canvas, so that ground truth can later be read from the pixels that stay visible.

Parts are shared on purpose (wheels, windows, heads), so the confusions of real street
scenes exist here too: a rider sits on a bicycle, a bus and a train are both long boxes
with a row of windows, a motorcycle and a bicycle both stand on two wheels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import ImageDraw

Color = tuple[int, int, int]

# Nominal (length, height) in metres, used to keep every object at least ~10 px.
NOMINAL_SIZE = {
    "truck": (7.0, 3.2), "car": (4.3, 1.5), "rider": (0.9, 1.6), "person": (0.55, 1.75),
    "train": (30.0, 3.7), "motorcycle": (2.0, 1.15), "bicycle": (1.75, 1.05), "bus": (11.0, 3.1),
    "tree": (3.0, 5.5), "pole": (0.6, 3.2), "crate": (1.2, 1.1), "bush": (2.0, 1.0),
}

VEHICLE_PAINT = [(200, 30, 30), (30, 60, 170), (230, 230, 225), (40, 40, 45), (150, 150, 155),
                 (30, 120, 60), (220, 180, 40), (120, 60, 30), (90, 140, 200), (170, 90, 160)]
CLOTHES = [(180, 40, 40), (40, 70, 160), (50, 50, 55), (220, 220, 210), (60, 130, 70),
           (200, 150, 40), (130, 60, 130), (90, 60, 40), (230, 120, 50), (110, 110, 115)]
SKIN = [(240, 200, 170), (210, 160, 120), (160, 110, 80), (110, 75, 50)]
GLASS = (150, 185, 205)
TYRE = (25, 25, 28)


@dataclass
class Painter:
    """Draws metric-frame primitives into an RGB canvas and an instance-id canvas.

    Pixel coordinates are in the final (1x) image frame; ``ss`` is the supersampling
    factor of both canvases (they are ``ss`` times larger than the final image).
    """

    rgb: ImageDraw.ImageDraw
    ids: ImageDraw.ImageDraw
    ss: int
    x: float  # pixel x of the sprite origin
    y: float  # pixel y of the ground contact
    s: float  # pixels per metre
    facing: int  # +1 faces right, -1 faces left
    obj_id: int

    def pt(self, u: float, v: float) -> tuple[float, float]:
        """Metric (u along facing, v up) to supersampled pixel coordinates."""
        return ((self.x + self.facing * u * self.s) * self.ss, (self.y - v * self.s) * self.ss)

    def polygon(self, uv: list[tuple[float, float]], color: Color) -> None:
        pts = [self.pt(u, v) for u, v in uv]
        self.rgb.polygon(pts, fill=color)
        self.ids.polygon(pts, fill=self.obj_id)

    def box(self, u0: float, v0: float, u1: float, v1: float, color: Color) -> None:
        self.polygon([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], color)

    def disc(self, u: float, v: float, r: float, color: Color) -> None:
        (cx, cy), rr = self.pt(u, v), r * self.s * self.ss
        bounds = [cx - rr, cy - rr, cx + rr, cy + rr]
        self.rgb.ellipse(bounds, fill=color)
        self.ids.ellipse(bounds, fill=self.obj_id)

    def ring(self, u: float, v: float, r: float, width: float, color: Color) -> None:
        (cx, cy), rr = self.pt(u, v), r * self.s * self.ss
        w = max(self.ss, round(width * self.s * self.ss))  # at least one final pixel
        bounds = [cx - rr, cy - rr, cx + rr, cy + rr]
        self.rgb.ellipse(bounds, outline=color, width=w)
        self.ids.ellipse(bounds, outline=self.obj_id, width=w)

    def line(self, uv: list[tuple[float, float]], width: float, color: Color) -> None:
        pts = [self.pt(u, v) for u, v in uv]
        w = max(self.ss, round(width * self.s * self.ss))
        self.rgb.line(pts, fill=color, width=w, joint="curve")
        self.ids.line(pts, fill=self.obj_id, width=w, joint="curve")


def _pick(rng: np.random.Generator, colors: list[Color], jitter: int = 18) -> Color:
    base = np.array(colors[rng.integers(len(colors))], dtype=np.int64)
    return tuple(int(c) for c in np.clip(base + rng.integers(-jitter, jitter + 1, 3), 0, 255))


def _shade(color: Color, f: float) -> Color:
    return tuple(int(min(255, max(0, c * f))) for c in color)


def _wheel(p: Painter, u: float, r: float) -> None:
    p.disc(u, r, r, TYRE)
    p.disc(u, r, r * 0.45, (150, 150, 150))


def _windows(p: Painter, u0: float, u1: float, v0: float, v1: float, n: int, color: Color) -> None:
    """A row of ``n`` windows spread evenly between u0 and u1."""
    step = (u1 - u0) / n
    for i in range(n):
        p.box(u0 + i * step + 0.12 * step, v0, u0 + (i + 1) * step - 0.12 * step, v1, color)


def draw_car(p: Painter, rng: np.random.Generator) -> None:
    """A sedan: body, cabin with two windows, lights, two wheels."""
    length, paint = rng.uniform(3.8, 4.8), _pick(rng, VEHICLE_PAINT)
    h, r = length / 2, 0.32
    p.box(-h, 0.25, h, 1.0, paint)
    top = rng.uniform(1.35, 1.55)
    p.polygon([(-0.55 * h, 1.0), (0.6 * h, 1.0), (0.3 * h, top), (-0.45 * h, top)], _shade(paint, 0.9))
    p.polygon([(-0.45 * h, 1.05), (0.05 * h, 1.05), (0.05 * h, top - 0.08), (-0.38 * h, top - 0.08)], GLASS)
    p.polygon([(0.12 * h, 1.05), (0.52 * h, 1.05), (0.27 * h, top - 0.08), (0.12 * h, top - 0.08)], GLASS)
    p.box(h - 0.15, 0.7, h, 0.85, (250, 230, 150))
    p.box(-h, 0.7, -h + 0.1, 0.85, (200, 30, 30))
    _wheel(p, -0.62 * h, r)
    _wheel(p, 0.65 * h, r)


def draw_truck(p: Painter, rng: np.random.Generator) -> None:
    """A cab with a window in front of a tall cargo box, two or three axles."""
    length, cab_paint = rng.uniform(6.0, 8.0), _pick(rng, VEHICLE_PAINT)
    cargo = _pick(rng, [(235, 235, 230), (160, 160, 165), (60, 90, 150), (200, 120, 40), (90, 110, 70)])
    h, cab, height = length / 2, rng.uniform(1.7, 2.1), rng.uniform(2.8, 3.4)
    p.box(-h, 0.45, h - cab - 0.1, height, cargo)
    p.box(-h, 0.45, h - cab - 0.1, 0.6, _shade(cargo, 0.6))
    p.polygon([(h - cab, 0.45), (h, 0.45), (h, 1.7), (h - 0.35, 2.6), (h - cab, 2.6)], cab_paint)
    p.polygon([(h - cab * 0.55, 1.7), (h - 0.08, 1.7), (h - 0.4, 2.45), (h - cab * 0.55, 2.45)], GLASS)
    r = 0.48
    for u in ([-0.75 * h, -0.45 * h] if rng.random() < 0.5 else [-0.7 * h]) + [h - 0.55 * cab]:
        _wheel(p, u, r)


def draw_bus(p: Painter, rng: np.random.Generator) -> None:
    """A long tall box with a row of windows, a front door and two wheels."""
    length = rng.uniform(10.0, 12.5)
    paint = _pick(rng, [(200, 30, 30), (230, 190, 40), (40, 90, 180), (230, 230, 225), (40, 140, 80)])
    h, height = length / 2, rng.uniform(2.9, 3.3)
    p.box(-h, 0.35, h, height, paint)
    p.box(-h, 0.35, h, 0.8, _shade(paint, 0.7))
    _windows(p, -h + 0.4, h - 1.4, 1.45, height - 0.45, int(rng.integers(5, 8)), GLASS)
    p.box(h - 1.2, 0.45, h - 0.3, height - 0.45, _shade(GLASS, 0.8))  # front door
    p.box(h - 0.12, 0.6, h, 0.9, (250, 230, 150))
    _wheel(p, -0.62 * h, 0.5)
    _wheel(p, 0.68 * h, 0.5)


def draw_train(p: Painter, rng: np.random.Generator) -> None:
    """Two or three long carriages with window rows and bogies on a rail bed."""
    paint = _pick(rng, [(200, 200, 205), (180, 40, 40), (40, 80, 160), (230, 200, 40), (60, 120, 90)])
    cars, car_len = int(rng.integers(2, 4)), rng.uniform(12.0, 15.0)
    total, height = cars * car_len + (cars - 1) * 0.6, rng.uniform(3.4, 3.9)
    u = -total / 2
    p.box(-total / 2 - 1.0, 0.0, total / 2 + 1.0, 0.15, (90, 80, 70))  # rail bed
    for i in range(cars):
        p.box(u, 0.5, u + car_len, height, paint)
        p.box(u, 0.5, u + car_len, 0.9, _shade(paint, 0.55))
        p.box(u, height - 0.35, u + car_len, height - 0.2, _shade(paint, 0.75))
        _windows(p, u + 0.6, u + car_len - 0.6, 1.6, height - 0.7, int(rng.integers(6, 9)), GLASS)
        for w in (u + 1.5, u + 2.5, u + car_len - 2.5, u + car_len - 1.5):
            _wheel(p, w, 0.4)
        u += car_len + 0.6
    nose = total / 2
    p.polygon([(nose, 0.5), (nose + 0.9, 0.5), (nose + 0.9, 1.6), (nose, height)], paint)


def _legs(p: Painter, rng: np.random.Generator, hip: float, color: Color, width: float) -> None:
    stride = rng.uniform(0.0, 0.32) * hip
    p.line([(0.0, hip), (stride, 0.04)], width, color)
    p.line([(0.0, hip), (-stride, 0.04)], width, color)
    p.box(stride - 0.02, 0.0, stride + 0.14, 0.07, (30, 30, 30))


def draw_person(p: Painter, rng: np.random.Generator) -> None:
    """A standing person: legs, torso, swinging arm, head, sometimes a hat."""
    height = rng.uniform(1.55, 1.9)
    shirt, pants, skin = _pick(rng, CLOTHES), _pick(rng, CLOTHES[2:], 10), _pick(rng, SKIN, 8)
    hip, shoulder = 0.5 * height, 0.82 * height
    _legs(p, rng, hip, pants, 0.13)
    p.box(-0.17, hip - 0.05, 0.17, shoulder, shirt)
    swing = rng.uniform(-0.2, 0.2)
    p.line([(0.0, shoulder - 0.05), (swing, hip - 0.02)], 0.09, _shade(shirt, 0.85))
    p.disc(0.0, height - 0.11, 0.12, skin)
    if rng.random() < 0.4:  # a hat or hair changes the head outline
        p.box(-0.13, height - 0.1, 0.13, height + 0.02, _pick(rng, CLOTHES, 10))


def draw_rider(p: Painter, rng: np.random.Generator) -> None:
    """A seated person leaning forward; drawn on top of a bicycle or motorcycle."""
    shirt, pants, skin = _pick(rng, CLOTHES), _pick(rng, CLOTHES[2:], 10), _pick(rng, SKIN, 8)
    seat, lean = rng.uniform(0.85, 0.95), rng.uniform(0.2, 0.4)
    shoulder = (lean, seat + 0.6)
    p.line([(-0.1, seat), (0.2, seat + 0.08), (0.12, 0.35)], 0.13, pants)  # thigh and shin
    p.polygon([(-0.2, seat), (0.05, seat), (shoulder[0] + 0.14, shoulder[1]),
               (shoulder[0] - 0.12, shoulder[1] + 0.02)], shirt)
    p.line([shoulder, (0.62, seat + 0.12)], 0.08, _shade(shirt, 0.85))  # arm to handlebar
    p.disc(shoulder[0] + 0.08, shoulder[1] + 0.17, 0.12, skin)
    if rng.random() < 0.6:  # a helmet
        p.polygon([(shoulder[0] - 0.06, shoulder[1] + 0.2), (shoulder[0] + 0.22, shoulder[1] + 0.2),
                   (shoulder[0] + 0.16, shoulder[1] + 0.33), (shoulder[0] - 0.02, shoulder[1] + 0.33)],
                  _pick(rng, VEHICLE_PAINT))


def draw_bicycle(p: Painter, rng: np.random.Generator) -> None:
    """Two thin ring wheels, a diamond frame, saddle and handlebar."""
    frame, r, base = _pick(rng, VEHICLE_PAINT, 25), 0.34, rng.uniform(1.0, 1.1)
    rear, front, crank = (-base / 2, r), (base / 2, r), (-0.05, 0.32)
    seat, bar = (-0.2, 0.85), (base / 2 - 0.1, 0.92)
    p.ring(*rear, r, 0.05, TYRE)
    p.ring(*front, r, 0.05, TYRE)
    p.line([rear, crank, seat, rear], 0.05, frame)
    p.line([crank, bar, front], 0.05, frame)
    p.line([seat, (seat[0] + 0.6 * (bar[0] - seat[0]), 0.8)], 0.05, frame)
    p.box(seat[0] - 0.1, seat[1], seat[0] + 0.08, seat[1] + 0.05, (30, 30, 30))
    p.line([bar, (bar[0] - 0.12, bar[1] + 0.08)], 0.05, (40, 40, 40))


def draw_motorcycle(p: Painter, rng: np.random.Generator) -> None:
    """Two solid wheels, an engine block, tank, seat, fork and headlight."""
    paint, r, base = _pick(rng, VEHICLE_PAINT, 25), 0.31, rng.uniform(1.35, 1.5)
    rear, front = -base / 2, base / 2
    p.disc(rear, r, r, TYRE)
    p.disc(front, r, r, TYRE)
    p.disc(rear, r, r * 0.5, (170, 170, 175))
    p.disc(front, r, r * 0.5, (170, 170, 175))
    p.polygon([(rear + 0.2, 0.35), (front - 0.3, 0.3), (front - 0.15, 0.75), (0.1, 0.85),
               (rear + 0.15, 0.75)], (70, 70, 75))  # engine block
    p.polygon([(-0.15, 0.78), (0.35, 0.8), (0.45, 0.98), (-0.05, 0.98)], paint)  # tank
    p.box(rear + 0.05, 0.82, -0.1, 0.92, (25, 25, 25))  # seat
    p.line([(front, r), (front - 0.2, 1.05)], 0.06, (60, 60, 60))  # fork
    p.disc(front - 0.12, 0.9, 0.08, (250, 230, 150))


def draw_tree(p: Painter, rng: np.random.Generator) -> None:
    """Distractor: a trunk under a round canopy."""
    height = rng.uniform(4.0, 6.5)
    p.box(-0.15, 0.0, 0.15, height * 0.55, (90, 60, 35))
    leaf = _pick(rng, [(50, 110, 45), (70, 130, 50), (40, 90, 55)], 15)
    for du, dv, rr in ((0.0, 0.78, 0.28), (-0.25, 0.68, 0.2), (0.25, 0.66, 0.2)):
        p.disc(du * height, dv * height, rr * height, leaf)


def draw_pole(p: Painter, rng: np.random.Generator) -> None:
    """Distractor: a pole with a traffic light or a sign."""
    height = rng.uniform(2.6, 3.4)
    p.box(-0.04, 0.0, 0.04, height, (110, 110, 115))
    if rng.random() < 0.5:  # traffic light
        p.box(-0.16, height - 0.05, 0.16, height + 0.75, (30, 30, 30))
        for k, c in enumerate([(220, 40, 30), (230, 190, 40), (40, 200, 80)]):
            p.disc(0.0, height + 0.6 - 0.23 * k, 0.09, c)
    else:  # a round or square sign
        c = _pick(rng, [(200, 30, 30), (30, 80, 190), (230, 200, 40)], 10)
        if rng.random() < 0.5:
            p.disc(0.0, height + 0.25, 0.3, c)
        else:
            p.box(-0.3, height - 0.1, 0.3, height + 0.5, c)


def draw_crate(p: Painter, rng: np.random.Generator) -> None:
    """Distractor: a box or bin."""
    color = _pick(rng, [(120, 80, 40), (40, 110, 60), (90, 90, 100), (40, 60, 130)], 20)
    w, h = rng.uniform(0.8, 1.6), rng.uniform(0.7, 1.3)
    p.box(-w / 2, 0.0, w / 2, h, color)
    p.box(-w / 2, h - 0.1, w / 2, h, _shade(color, 0.7))


def draw_bush(p: Painter, rng: np.random.Generator) -> None:
    """Distractor: a low bush."""
    leaf = _pick(rng, [(60, 120, 50), (80, 140, 60), (45, 95, 50)], 15)
    for du in (-0.6, 0.0, 0.6):
        p.disc(du, 0.45, rng.uniform(0.35, 0.55), leaf)


DRAW: dict[str, Callable[[Painter, np.random.Generator], None]] = {
    "truck": draw_truck, "car": draw_car, "rider": draw_rider, "person": draw_person,
    "train": draw_train, "motorcycle": draw_motorcycle, "bicycle": draw_bicycle, "bus": draw_bus,
    "tree": draw_tree, "pole": draw_pole, "crate": draw_crate, "bush": draw_bush,
}
DISTRACTORS = ["tree", "pole", "crate", "bush"]
