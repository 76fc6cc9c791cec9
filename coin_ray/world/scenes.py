"""Foggy-Shapes scenes: a street seen from a car, objects in perspective, per-pixel depth.

Geometry (all in the final image frame, W x H pixels, horizon row ``horizon``):
    scale at ground row y:  s(y) = s_max * (y - horizon) / (H - horizon)   [px per metre]
    depth at ground row y:  Z(y) = Z_NEAR * (H - horizon) / (y - horizon)  [metres]
so an object lower in the image is closer and larger. Every object is flat at the depth of
its ground contact; sky is at Z_SKY. Objects are painted far to near (occlusion), into an
RGB canvas and an instance-id canvas at ``SUPERSAMPLE`` times the resolution; the RGB is
then box-filtered down (anti-aliasing) and ground-truth boxes are the extent of each
object's pixels that stayed visible.

Outputs of ``render_scene``:
    image     (H, W, 3) float32 in [0, 1], the clear (source-domain) picture
    depth     (H, W) float32 metres
    instances (H, W) int32 object id per pixel (0 = ground or sky, < FIRST_OBJECT_ID = buildings)
    objects   list of ``GroundTruth`` (category objects only, boxes xyxy float pixels)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from coin_ray.config import FOGGY_SHAPES_CATEGORIES
from coin_ray.world.sprites import DISTRACTORS, DRAW, NOMINAL_SIZE, Painter

SUPERSAMPLE = 2
Z_NEAR = 5.0  # metres at the bottom image row
Z_SKY = 1000.0
FIRST_OBJECT_ID = 100  # ids below belong to background buildings
MIN_VISIBLE_FRACTION = 0.35  # objects hidden more than this are removed from the scene
MIN_BOX_SIDE = (10.0, 4.0)  # (longer, shorter) visible side in pixels for an object to count

# How often each category is sampled (Cityscapes-like imbalance, softened to stay learnable).
CATEGORY_WEIGHTS = {"truck": 0.10, "car": 0.24, "rider": 0.10, "person": 0.20, "train": 0.05,
                    "motorcycle": 0.09, "bicycle": 0.12, "bus": 0.10}
# Lateral range |X| in metres where each kind stands (vehicles on the road, people anywhere).
LATERAL_RANGE = {"truck": (0.0, 6.0), "car": (0.0, 6.5), "rider": (0.0, 8.0), "person": (0.0, 12.0),
                 "train": (0.0, 8.0), "motorcycle": (0.0, 8.0), "bicycle": (0.0, 10.0),
                 "bus": (0.0, 6.0), "tree": (7.5, 14.0), "pole": (7.0, 12.0), "crate": (6.5, 12.0),
                 "bush": (7.0, 13.0)}


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to redraw one scene exactly (no randomness left inside)."""

    width: int
    height: int
    horizon: float
    s_max: float
    sky: tuple[tuple[int, int, int], tuple[int, int, int]]
    ground: tuple[int, int, int]
    road: tuple[int, int, int]
    buildings: tuple[tuple[float, float, float, float, tuple[int, int, int]], ...]  # x0,x1,top,depth,color
    objects: tuple["SceneObject", ...]
    seed: int


@dataclass(frozen=True)
class SceneObject:
    """One sprite of a scene: what, where (ground contact in pixels), which way, its own seed."""

    kind: str
    x: float  # pixel x of the ground contact centre
    y: float  # pixel y of the ground contact
    facing: int
    seed: int
    obj_id: int
    partner: int = 0  # rider <-> its bicycle or motorcycle (dropped together)


@dataclass
class GroundTruth:
    """One visible category object: ``box`` xyxy float pixels, ``category`` index in [0, K)."""

    box: tuple[float, float, float, float]
    category: int
    depth: float
    visible_fraction: float
    obj_id: int  # the object's value in the instance map


def scale_at(spec_h: int, horizon: float, s_max: float, y: np.ndarray | float) -> np.ndarray | float:
    """Pixels per metre at ground row ``y`` (0 at and above the horizon)."""
    return s_max * np.maximum(np.asarray(y, dtype=np.float64) - horizon, 0.0) / (spec_h - horizon)


def depth_at(spec_h: int, horizon: float, y: np.ndarray | float) -> np.ndarray:
    """Metres to the ground at row ``y``; Z_SKY at and above the horizon."""
    dy = np.asarray(y, dtype=np.float64) - horizon
    with np.errstate(divide="ignore"):
        z = Z_NEAR * (spec_h - horizon) / np.where(dy > 0, dy, 1e-9)
    return np.minimum(np.where(dy > 0, z, Z_SKY), Z_SKY)


