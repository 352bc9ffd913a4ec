"""Pictures for people: numbered handle -> target arrows, and the before/after preview."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from .images import to_rgb
from .points import DragPoints, map_point

HANDLE_COLOUR = (230, 40, 40)
TARGET_COLOUR = (40, 90, 230)
ARROW_COLOUR = (255, 255, 255)
FINAL_COLOUR = (255, 214, 0)
#: Longest side of each half of the before/after preview: enough to see the edit, and the sheet stays far below
#: the pixel count Pillow refuses to open (a 10000x10000 input made a 200-megapixel preview).
PREVIEW_SIDE = 2048


def draw_arrows(image: Image.Image, points: DragPoints) -> Image.Image:
    """A copy of ``image`` (RGB) with each pair drawn: red handle, blue target, arrow between, pair number.

    Points are rescaled if they were placed on an image of another size.
    """
    canvas = to_rgb(image)
    if (canvas.width, canvas.height) != (points.width, points.height):
        points = points.rescaled(canvas.width, canvas.height)
    draw = ImageDraw.Draw(canvas)
    size = max(canvas.width, canvas.height)
    radius = max(3, size // 60)
    width = max(2, size // 150)
    font = _font(max(10, size // 20))
    for number, (handle, target) in enumerate(zip(points.handles, points.targets), start=1):
        _arrow(draw, handle, target, width, head=radius * 2.5)
        for (x, y), colour in ((handle, HANDLE_COLOUR), (target, TARGET_COLOUR)):
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=ARROW_COLOUR)
        draw.text((handle[0] + radius + 1, handle[1] - radius), str(number), fill=ARROW_COLOUR, font=font,
                  anchor="lb", stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def draw_final_handles(image: Image.Image, points: DragPoints, final_handles: Sequence) -> Image.Image:
    """A copy of ``image`` (RGB) with, for each pair, its target (blue) and where its handle ended (yellow),
    a thin line between them and the pair number: how far each handle got.

    Args:
        image: the result, any size (the points are mapped onto it).
        points: the requested pairs; ``final_handles`` are in the same pixels.
        final_handles: (x, y) per pair, where the optimiser left the handle.
    """
    canvas = to_rgb(image)
    draw = ImageDraw.Draw(canvas)
    size = max(canvas.width, canvas.height)
    radius = max(3, size // 60)
    font = _font(max(10, size // 20))
    for number, (target, final) in enumerate(zip(points.targets, final_handles), start=1):
        (tx, ty), (fx, fy) = (map_point(p, points.width, points.height, canvas.width, canvas.height)
                              for p in (target, final))
        draw.line((fx, fy, tx, ty), fill=ARROW_COLOUR, width=max(1, size // 300))
        draw.ellipse((tx - radius, ty - radius, tx + radius, ty + radius), outline=TARGET_COLOUR,
                     width=max(2, radius // 2))
        draw.ellipse((fx - radius, fy - radius, fx + radius, fy + radius), fill=FINAL_COLOUR, outline=(0, 0, 0))
        draw.text((fx + radius + 1, fy - radius), str(number), fill=ARROW_COLOUR, font=font, anchor="lb",
                  stroke_width=1, stroke_fill=(0, 0, 0))
    return canvas


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _arrow(draw: ImageDraw.ImageDraw, start, end, width: int, head: float) -> None:
    (x0, y0), (x1, y1) = start, end
    angle = math.atan2(y1 - y0, x1 - x0)
    draw.line((x0, y0, x1, y1), fill=ARROW_COLOUR, width=width)
    for side in (-0.5, 0.5):
        tip = (x1 - head * math.cos(angle + side), y1 - head * math.sin(angle + side))
        draw.line((x1, y1, *tip), fill=ARROW_COLOUR, width=width)


def side_by_side(original: Image.Image, result: Image.Image, points: DragPoints,
                 final_handles: Optional[Sequence] = None) -> Image.Image:
    """The original with arrows next to the result, for a person to compare; each half at most
    :data:`PREVIEW_SIDE` pixels a side. With ``final_handles`` (in the points' pixels) the result shows where each
    handle ended (:func:`draw_final_handles`)."""
    scale = min(1.0, PREVIEW_SIDE / max(original.size))
    size = (max(1, round(original.width * scale)), max(1, round(original.height * scale)))
    left = draw_arrows(to_rgb(original).resize(size, Image.LANCZOS), points)
    right = to_rgb(result).resize(left.size, Image.LANCZOS)
    if final_handles is not None:
        right = draw_final_handles(right, points, final_handles)
    gap = max(4, left.width // 64)
    sheet = Image.new("RGB", (left.width * 2 + gap, left.height), (32, 32, 32))
    sheet.paste(left, (0, 0))
    sheet.paste(right, (left.width + gap, 0))
    return sheet
