"""Scores of a drag edit on a scene case against its known answer (:class:`~adaptivedrag_core.scenes.DragCase`).

Every score is read off the edited picture and the scene's ground truth, never off the optimiser's own tracked
handles:

- **MD** (mean distance, pixels): where the dragged object's content is in the result, found by matching the
  object's original appearance (its visible pixels in the input, as a masked template) over the whole result,
  and its distance to the target;
- **fidelity**: PSNR and mean absolute error against the input outside every moved object's old and new
  footprint (dilated by 3 px), and PSNR against the ground-truth moved scene over the whole image;
- **IoU**: of the object's footprint at its target in the ground truth and the pixels near it that look like the
  object in the result (nearer one of the object's own colours than the background behind it, and close to one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation
from scipy.signal import fftconvolve

from ..scenes import DragCase, RenderedScene

#: Pixels around the moved footprints that the fidelity score leaves out (anti-aliased edges, soft shadows).
FOOTPRINT_MARGIN = 3
#: A pixel looks like the object when it is within this RGB distance of one of the object's colours.
COLOUR_TOLERANCE = 48.0


@dataclass(frozen=True)
class CaseScores:
    """Scores of one edit. Distances in scene pixels; PSNR in dB; MAE in 0-255 units.

    Args:
        md: mean over pairs of the distance from the object's found position to its target.
        found: where each moved object's content was found (the handle's position after the found shift).
        outside_psnr, outside_mae: against the input, outside the moved footprints.
        gt_psnr: against the ground-truth moved scene, whole image.
        iou: mean over pairs of the IoU of the object's footprint at the target.
    """

    md: float
    found: list
    outside_psnr: float
    outside_mae: float
    gt_psnr: float
    iou: float

    def as_dict(self) -> dict:
        return {"md": self.md, "found": self.found, "outside_psnr": self.outside_psnr,
                "outside_mae": self.outside_mae, "gt_psnr": self.gt_psnr, "iou": self.iou}


def score_case(case: DragCase, result: np.ndarray) -> CaseScores:
    """Score ``result`` ([S, S, 3] uint8, the edited scene) against ``case``."""
    result = np.asarray(result, dtype=np.float32)
    before = case.scene.render()
    after = case.ground_truth().render()
    source = before.image.astype(np.float32)
    found, distances, ious = [], [], []
    for index, handle, target in zip(case.moved, case.handles, case.targets):
        shift = locate(result, source, before.visible[index])
        position = (handle[0] + shift[0], handle[1] + shift[1])
        found.append([round(position[0], 2), round(position[1], 2)])
        distances.append(math.dist(position, target))
        ious.append(footprint_iou(case, index, result, after))
    keep = ~moved_footprints(case, before, after)
    error = result - source
    outside_mse = float((error[keep] ** 2).mean()) if keep.any() else 0.0
    outside_mae = float(np.abs(error[keep]).mean()) if keep.any() else 0.0
    gt_mse = float(((result - after.image.astype(np.float32)) ** 2).mean())
    return CaseScores(float(np.mean(distances)), found, psnr(outside_mse), outside_mae, psnr(gt_mse),
                      float(np.mean(ious)))


def psnr(mse: float) -> float:
    """PSNR in dB of a mean squared error in 0-255 units (capped at 99 for a perfect match)."""
    return 99.0 if mse <= 1e-10 else float(min(99.0, 10 * math.log10(255.0 ** 2 / mse)))


def moved_footprints(case: DragCase, before: RenderedScene, after: RenderedScene,
                     margin: int = FOOTPRINT_MARGIN) -> np.ndarray:
    """Every moved object's footprint before and after the move, dilated by ``margin`` pixels."""
    union = np.zeros(before.image.shape[:2], bool)
    for index in case.moved:
        union |= before.footprint(index) | after.footprint(index)
    return binary_dilation(union, iterations=margin)


def locate(result: np.ndarray, source: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The (dx, dy) shift that best places ``source``'s pixels under ``mask`` onto ``result``.

    Masked sum of squared differences over every shift that keeps the template's bounding box inside the image,
    computed with FFT correlations; the minimum is refined to sub-pixel precision with a parabola on each axis.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0.0, 0.0)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    weight = mask[top:bottom, left:right].astype(np.float32)
    template = source[top:bottom, left:right] * weight[..., None]
    # SSD(s) = sum w R^2 - 2 sum w T R + sum w T^2; the last term does not depend on the shift.
    squares = fftconvolve((result ** 2).sum(-1), weight[::-1, ::-1], mode="valid")
    cross = sum(fftconvolve(result[..., c], template[::-1, ::-1, c], mode="valid") for c in range(3))
    ssd = squares - 2 * cross
    row, column = np.unravel_index(int(np.argmin(ssd)), ssd.shape)
    dy = row + _parabola(ssd[:, column], row) - top
    dx = column + _parabola(ssd[row, :], column) - left
    return (float(dx), float(dy))


def _parabola(values: np.ndarray, i: int) -> float:
    if i == 0 or i == len(values) - 1:
        return 0.0
    a, b, c = values[i - 1], values[i], values[i + 1]
    curvature = a - 2 * b + c
    return float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5)) if curvature > 0 else 0.0


def footprint_iou(case: DragCase, index: int, result: np.ndarray, after: RenderedScene) -> float:
    """IoU of object ``index``'s footprint at its target (ground truth) and where the result looks like it.

    Near the target (the ground-truth footprint dilated by half the object's size), a result pixel belongs to the
    object when it is within :data:`COLOUR_TOLERANCE` of one of the object's colours and nearer that colour than
    the ground-truth scene *without* the object at that pixel (what would show if the object were absent).
    """
    truth = after.footprint(index)
    obj = case.ground_truth().objects[index]
    near = binary_dilation(truth, iterations=max(2, int(obj.size / 2)))
    behind = case.ground_truth().without(index).render().image.astype(np.float32)
    palette = np.asarray([fill for _, _, fill in obj.parts()], np.float32)
    to_object = np.linalg.norm(result[..., None, :] - palette[None, None], axis=-1).min(-1)
    to_background = np.linalg.norm(result - behind, axis=-1)
    looks_like = near & (to_object < COLOUR_TOLERANCE) & (to_object < to_background)
    union = (looks_like | truth).sum()
    return float((looks_like & truth).sum() / union) if union else 0.0