def _row_range(kind: str, width: int, height: int, horizon: float, s_max: float) -> tuple[float, float]:
    """Ground rows where ``kind`` is big enough to see and small enough to fit."""
    length, tall = NOMINAL_SIZE[kind]
    s_min = max(MIN_BOX_SIDE[0] * 1.4 / max(length, tall), MIN_BOX_SIDE[1] * 1.6 / min(length, tall))
    # Trains run on a track in the middle distance; other objects must fit the frame.
    s_top = min(0.8 * height / tall, 0.9 * width / length, s_max) if kind != "train" else 0.3 * height / tall
    # scale grows linearly from the horizon, so a scale is a fraction of the rows below it
    lo = horizon + s_min / s_max * (height - horizon)
    hi = horizon + min(s_top / s_max, 1.0) * (height - horizon)
    return lo, max(lo, hi - 1.0)


def _place(rng: np.random.Generator, kind: str, spec: dict, obj_id: int,
           y: float | None = None) -> SceneObject | None:
    width, height, horizon, s_max = spec["width"], spec["height"], spec["horizon"], spec["s_max"]
    lo, hi = _row_range(kind, width, height, horizon, s_max)
    if hi <= lo:
        return None
    y = float(rng.uniform(lo, hi)) if y is None else y
    a, b = LATERAL_RANGE[kind]
    lateral = float(rng.uniform(a, b)) * (1 if rng.random() < 0.5 else -1)
    x = width / 2 + (spec["camera_x"] + lateral) * scale_at(height, horizon, s_max, y)
    if not -0.05 * width <= x <= 1.05 * width:
        return None
    facing = 1 if rng.random() < 0.5 else -1
    return SceneObject(kind, float(x), y, facing, int(rng.integers(2**31)), obj_id)


def sample_scene(rng: np.random.Generator, width: int, height: int,
                 num_objects: tuple[int, int] = (3, 9), num_distractors: tuple[int, int] = (1, 4)) -> SceneSpec:
    """Draw one scene description from ``rng`` (all later drawing is deterministic)."""
    horizon = float(rng.uniform(0.34, 0.44) * height)
    spec = {"width": width, "height": height, "horizon": horizon, "s_max": float(rng.uniform(21, 26)),
            "camera_x": float(rng.uniform(-1.5, 1.5))}
    names = list(CATEGORY_WEIGHTS)
    weights = np.array([CATEGORY_WEIGHTS[n] for n in names])
    objects: list[SceneObject] = []
    next_id = FIRST_OBJECT_ID
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        kind = names[rng.choice(len(names), p=weights / weights.sum())]
        base = "bicycle" if kind == "rider" and rng.random() < 0.6 else "motorcycle" if kind == "rider" else kind
        obj = _place(rng, base, spec, next_id)
        if obj is None:
            continue
        if kind == "rider":  # the rider sits on its vehicle; both are ground truth
            rider = SceneObject("rider", obj.x, obj.y, obj.facing, int(rng.integers(2**31)), next_id + 1, next_id)
            obj = SceneObject(obj.kind, obj.x, obj.y, obj.facing, obj.seed, next_id, next_id + 1)
            objects += [obj, rider]
            next_id += 2
        else:
            objects.append(obj)
            next_id += 1
    for _ in range(int(rng.integers(num_distractors[0], num_distractors[1] + 1))):
        obj = _place(rng, DISTRACTORS[rng.integers(len(DISTRACTORS))], spec, next_id)
        if obj is not None:
            objects.append(obj)
            next_id += 1
    return SceneSpec(width, height, horizon, spec["s_max"], _sky_colors(rng), _ground_color(rng),
                     _road_color(rng), _buildings(rng, width, horizon), tuple(objects),
                     int(rng.integers(2**31)))


def _sky_colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    top = (int(rng.integers(60, 120)), int(rng.integers(110, 170)), int(rng.integers(180, 240)))
    low = tuple(int(min(255, c + rng.integers(40, 80))) for c in top)
    return top, low  # type: ignore[return-value]


def _ground_color(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(130, 175))
    return (g, g - int(rng.integers(0, 12)), g - int(rng.integers(5, 25)))


def _road_color(rng: np.random.Generator) -> tuple[int, int, int]:
    g = int(rng.integers(70, 110))
    return (g, g, g + int(rng.integers(0, 10)))


