"""Drag Points: handle -> target pairs from the JSON the canvas widget writes, checked against the image."""

from __future__ import annotations

import json

import torch

from adaptivedrag_core.points import DragPoints, PointsError

from .bridge import image_size
from .spec import DRAG_POINTS, InputSpec, NodeResult, NodeSpec, OutputSpec, ShowAndStop

# The UI key under which the node sends the image it received, so the canvas can show it after a run.
IMAGE_UI_KEY = "adaptivedrag_image"


def make_drag_points(image: torch.Tensor, points_json: str, rescale: bool = False) -> NodeResult:
    """Parse ``points_json`` and tie the points to ``image``.

    Args:
        image: ComfyUI IMAGE [B, H, W, C]; the points belong to its first image.
        points_json: ``{"version": 1, "width", "height", "pairs": [{"handle": [x, y], "target": [x, y]}]}``.
        rescale: map points placed on an image of another size onto this one, instead of raising.

    Returns:
        ``DragPoints`` sized like the image, and the image for the canvas under ``IMAGE_UI_KEY``.

    Raises:
        ShowAndStop: no pairs yet, or points that do not fit; the image still goes to the canvas, so the user can
            place or fix them on whatever image arrives (not only a Load Image's).
    """
    shown = {IMAGE_UI_KEY: image[:1]}
    width, height = image_size(image)
    try:
        points = parsed_points(points_json)
        if rescale:
            points = points.rescaled(width, height)
        else:
            points.check_image_size(width, height)
    except PointsError as error:
        raise ShowAndStop(f"{error}; the Drag Points canvas now shows this {width}x{height} image", shown) from None
    return NodeResult((points,), ui_images=shown, notes=[f"{len(points)} pair{'s' * (len(points) != 1)} on the "
                                                         f"{width}x{height} image"])


def parsed_points(points_json: str) -> DragPoints:
    """The pairs of the widget's JSON; a clear "place pairs" error while there are none yet."""
    if not points_json or not points_json.strip() or _pairs_of(points_json) == []:
        raise PointsError("no drag pairs yet: place handle -> target pairs on the canvas (click the handle, then "
                          "its target), then queue again")
    return DragPoints.from_json(points_json)


def _pairs_of(points_json: str):
    """The ``pairs`` entry of the JSON text, or None when the text is not a JSON object (parsed again, with its
    error, by ``DragPoints.from_json``)."""
    try:
        data = json.loads(points_json)
    except (ValueError, RecursionError):
        return None
    return data.get("pairs") if isinstance(data, dict) else None


SPEC = NodeSpec(
    node_id="AdaptiveDrag_DragPoints",
    display_name="Drag Points (AdaptiveDrag)",
    description="Handle -> target point pairs in image pixels. Place them on the image with the canvas, or type "
                "the JSON. The canvas shows Load Image's picture at once; any other image (after ImageScale, for "
                "example) appears after one run, which stops here until pairs are placed.",
    inputs=(
        InputSpec("image", "IMAGE", "The image the points are placed on (the one you edit)."),
        InputSpec("points_json", "STRING", "Drag pairs as JSON: {\"version\": 1, \"width\": W, \"height\": H, "
                  "\"pairs\": [{\"handle\": [x, y], \"target\": [x, y]}]}. The canvas writes it.",
                  default="", multiline=True),
        InputSpec("rescale", "BOOLEAN", "Map points placed on an image of another size onto this image, "
                  "instead of stopping with an error.", default=False),
    ),
    outputs=(OutputSpec("drag_points", DRAG_POINTS, "Handle -> target pairs in this image's pixels."),),
    run=make_drag_points,
)
