"""Drag Points: handle -> target pairs from the JSON the canvas widget writes, checked against the image."""

from __future__ import annotations

import torch

from adaptivedrag_core.points import DragPoints, PointsError

from .bridge import image_size
from .spec import DRAG_POINTS, InputSpec, NodeResult, NodeSpec, OutputSpec

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
    """
    if not points_json or not points_json.strip():
        raise PointsError("no drag points: place handle -> target pairs on the image (or type the points JSON)")
    points = DragPoints.from_json(points_json)
    width, height = image_size(image)
    if rescale:
        points = points.rescaled(width, height)
    else:
        points.check_image_size(width, height)
    return NodeResult((points,), ui_images={IMAGE_UI_KEY: image[:1]})


SPEC = NodeSpec(
    node_id="AdaptiveDrag_DragPoints",
    display_name="Drag Points (AdaptiveDrag)",
    description="Handle -> target point pairs in image pixels. Place them on the image with the canvas "
                "(run the graph once to show the image), or type the JSON.",
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
