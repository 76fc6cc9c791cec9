"""A picture of Foggy-Shapes: the same val scenes clear (source) and foggy (target), with boxes.

    python -m coin_ray.world.preview --out docs/foggy_shapes.png --rows 3 --scale 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from coin_ray.config import FOGGY_SHAPES_CATEGORIES
from coin_ray.world.dataset import render_image

BOX_COLORS = [(255, 140, 0), (255, 60, 60), (0, 200, 255), (255, 255, 0), (180, 80, 255),
              (0, 255, 120), (255, 0, 200), (40, 90, 255)]


PHOTO_COLORS = 240  # palette entries for the pictures; the rest are for boxes and text


def _labels(boxes: list, title: str, scale: int, dx: int, dy: int) -> list[tuple]:
    """Box and text drawing orders for one tile placed at (dx, dy)."""
    orders = []
    for (x0, y0, x1, y1), category in boxes:
        color = PHOTO_COLORS + category % len(BOX_COLORS)
        orders.append(("box", [dx + x0 * scale, dy + y0 * scale, dx + x1 * scale - 1, dy + y1 * scale - 1], color))
        orders.append(("text", (dx + x0 * scale + 1, dy + max(0, y0 * scale - 11)),
                       FOGGY_SHAPES_CATEGORIES[category], color))
    orders.append(("title", (dx + 4, dy + 2), title, PHOTO_COLORS + len(BOX_COLORS)))
    return orders


def write_preview(out: str | Path, rows: int = 3, seed: int = 0, scale: int = 2,
                  width: int = 256, height: int = 160) -> Path:
    """Write a PNG grid: one val scene per row, clear on the left, fog on the right, GT boxes drawn.

    The PNG is palette-based (240 colours for the pictures, the rest for boxes) to stay small.
    """
    w, h = width * scale, height * scale
    sheet = Image.new("RGB", (2 * w + 4, rows * (h + 4) - 4), (255, 255, 255))
    orders: list[tuple] = []
    for i in range(rows):
        clear, gt, _ = render_image(seed, "val", i, "clear", width, height)
        foggy, _, params = render_image(seed, "val", i, "fog", width, height)
        boxes = [(g.box, g.category) for g in gt]
        for col, (image, title) in enumerate([(clear, "source: clear"),
                                              (foggy, f"target: fog (beta {params['beta']:.3f}/m)")]):
            tile = Image.fromarray(image).resize((w, h), Image.Resampling.NEAREST)
            sheet.paste(tile, (col * (w + 4), i * (h + 4)))
            orders += _labels(boxes, title, scale, col * (w + 4), i * (h + 4))
    sheet = sheet.quantize(colors=PHOTO_COLORS, dither=Image.Dither.NONE)
    palette = sheet.getpalette()[: 3 * PHOTO_COLORS]
    palette += [c for rgb in [*BOX_COLORS, (0, 0, 0)] for c in rgb]
    sheet.putpalette(palette)
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for kind, where, *rest in orders:
        if kind == "box":
            draw.rectangle(where, outline=rest[0], width=1)
        else:
            draw.text(where, rest[0], fill=rest[1], font=font)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: write the preview PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="foggy_shapes.png")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2, help="integer upscaling of each tile")
    args = p.parse_args(argv)
    print(write_preview(args.out, args.rows, args.seed, args.scale))


if __name__ == "__main__":
    main()
