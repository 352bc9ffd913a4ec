"""Drag points: handle -> target pairs in image pixels, with the size of the image they were placed on.

Two text forms are accepted:

* the CLI form, one ``"X1,Y1:X2,Y2"`` string per pair;
* a versioned JSON form, shared with the ComfyUI node and the canvas widget::

    {"version": 1, "width": W, "height": H,
     "pairs": [{"handle": [x, y], "target": [x, y]}, ...]}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import InputError

JSON_VERSION = 1

# Bounds that keep hostile input from making the parser do unbounded work; the canvas widget has the same
# (LIMITS in web/points_model.js).
MAX_TEXT_LENGTH = 100_000
MAX_PAIRS = 256
MAX_SIDE = 65_536
MAX_DEPTH = 6  # the valid form nests 4 deep: object > pairs > pair > [x, y]

Point = tuple[float, float]


class PointsError(InputError):
    """Drag points that cannot be used; the message names the problem."""


@dataclass(frozen=True)
class DragPoints:
    """Handle -> target pairs in pixel coordinates of an image of ``width`` x ``height``.

    Args:
        handles: (x, y) of each handle, in image pixels (x to the right, y down).
        targets: (x, y) of each target, same order and units.
        width: width of the image the points were placed on.
        height: height of that image.
    """

    handles: tuple[Point, ...]
    targets: tuple[Point, ...]
    width: int
    height: int

    def __post_init__(self):
        for name in ("handles", "targets"):
            points = tuple(_as_point(point, f"{name[:-1]} {i}") for i, point in enumerate(getattr(self, name), 1))
            object.__setattr__(self, name, points)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not (isinstance(self.width, int) and isinstance(self.height, int)) or self.width <= 0 or self.height <= 0:
            raise PointsError(f"image size must be positive integers, got {self.width}x{self.height}")
        if self.width > MAX_SIDE or self.height > MAX_SIDE:
            raise PointsError(f"image size {self.width}x{self.height}: points take images of at most {MAX_SIDE} "
                              "pixels a side")
        if len(self.handles) != len(self.targets):
            raise PointsError(f"{len(self.handles)} handles but {len(self.targets)} targets")
        if not self.handles:
            raise PointsError("no drag pairs: give at least one handle -> target pair")
        if len(self.handles) > MAX_PAIRS:
            raise PointsError(f"too many drag pairs: {len(self.handles)} (at most {MAX_PAIRS})")
        for i, (h, t) in enumerate(zip(self.handles, self.targets), start=1):
            for name, (x, y) in (("handle", h), ("target", t)):
                if not (math.isfinite(x) and math.isfinite(y)):
                    raise PointsError(f"pair {i}: {name} ({x}, {y}) is not a finite number")
                if not (0 <= x <= self.width - 1 and 0 <= y <= self.height - 1):
                    raise PointsError(
                        f"pair {i}: {name} ({x:g}, {y:g}) is outside the {self.width}x{self.height} image"
                    )
            if h == t:
                raise PointsError(f"pair {i}: handle and target are the same point ({h[0]:g}, {h[1]:g})")

    def __len__(self) -> int:
        return len(self.handles)

    # ---------------------------------------------------------------- parsing
    @classmethod
    def from_pairs(cls, pairs: Iterable[str], width: int, height: int) -> "DragPoints":
        """Parse CLI pairs, each ``"X1,Y1:X2,Y2"`` (handle then target)."""
        handles, targets = [], []
        for i, text in enumerate(pairs, start=1):
            numbers = [part for part in str(text).replace(":", ",").split(",") if part.strip() != ""]
            if len(numbers) != 4:
                raise PointsError(
                    f"drag {i} {text!r}: expected X1,Y1:X2,Y2 (4 numbers), got {len(numbers)} coordinate(s)"
                )
            try:
                x1, y1, x2, y2 = (float(n) for n in numbers)
            except ValueError:
                raise PointsError(f"drag {i} {text!r}: coordinates must be numbers") from None
            handles.append((x1, y1))
            targets.append((x2, y2))
        return cls(tuple(handles), tuple(targets), width, height)

    @classmethod
    def from_flat(cls, coords: Sequence[float], width: int, height: int) -> "DragPoints":
        """Parse a flat list ``[hx, hy, tx, ty, hx, hy, ...]`` (DragBench's alternating order, flattened)."""
        if len(coords) % 4 != 0:
            raise PointsError(f"{len(coords)} coordinates: need handle and target (x, y) for every pair")
        handles = [(coords[i], coords[i + 1]) for i in range(0, len(coords), 4)]
        targets = [(coords[i + 2], coords[i + 3]) for i in range(0, len(coords), 4)]
        return cls(tuple(handles), tuple(targets), width, height)

    @classmethod
    def from_json(cls, text: str) -> "DragPoints":
        """Parse the versioned JSON form. Raises :class:`PointsError` (only) naming what is wrong."""
        if isinstance(text, (str, bytes)) and len(text) > MAX_TEXT_LENGTH:
            raise PointsError(f"drag points JSON is too long ({len(text)} characters, at most {MAX_TEXT_LENGTH})")
        if isinstance(text, (str, bytes)) and _nesting_depth(text) > MAX_DEPTH:
            raise PointsError("drag points JSON is nested too deeply")
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:  # ValueError: also integers beyond Python's digit limit
            raise PointsError(f"drag points are not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data) -> "DragPoints":
        if not isinstance(data, dict):
            raise PointsError("drag points JSON must be an object with version, width, height and pairs")
        version = data.get("version")
        if version != JSON_VERSION:
            raise PointsError(f"unsupported drag points version {version!r} (expected {JSON_VERSION})")
        width, height = data.get("width"), data.get("height")
        if not (_is_int(width) and _is_int(height)):
            raise PointsError("drag points JSON needs integer width and height of the image they were placed on")
        pairs = data.get("pairs")
        if not isinstance(pairs, list):
            raise PointsError("drag points JSON needs a list of pairs")
        handles, targets = [], []
        for i, pair in enumerate(pairs, start=1):
            if not isinstance(pair, dict):
                raise PointsError(f"pair {i} must be an object with handle and target")
            handles.append(_xy(pair.get("handle"), f"pair {i} handle"))
            targets.append(_xy(pair.get("target"), f"pair {i} target"))
        return cls(tuple(handles), tuple(targets), int(width), int(height))

    def to_dict(self) -> dict:
        return {
            "version": JSON_VERSION,
            "width": self.width,
            "height": self.height,
            "pairs": [{"handle": list(h), "target": list(t)} for h, t in zip(self.handles, self.targets)],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    # ---------------------------------------------------------------- mapping
    def check_image_size(self, width: int, height: int) -> None:
        """Raise if these points were placed on an image of another size."""
        if (width, height) != (self.width, self.height):
            raise PointsError(
                f"image is {width}x{height} but points were placed on {self.width}x{self.height}; "
                "re-place the points or enable rescaling"
            )

    def rescaled(self, width: int, height: int) -> "DragPoints":
        """The same points on an image of another size (pixel-centre aligned)."""
        return DragPoints(
            tuple(map_point(p, self.width, self.height, width, height) for p in self.handles),
            tuple(map_point(p, self.width, self.height, width, height) for p in self.targets),
            width,
            height,
        )

    def to_grid(self, grid_width: int, grid_height: int) -> tuple[list[Point], list[Point]]:
        """Handles and targets mapped onto a feature or latent grid of the given size (float coordinates)."""
        return (
            [map_point(p, self.width, self.height, grid_width, grid_height) for p in self.handles],
            [map_point(p, self.width, self.height, grid_width, grid_height) for p in self.targets],
        )


def map_point(point: Point, src_w: float, src_h: float, dst_w: float, dst_h: float) -> Point:
    """Map (x, y) from a src_w x src_h pixel grid to a dst_w x dst_h grid (an image, a feature map or a latent).

    Pixel centres are aligned (x + 0.5 scales with the grid), so the point covers the same content; the result
    is clamped to the destination grid.
    """
    x, y = point
    nx = (x + 0.5) * dst_w / src_w - 0.5
    ny = (y + 0.5) * dst_h / src_h - 0.5
    return (min(max(nx, 0.0), dst_w - 1.0), min(max(ny, 0.0), dst_h - 1.0))


def _nesting_depth(text) -> int:
    """Deepest bracket nesting outside strings; checked before parsing, so the parse itself stays shallow."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _as_point(point, where: str) -> Point:
    """(x, y) as floats; PointsError if they are not two numbers or too large for a float."""
    try:
        x, y = point
        return (float(x), float(y))
    except OverflowError:
        raise PointsError(f"{where}: coordinates {point!r:.40} are too large") from None
    except (TypeError, ValueError):
        raise PointsError(f"{where} must be two numbers (x, y), got {point!r:.40}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _xy(value, where: str) -> Point:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise PointsError(f"{where} must be [x, y] numbers, got {value!r:.40}")
    return _as_point(value, where)
