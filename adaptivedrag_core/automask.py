"""AdaptiveDrag's automatic mask (paper section 3.3): superpixels in an encoder's feature space, then the
superpixels along each drag.

Variant ``"features"`` (the paper's, default):

1. the encoder maps the image to a feature map [C, h, w] (SAM2: the image-encoder embedding, 256 x 64 x 64);
2. the channels are reduced by PCA to at most :data:`PCA_COMPONENTS` and scaled to unit total variance. SLIC's
   cost grows with the channel count, and the unit scale gives ``compactness`` the same meaning for any encoder
   (the top components of SAM2's embedding carry most of its variance);
3. the reduced map is resized (bilinear, pixel-centre aligned) to the SLIC grid: the image's aspect ratio, longer
   side ``min(grid_size, image side)``. SAM2 squashes the image to a square, so this also undoes the squash;
4. SLIC runs on that grid (compactness in the features' own units, see :func:`superpixels`; fragments below a
   quarter of the average superpixel are merged, not skimage's half, so thin object parts survive) and its
   labels are mapped to image resolution with ``images.resize_labels``;
5. the mask is the union of the superpixels that each handle -> target segment passes through, sampled every
   half pixel. That holds the superpixel of every handle (the paper's initial area), the paper's extension
   "along the line connecting each handle and target point", and the target's superpixel, so the whole segment
   may change. It is a union of whole superpixels, so its edges are the object's edges.

Variant ``"sam_masks"`` (the public code's): SLIC (200 segments, compactness 10 in Lab units, as skimage does
by default for colour images) runs on a colour rendering of SAM2's automatic masks (each mask a random colour,
small masks painted over large ones, white where no mask). For each pair, the smallest SAM mask that holds the handle is cut to the
half plane facing the target (kept whole if the cut keeps half of it or more, as the public code does). Unlike
the public code, the superpixels along the segment are added, so the target is always in the mask.

Without an encoder the feature space is the image's CIE Lab colour at grid resolution; position enters through
SLIC's spatial term, so this is classic colour SLIC. The paper (Fig. 3b) shows such superpixels are chaotic,
hence the warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError
from .images import resize_labels
from .points import DragPoints
from .preview import draw_arrows
from .progress import ProgressFn, report

VARIANTS = ("features", "sam_masks")
DEFAULT_N_SEGMENTS = 200
# Compactness for unit-variance features: the spatial term reaches 0.5 at one grid step between superpixel
# centres, while unrelated regions differ by about 1.4 (sqrt 2) in feature distance, so feature edges win yet
# superpixels stay fairly regular (0.3 gives ragged ones in Lab, 1.0 nearly square ones).
DEFAULT_FEATURE_COMPACTNESS = 0.5
# The public code's SLIC setting on its rendering of SAM's masks (Lab units).
DEFAULT_SAM_MASKS_COMPACTNESS = 10.0
DEFAULT_COMPACTNESS = {"features": DEFAULT_FEATURE_COMPACTNESS, "sam_masks": DEFAULT_SAM_MASKS_COMPACTNESS}
PCA_COMPONENTS = 16
# SLIC's connectivity step merges fragments smaller than this fraction of the average superpixel into a
# neighbour, whatever its features; skimage's 0.5 merges thin parts of objects across their edges.
MIN_SUPERPIXEL_FRACTION = 0.25
DEFAULT_GRID_SIZE = 256
# Above this fraction of the image the mask no longer protects anything; the user is told.
MASK_COVERAGE_WARNING = 0.8
RENDERING_SEED = 0

FALLBACK_WARNING = (
    "auto mask without SAM2: superpixels in Lab colour space follow colour, not objects, and are poor "
    "(AdaptiveDrag paper, Fig. 3b); give a SAM2 checkpoint for the paper's method"
)


class AutoMaskWarning(UserWarning):
    """The auto mask was made, but is likely poor (no encoder, or it covers almost the whole image)."""


class FeatureEncoder(Protocol):
    """Anything that maps an RGB uint8 [H, W, 3] image to a feature map [C, h, w] can stand in for SAM2."""

    def features(self, image: np.ndarray) -> torch.Tensor: ...


@dataclass
class AutoMaskResult:
    """What :func:`auto_mask` made, at image resolution.

    Args:
        mask: bool [H, W], True = may change.
        regions: int32 [H, W] superpixel labels 0..n-1 (the regions the adaptive optimiser uses).
        variant: "features" or "sam_masks".
        warnings: messages about the result's quality, also issued as :class:`AutoMaskWarning`.
        timings: seconds spent in "features" (encoder, or SAM2's automatic masks) and in "slic".
    """

    mask: np.ndarray
    regions: np.ndarray
    variant: str
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def coverage(self) -> float:
        """Fraction of the image inside the mask."""
        return float(self.mask.mean())


def auto_mask(
    image,
    points: DragPoints,
    encoder: Optional[FeatureEncoder] = None,
    variant: str = "features",
    n_segments: int = DEFAULT_N_SEGMENTS,
    compactness: Optional[float] = None,
    grid_size: int = DEFAULT_GRID_SIZE,
    progress: ProgressFn = None,
) -> AutoMaskResult:
    """Make the drag mask and the superpixel regions of an image (see the module docstring).

    Args:
        image: PIL image (any mode) or RGB uint8 array [H, W, 3].
        points: the drag pairs, placed on this image (same size).
        encoder: an object with ``features(image) -> [C, h, w]``, e.g. a ``Sam2Encoder``; None uses Lab colour
            and warns. The "sam_masks" variant needs ``automatic_masks(image)`` too (``Sam2Encoder`` has it).
        variant: "features" (paper) or "sam_masks" (public code).
        n_segments: SLIC's target number of superpixels.
        compactness: SLIC's balance of position against features; None takes the variant's default
            (:data:`DEFAULT_FEATURE_COMPACTNESS` or :data:`DEFAULT_SAM_MASKS_COMPACTNESS`).
        grid_size: longer side of the grid SLIC runs on (capped at the image's).
        progress: ``progress(step, total)`` after each of the three stages.

    Raises:
        InputError: unknown variant, bad numbers, points placed on an image of another size, or "sam_masks"
            without a SAM2 encoder.
    """
    pixels = as_rgb_array(image)
    height, width = pixels.shape[:2]
    points.check_image_size(width, height)
    _check_options(variant, n_segments, compactness, grid_size, encoder)
    grid_hw = slic_grid_size(width, height, grid_size)
    messages: list[str] = []
    timings: dict[str, float] = {}

    start = time.perf_counter()
    if variant == "features":
        if encoder is None:
            messages.append(FALLBACK_WARNING)
        feature_map = lab_features(pixels, grid_hw) if encoder is None else encoder.features(pixels)
        grid_features = features_on_grid(feature_map, grid_hw)
    else:
        sam_masks = sorted(encoder.automatic_masks(pixels), key=lambda m: int(m.sum()), reverse=True)
        # Lab of the rendering, unreduced: the public code's compactness is in Lab units.
        grid_features = lab_features(render_masks(sam_masks, height, width), grid_hw).permute(1, 2, 0).numpy()
    timings["features"] = time.perf_counter() - start
    report(progress, 1, 3)

    start = time.perf_counter()
    compactness = DEFAULT_COMPACTNESS[variant] if compactness is None else compactness
    regions = resize_labels(superpixels(grid_features, n_segments, compactness), width, height)
    timings["slic"] = time.perf_counter() - start
    report(progress, 2, 3)

    mask = segment_mask(regions, points)
    if variant == "sam_masks":
        mask |= sam_handle_mask(sam_masks, points)
    messages.extend(_coverage_warnings(mask))
    for message in messages:
        warnings.warn(message, AutoMaskWarning, stacklevel=2)
    report(progress, 3, 3)
    return AutoMaskResult(mask, regions, variant, messages, timings)


def _check_options(variant, n_segments, compactness, grid_size, encoder) -> None:
    if variant not in VARIANTS:
        raise InputError(f"unknown auto-mask variant {variant!r}: use one of {', '.join(VARIANTS)}")
    if not (isinstance(n_segments, (int, np.integer)) and n_segments >= 1):
        raise InputError(f"number of superpixels must be a positive integer, got {n_segments!r}")
    if compactness is not None and not (np.isfinite(compactness) and compactness > 0):
        raise InputError(f"compactness must be a positive number, got {compactness!r}")
    if grid_size < 8:
        raise InputError(f"SLIC grid size must be at least 8, got {grid_size}")
    if variant == "sam_masks" and not hasattr(encoder, "automatic_masks"):
        raise InputError("the sam_masks auto-mask variant needs a SAM2 checkpoint (its automatic masks)")


def as_rgb_array(image) -> np.ndarray:
    """An RGB uint8 [H, W, 3] array from a PIL image (any mode) or an RGB uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise InputError(f"image must be a PIL image or an RGB uint8 array [H, W, 3], got {array.dtype} {array.shape}")
    return array


def slic_grid_size(width: int, height: int, grid_size: int) -> tuple[int, int]:
    """(height, width) of the SLIC grid: the image's aspect ratio, longer side ``min(grid_size, image side)``."""
    scale = min(1.0, grid_size / max(width, height))
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def lab_features(pixels: np.ndarray, grid_hw: tuple[int, int]) -> torch.Tensor:
    """CIE Lab colour of an RGB uint8 image resized to ``grid_hw``, as a feature map [3, h, w]."""
    from skimage.color import rgb2lab

    resized = Image.fromarray(pixels).resize((grid_hw[1], grid_hw[0]), Image.BILINEAR)
    return torch.from_numpy(rgb2lab(np.asarray(resized)).astype(np.float32)).permute(2, 0, 1)


def reduce_channels(feature_map: torch.Tensor, n_components: int = PCA_COMPONENTS) -> torch.Tensor:
    """PCA of a feature map [C, h, w] down to at most ``n_components`` channels, scaled to unit total variance."""
    channels, height, width = feature_map.shape
    samples = feature_map.reshape(channels, -1).T.double()
    samples = samples - samples.mean(dim=0, keepdim=True)
    _, singular_values, basis = torch.linalg.svd(samples, full_matrices=False)
    keep = min(n_components, basis.shape[0])
    reduced = samples @ basis[:keep].T
    # Total variance of the kept components; a constant map stays all zeros.
    scale = torch.sqrt((singular_values[:keep] ** 2).sum() / samples.shape[0]).clamp_min(1e-12)
    return (reduced / scale).T.reshape(keep, height, width).float()


def features_on_grid(feature_map: torch.Tensor, grid_hw: tuple[int, int]) -> np.ndarray:
    """Reduce a feature map [C, h, w] (:func:`reduce_channels`) and resize it to the SLIC grid: [gh, gw, k]."""
    feature_map = torch.as_tensor(feature_map).detach().float().cpu()
    if feature_map.ndim != 3:
        raise InputError(f"encoder features must be [C, h, w], got shape {tuple(feature_map.shape)}")
    reduced = reduce_channels(feature_map)
    if tuple(reduced.shape[1:]) != tuple(grid_hw):
        downscaling = reduced.shape[1] > grid_hw[0] or reduced.shape[2] > grid_hw[1]
        reduced = F.interpolate(
            reduced[None], size=grid_hw, mode="bilinear", align_corners=False, antialias=downscaling
        )[0]
    return reduced.permute(1, 2, 0).contiguous().numpy()


def superpixels(features: np.ndarray, n_segments: int, compactness: float) -> np.ndarray:
    """SLIC superpixels of a feature grid [h, w, k]: connected int32 labels 0..n-1.

    Args:
        features: float features, channels last, used as they are (no colour conversion).
        n_segments: target number of superpixels.
        compactness: weight of position against feature distance, in the units of ``features``.
    """
    from skimage.segmentation import relabel_sequential, slic

    features = features.astype(np.float64)
    # skimage rescales the values to [0, 1] by their global range; scaling compactness the same way keeps it
    # in the features' own units.
    value_range = max(float(features.max() - features.min()), 1e-12)
    labels = slic(
        features,
        n_segments=n_segments,
        compactness=compactness / value_range,
        channel_axis=-1,
        convert2lab=False,
        enforce_connectivity=True,
        start_label=0,
        min_size_factor=MIN_SUPERPIXEL_FRACTION,
    )
    return relabel_sequential(labels)[0].astype(np.int32)


def segment_pixels(start: Sequence[float], end: Sequence[float]) -> np.ndarray:
    """(x, y) integer pixels that the segment ``start`` -> ``end`` passes through, sampled every half pixel."""
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    count = int(np.ceil(2 * np.linalg.norm(end - start))) + 1
    samples = start + np.linspace(0.0, 1.0, count)[:, None] * (end - start)
    return np.unique(np.rint(samples).astype(np.int64), axis=0)


def segment_mask(regions: np.ndarray, points: DragPoints) -> np.ndarray:
    """Union of the regions that the handle -> target segments pass through, bool [H, W]."""
    hit = [regions[pixels[:, 1], pixels[:, 0]] for pixels in map(segment_pixels, points.handles, points.targets)]
    return np.isin(regions, np.unique(np.concatenate(hit)))


def render_masks(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """RGB uint8 rendering of masks sorted from large to small: each a random colour, later masks on top,
    white where no mask lies (the public code's picture that SLIC runs on)."""
    rendering = np.full((height, width, 3), 255, dtype=np.uint8)
    colours = np.random.default_rng(RENDERING_SEED).integers(0, 256, size=(len(masks), 3), dtype=np.uint8)
    for mask, colour in zip(masks, colours):
        rendering[mask] = colour
    return rendering


def sam_handle_mask(masks: Sequence[np.ndarray], points: DragPoints) -> np.ndarray:
    """For each pair, the smallest mask holding the handle, cut to the half plane facing the target
    (whole if the cut keeps at least half of it); the union, bool [H, W]. ``masks`` sorted large to small."""
    height, width = points.height, points.width
    result = np.zeros((height, width), dtype=bool)
    rows, cols = np.mgrid[0:height, 0:width]
    for (hx, hy), (tx, ty) in zip(points.handles, points.targets):
        holding = [m for m in masks if m[int(round(hy)), int(round(hx))]]
        if not holding:
            continue
        chosen = holding[-1]
        facing = (cols - hx) * (tx - hx) + (rows - hy) * (ty - hy) >= 0
        cut = chosen & facing
        result |= chosen if cut.sum() >= 0.5 * chosen.sum() else cut
    return result


def _coverage_warnings(mask: np.ndarray) -> list[str]:
    coverage = float(mask.mean())
    if coverage < MASK_COVERAGE_WARNING:
        return []
    return [
        f"the auto mask covers {coverage:.0%} of the image, so almost nothing is protected from change; "
        "shorten the drags or use more superpixels"
    ]


# Overlay: the mask lightly tinted and outlined, the rest dimmed, superpixel borders faint, so the editable
# region reads at a glance and the picture stays visible.
MASK_TINT = (40, 220, 120)
MASK_TINT_ALPHA = 0.3
OUTSIDE_BRIGHTNESS = 0.45
BORDER_COLOUR = (255, 255, 255)
BORDER_ALPHA = 0.35


def render_overlay(image, result: AutoMaskResult, points: DragPoints) -> Image.Image:
    """A picture for a person: the mask tinted green with a green outline, the rest dimmed, faint one-pixel
    superpixel borders, numbered arrows (red handle, blue target). Same size as the image."""
    from skimage.segmentation import find_boundaries

    pixels = as_rgb_array(image).astype(np.float32)
    mask = result.mask[..., None]
    shown = np.where(mask, (1 - MASK_TINT_ALPHA) * pixels + MASK_TINT_ALPHA * np.array(MASK_TINT),
                     OUTSIDE_BRIGHTNESS * pixels)
    borders = find_boundaries(result.regions, mode="inner")
    shown[borders] = (1 - BORDER_ALPHA) * shown[borders] + BORDER_ALPHA * np.array(BORDER_COLOUR)
    shown[find_boundaries(result.mask, mode="thick")] = MASK_TINT
    return draw_arrows(Image.fromarray(shown.round().astype(np.uint8)), points)


def regions_image(regions: np.ndarray) -> Image.Image:
    """The label map as a 16-bit grayscale PNG-ready image (pixel value = label), lossless for reloading."""
    if regions.max(initial=0) > 65535 or regions.min(initial=0) < 0:
        raise InputError("region labels must be in 0..65535 to be saved as a 16-bit PNG")
    return Image.fromarray(regions.astype(np.uint16))