def _buildings(rng: np.random.Generator, width: int, horizon: float) -> tuple:
    out, x = [], float(rng.uniform(-20, 0))
    while x < width:
        w = float(rng.uniform(18, 60))
        top = float(horizon - rng.uniform(8, min(55, horizon - 2)))
        g = int(rng.integers(110, 200))
        color = (g, int(g * rng.uniform(0.85, 1.0)), int(g * rng.uniform(0.75, 1.0)))
        out.append((x, x + w, top, float(rng.uniform(150, 300)), color))
        x += w + float(rng.uniform(-5, 15))
    return tuple(out)


def _background(spec: SceneSpec) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Sky, ground, road and buildings at supersampled size: (rgb, ids, background depth)."""
    ss, w, h = SUPERSAMPLE, spec.width * SUPERSAMPLE, spec.height * SUPERSAMPLE
    rows = (np.arange(h, dtype=np.float32) + 0.5) / ss
    t = np.clip(rows / max(spec.horizon, 1.0), 0, 1)[:, None, None]
    sky = np.array(spec.sky[0], np.float32) * (1 - t) + np.array(spec.sky[1], np.float32) * t
    rgb = np.where((rows < spec.horizon)[:, None, None], sky, np.array(spec.ground, np.float32))
    rgb = np.broadcast_to(rgb, (h, w, 3)).astype(np.uint8)
    canvas, ids = Image.fromarray(rgb), Image.new("I", (w, h), 0)
    draw, draw_ids = ImageDraw.Draw(canvas), ImageDraw.Draw(ids)
    depth = Image.fromarray(np.broadcast_to(
        depth_at(spec.height, spec.horizon, rows)[:, None], (h, w)).astype(np.float32), mode="F")
    draw_depth = ImageDraw.Draw(depth)
    for k, (x0, x1, top, z, color) in enumerate(spec.buildings, start=1):
        bounds = [x0 * ss, top * ss, x1 * ss, spec.horizon * ss]
        draw.rectangle(bounds, fill=color)
        draw_ids.rectangle(bounds, fill=k)
        draw_depth.rectangle(bounds, fill=z)
        for wx in np.arange(x0 + 3, x1 - 4, 7.0):  # window grid
            for wy in np.arange(top + 3, spec.horizon - 4, 6.0):
                draw.rectangle([wx * ss, wy * ss, (wx + 3) * ss, (wy + 3) * ss], fill=(70, 80, 95))
    _road(draw, spec)
    return canvas, ids, depth


def _road(draw: ImageDraw.ImageDraw, spec: SceneSpec) -> None:
    """The road trapezoid towards the vanishing point, with dashed lane markings."""
    ss, h, cx = SUPERSAMPLE, spec.height, spec.width / 2
    half = 6.5 * spec.s_max  # road half-width (6.5 m) in pixels at the bottom row
    vanish = (cx * ss, spec.horizon * ss)
    draw.polygon([vanish, ((cx - half) * ss, h * ss), ((cx + half) * ss, h * ss)], fill=spec.road)
    for z0 in np.arange(6.0, 120.0, 9.0):  # dashes 4.5 m long every 9 m along the road
        y0 = spec.horizon + Z_NEAR * (h - spec.horizon) / (z0 + 4.5)
        y1 = spec.horizon + Z_NEAR * (h - spec.horizon) / z0
        w0 = 0.08 * spec.s_max * (y0 - spec.horizon) / (h - spec.horizon)
        w1 = 0.08 * spec.s_max * (y1 - spec.horizon) / (h - spec.horizon)
        draw.polygon([((cx - w0) * ss, y0 * ss), ((cx + w0) * ss, y0 * ss),
                      ((cx + w1) * ss, y1 * ss), ((cx - w1) * ss, y1 * ss)], fill=(225, 225, 215))


def _window(spec: SceneSpec, obj: SceneObject, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """A supersampled pixel window (x0, y0, x1, y1) that surely holds all of ``obj``."""
    length, tall = NOMINAL_SIZE[obj.kind]
    s = float(scale_at(spec.height, spec.horizon, spec.s_max, obj.y)) * SUPERSAMPLE
    half = (0.8 * length + 1.0) * s
    x, y = obj.x * SUPERSAMPLE, obj.y * SUPERSAMPLE
    x0, x1 = max(0, int(x - half)), min(shape[1], int(x + half) + 2)
    y0, y1 = max(0, int(y - (1.5 * tall + 1.0) * s)), min(shape[0], int(y + 0.5 * s) + 2)
    return x0, y0, max(x0, x1), max(y0, y1)


def _paint_objects(spec: SceneSpec, objects: list[SceneObject], canvas: Image.Image,
                   ids: Image.Image) -> dict[int, tuple[int, tuple[int, int, int, int]]]:
    """Paint far to near; per object: its pixel count right after painting, and its window."""
    draw, draw_ids = ImageDraw.Draw(canvas), ImageDraw.Draw(ids)
    # Sort key: far first; a rider goes right after its vehicle (same ground row).
    order = sorted(objects, key=lambda o: (o.y, o.kind == "rider"))
    full = {}
    for obj in order:
        s = float(scale_at(spec.height, spec.horizon, spec.s_max, obj.y))
        painter = Painter(draw, draw_ids, SUPERSAMPLE, obj.x, obj.y, s, obj.facing, obj.obj_id)
        DRAW[obj.kind](painter, np.random.default_rng(obj.seed))
        window = _window(spec, obj, (ids.height, ids.width))
        full[obj.obj_id] = (int((np.asarray(ids.crop(window)) == obj.obj_id).sum()), window)
    return full


def _visible_boxes(ids_ss: np.ndarray, objects: list[SceneObject],
                   full: dict) -> dict[int, tuple[tuple[float, float, float, float], float]]:
    """Box (xyxy, final pixels) and visible fraction of each object's visible pixels."""
    out = {}
    for obj in objects:
        count, (x0, y0, x1, y1) = full[obj.obj_id]
        mask = ids_ss[y0:y1, x0:x1] == obj.obj_id
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if len(rows) == 0:
            continue
        box = (float(x0 + cols[0]) / SUPERSAMPLE, float(y0 + rows[0]) / SUPERSAMPLE,
               float(x0 + cols[-1] + 1) / SUPERSAMPLE, float(y0 + rows[-1] + 1) / SUPERSAMPLE)
        out[obj.obj_id] = (box, float(mask.sum()) / max(count, 1))
    return out


def _keeps(obj: SceneObject, vis: dict) -> bool:
    if obj.obj_id not in vis:
        return False
    (x0, y0, x1, y1), fraction = vis[obj.obj_id]
    w, h = x1 - x0, y1 - y0
    return fraction >= MIN_VISIBLE_FRACTION and max(w, h) >= MIN_BOX_SIDE[0] and min(w, h) >= MIN_BOX_SIDE[1]


def render_scene(spec: SceneSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[GroundTruth]]:
    """Draw ``spec``: (image (H,W,3) float32 [0,1], depth (H,W) float32 m, instances (H,W) int32, gt).

    Objects hidden too much (or too small once occluded) are removed and the scene drawn
    again, so every object in the picture is either ground truth or a distractor.
    """
    objects = list(spec.objects)
    background = _background(spec)
    for _ in range(3):
        canvas, ids, bg_depth = (im.copy() for im in background)
        full = _paint_objects(spec, objects, canvas, ids)
        ids_ss = np.asarray(ids, dtype=np.int32)
        vis = _visible_boxes(ids_ss, objects, full)
        bad = {o.obj_id for o in objects if not _keeps(o, vis)}
        bad |= {o.partner for o in objects if o.obj_id in bad and o.partner}
        if not bad:
            break
        objects = [o for o in objects if o.obj_id not in bad]
    ss = SUPERSAMPLE
    depth_ss = np.asarray(bg_depth, dtype=np.float32).copy()
    for obj in objects:  # flat sprites: every pixel at the depth of the ground contact
        x0, y0, x1, y1 = full[obj.obj_id][1]
        region = depth_ss[y0:y1, x0:x1]
        region[ids_ss[y0:y1, x0:x1] == obj.obj_id] = float(depth_at(spec.height, spec.horizon, obj.y))
    image = np.asarray(canvas.resize((spec.width, spec.height), Image.Resampling.BOX), np.float32) / 255.0
    depth = depth_ss.reshape(spec.height, ss, spec.width, ss).mean(axis=(1, 3))
    gt = [GroundTruth(vis[o.obj_id][0], FOGGY_SHAPES_CATEGORIES.index(o.kind),
                      float(depth_at(spec.height, spec.horizon, o.y)), vis[o.obj_id][1], o.obj_id)
          for o in objects if o.kind in FOGGY_SHAPES_CATEGORIES]
    return image, depth.astype(np.float32), ids_ss[::ss, ::ss].copy(), gt
