"""Pieces shared by the drag optimisers: input checks, feature sampling, patches, point tracking,
motion supervision, the mask term, the latent optimiser (with loss scaling for float16 networks) and the result.

Coordinates are (x, y) in feature-map pixels, pixel centres at integers (x in [0, W-1]).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError

#: A handle counts as arrived when it is this close (feature pixels) to its target (DragDiffusion, FreeDrag).
REACHED_DISTANCE = 2.0

FeatureFn = Callable[[torch.Tensor], object]


@dataclass
class DragResult:
    """What :func:`adaptivedrag_core.drag.drag` returns.

    Args:
        latent: the optimised latent, detached, same shape and dtype as the input.
        handles: final handle positions, (x, y) feature-map pixels. For point-tracking methods the tracked
            positions; for FreeDrag the last position the template was dragged to.
        steps: optimisation (Adam) steps taken.
        converged: every handle ended within ``REACHED_DISTANCE`` of its target.
        method: the method that ran.
        handle_history: [S, N, 2] handle positions after every tracking / line-search step, starting with
            the input handles.
        info: method-specific diagnostics (e.g. FreeDrag's backtracking case counts, AdaptiveDrag's final budget).
    """

    latent: torch.Tensor
    handles: list
    steps: int
    converged: bool
    method: str
    handle_history: torch.Tensor
    info: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- options


def parse_options(options_class, given: dict, method: str):
    """Build ``options_class`` from keyword options, naming the valid ones when a name is unknown."""
    valid = sorted(f.name for f in dataclasses.fields(options_class))
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
                         f"valid options: {', '.join(valid)}")
    return options_class(**given)


def require_positive(**values) -> None:
    """Raise InputError unless every given option value is a finite number > 0."""
    for name, value in values.items():
        if not is_finite_number(value) or not value > 0:
            raise InputError(f"option {name} must be a positive number (finite), got {value!r}")


def require_whole(**values) -> None:
    """Raise InputError unless every given option value is an int (step counts, radii)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"option {name} must be a whole number, got {value!r}")


def require_non_negative(**values) -> None:
    """Raise InputError unless every given option value is a finite number >= 0."""
    for name, value in values.items():
        if not is_finite_number(value) or not value >= 0:
            raise InputError(f"option {name} must be a finite number >= 0, got {value!r}")


def is_finite_number(value) -> bool:
    """A real number (not a bool), neither infinite nor NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------------------------- problem


@dataclass
class DragProblem:
    """Validated inputs plus what every method needs from the starting latent.

    Args:
        latent: starting latent, float32 copy [1,C,h,w].
        dtype: dtype of the caller's latent (feature_fn is called in it, the result is returned in it).
        compute_dtype: the dtype feature_fn's network computes in (float16 turns on loss scaling).
        feature_fn: the caller's feature function.
        handles, targets: [N,2] float32 (x, y) feature-map pixels.
        mask: None or [H,W] bool, True = may change.
        regions: None or [H,W] int64 labels.
        features0: features of the starting latent [1,D,H,W] float32.
        prediction0: the mask-term quantity at the starting latent (prediction, or the latent itself).
    """

    latent: torch.Tensor
    dtype: torch.dtype
    compute_dtype: torch.dtype
    feature_fn: FeatureFn
    handles: torch.Tensor
    targets: torch.Tensor
    mask: Optional[torch.Tensor]
    regions: Optional[torch.Tensor]
    features0: torch.Tensor
    prediction0: torch.Tensor

    @property
    def feature_size(self) -> tuple[int, int]:
        """(H, W) of the feature map."""
        return self.features0.shape[-2], self.features0.shape[-1]

    def evaluate(self, latent: torch.Tensor, features_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (float32) and mask-term quantity (prediction, or the latent) at ``latent``.

        With ``features_only`` (an evaluation no optimisation step follows) it runs without autograd and through
        the feature function's ``features_only`` when it has one (the UNet then stops after the feature block);
        the second value is then the latent.
        """
        if not features_only:
            return split_features(self.feature_fn(latent.to(self.dtype)), latent)
        only = getattr(self.feature_fn, "features_only", None)
        with torch.no_grad():
            output = (only or self.feature_fn)(latent.to(self.dtype))
        features = split_features(output, latent)[0]
        return features, latent


@dataclass
class DragStart:
    """The feature function's output at the starting latent, which the whole drag compares against.

    A caller that drags the same latent again (another pair of points) can keep it and pass it to
    :func:`adaptivedrag_core.drag.drag` instead of paying for the feature function once more.

    Args:
        features: features of the starting latent [1,D,H,W], float32.
        prediction: the mask-term quantity at the starting latent (the prediction, or the latent itself), float32.
    """

    features: torch.Tensor
    prediction: torch.Tensor


def drag_start(latent: torch.Tensor, feature_fn: FeatureFn) -> DragStart:
    """The starting features and prediction of ``latent``: one feature_fn call, without autograd."""
    start = latent.detach().clone().float()
    with torch.no_grad():
        features, prediction = split_features(feature_fn(start.to(latent.dtype)), start)
    return DragStart(features.detach(), prediction.detach())


def split_features(output, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise a feature_fn output to (features, prediction); prediction defaults to the latent."""
    if isinstance(output, (tuple, list)):
        if len(output) != 2:
            raise InputError("feature_fn must return features or a (features, prediction) pair")
        features, prediction = output
    else:
        features, prediction = output, latent
    if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[0] != 1:
        raise InputError(f"feature_fn must return features of shape [1,D,H,W], got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)}")
    if not isinstance(prediction, torch.Tensor) or prediction.shape != latent.shape:
        raise InputError(f"feature_fn's prediction must have the latent's shape {tuple(latent.shape)}, got "
                         f"{tuple(prediction.shape) if isinstance(prediction, torch.Tensor) else type(prediction)}")
    return features.float(), prediction.float()


def _points_tensor(points, name: str, device) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(points, dtype=torch.float32, device=device)
    except (TypeError, ValueError) as error:
        raise InputError(f"{name} must be a sequence of (x, y) pairs: {error}") from None
    if tensor.numel() == 0:
        return tensor.reshape(0, 2)
    if tensor.dim() != 2 or tensor.shape[1] != 2:
        raise InputError(f"{name} must be a sequence of (x, y) pairs, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name} contain a non-finite coordinate")
    return tensor


def _check_inside(points: torch.Tensor, name: str, height: int, width: int) -> None:
    outside = (points[:, 0] < 0) | (points[:, 0] > width - 1) | (points[:, 1] < 0) | (points[:, 1] > height - 1)
    if outside.any():
        index = int(outside.nonzero()[0])
        x, y = points[index].tolist()
        raise InputError(f"{name[:-1]} {index} at ({x:g}, {y:g}) is outside the {width}x{height} feature map "
                         f"(x must be in [0, {width - 1}], y in [0, {height - 1}])")


def _map_tensor(value, name: str, size: tuple[int, int], dtype, device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    tensor = torch.as_tensor(value, device=device)
    if tuple(tensor.shape) != size:
        raise InputError(f"{name} must have the feature map's shape [H,W] = {list(size)}, got {list(tensor.shape)}")
    return tensor.to(dtype)


def prepare_problem(latent, feature_fn: FeatureFn, handles, targets, mask=None, regions=None,
                    compute_dtype: Optional[torch.dtype] = None, start: Optional[DragStart] = None) -> DragProblem:
    """Check the inputs of :func:`drag` and compute the starting features (one feature_fn call), unless ``start``
    gives them (:func:`drag_start`).

    An empty mask is dropped (:func:`usable_mask`); ``compute_dtype`` defaults to the latent's dtype."""
    if not isinstance(latent, torch.Tensor) or latent.dim() != 4 or latent.shape[0] != 1:
        raise InputError(f"latent must be a tensor of shape [1,C,h,w], got "
                         f"{tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__}")
    if not callable(feature_fn):
        raise InputError("feature_fn must be callable")
    handle_points = _points_tensor(handles, "handles", latent.device)
    target_points = _points_tensor(targets, "targets", latent.device)
    if len(handle_points) != len(target_points):
        raise InputError(f"got {len(handle_points)} handles but {len(target_points)} targets; they must pair up")
    if len(handle_points) == 0:
        raise InputError("at least one handle/target pair is needed")
    if start is None:
        start = drag_start(latent, feature_fn)
    elif not isinstance(start, DragStart):
        raise InputError(f"start must be a DragStart, got {type(start).__name__}")
    features0, prediction0 = split_features((start.features, start.prediction), latent.detach().float())
    size = (features0.shape[-2], features0.shape[-1])
    _check_inside(handle_points, "handles", *size)
    _check_inside(target_points, "targets", *size)
    return DragProblem(
        latent=latent.detach().clone().float(),
        dtype=latent.dtype,
        compute_dtype=compute_dtype or latent.dtype,
        feature_fn=feature_fn,
        handles=handle_points,
        targets=target_points,
        mask=usable_mask(_map_tensor(mask, "mask", size, torch.bool, latent.device)),
        regions=_map_tensor(regions, "regions", size, torch.int64, latent.device),
        features0=features0.detach(),
        prediction0=prediction0.detach(),
    )


# ----------------------------------------------------------------------------------------------- sampling


def sample_features(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``features`` [1,D,H,W] at float (x, y) ``points`` [..., 2]; returns [..., D].

    Points outside the map take the nearest border value.
    """
    height, width = features.shape[-2:]
    # Scaled by Python numbers: a tensor made from them would be a copy to the device, and a wait, at every call.
    scaled = torch.stack([points[..., 0] * (2.0 / max(width - 1, 1)), points[..., 1] * (2.0 / max(height - 1, 1))],
                         dim=-1)
    grid = (scaled.reshape(1, 1, -1, 2) - 1.0).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return sampled[0, :, 0].transpose(0, 1).reshape(*points.shape[:-1], features.shape[1])


def window_offsets(radius: int, device=None) -> torch.Tensor:
    """Integer (dx, dy) offsets [K,2] of the square window of half-size ``radius``, row-major."""
    steps = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([dx.flatten(), dy.flatten()], dim=1)


def unit_directions(origins: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Unit vectors origin -> target [N,2] (zero where they coincide)."""
    delta = targets - origins
    return delta / delta.norm(dim=1, keepdim=True).clamp_min(1e-8)


def resize_nearest(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a [H,W] bool mask to ``size`` with nearest sampling, pixel-centre aligned (the rule of
    ``images.resize_labels``, which maps every mask and label map of the pipeline)."""
    resized = F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[0, 0] > 0.5


class EmptyMaskWarning(UserWarning):
    """A mask that lets nothing change was given; it is ignored (treated as no mask)."""


EMPTY_MASK_MESSAGE = ("the mask is empty (it lets nothing change) on the grid where it is used, so it is ignored "
                      "there, as if no mask were given, as the public DragDiffusion and AdaptiveDrag codes do")


def usable_mask(mask):
    """``mask`` (array or tensor, True = may change), or None when it is None or has no True element; an empty
    mask would freeze everything, so it counts as no mask, with an :class:`EmptyMaskWarning`. Every stage that
    takes a mask (drag, CLoss, the pipeline) applies this one rule."""
    if mask is None or bool(mask.any()):
        return mask
    warnings.warn(EMPTY_MASK_MESSAGE, EmptyMaskWarning, stacklevel=2)
    return None


# ----------------------------------------------------------------------------------------------- patches


class PatchGeometry:
    """Which positions of the square windows around the handles take part in motion supervision and tracking.

    A position belongs to the patch of handle i when it lies inside the feature map, inside the square of
    handle i's radius and, when ``regions`` is given, inside the semantic region of the handle (AdaptiveDrag).

    The semantic region is the superpixel that contains the handle's ORIGINAL position, carried along with the
    handle: a position q counts when ``regions[q - (h - p0)]`` equals the label at p0. At the first step that is
    exactly "the superpixel containing the point". It has to move with the handle because ``regions`` describes
    the un-dragged image: evaluated in place, a handle could never leave its own superpixel, and the target
    normally lies in another one.

    Fallback (the public code's): when the part of the carried region that lies ahead of the handle, in the
    half-plane facing its target, is smaller than a quarter of the average superpixel (H W / (4 n_labels), the
    public code's H W / (4 n_segments)), the patch is instead the half-disc of the patch's radius facing the
    target. Without it a handle on the target-facing edge of its superpixel could only be tracked backwards or
    sideways, and the direction check would reject every move.

    Args:
        start: original handle positions [N,2].
        motion_radii, tracking_radii: per-handle r_m and r_p [N] (ints).
        feature_size: (H, W).
        regions: None or [H,W] int64 labels.
        targets: target positions [N,2]; needed with ``regions`` (the fallback faces them).
    """

    def __init__(self, start: torch.Tensor, motion_radii: torch.Tensor, tracking_radii: torch.Tensor,
                 feature_size: tuple[int, int], regions: Optional[torch.Tensor] = None,
                 targets: Optional[torch.Tensor] = None):
        self.start = start.round()
        self.motion_radii = motion_radii
        self.tracking_radii = tracking_radii
        self.size = feature_size
        self.regions = regions
        self.targets = targets
        self.motion_offsets = window_offsets(int(motion_radii.max()), start.device)
        self.tracking_offsets = window_offsets(int(tracking_radii.max()), start.device)
        if regions is not None:
            self.labels = regions[self.start[:, 1].long(), self.start[:, 0].long()]
            self.own_region = regions[None] == self.labels[:, None, None]  # [N,H,W]
            self.min_forward_area = regions.numel() / (4 * len(torch.unique(regions)))
            height, width = feature_size
            ys, xs = torch.meshgrid(torch.arange(height, device=start.device, dtype=torch.float32),
                                    torch.arange(width, device=start.device, dtype=torch.float32), indexing="ij")
            self.grid = torch.stack([xs, ys], dim=-1)  # [H,W,2] (x, y)

    def positions(self, centres: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Integer window positions [N,K,2] around the rounded ``centres``."""
        return centres.round()[:, None, :] + offsets[None]

    def weights(self, centres: torch.Tensor, offsets: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """[N,K] bool: which window positions around ``centres`` belong to each handle's patch."""
        positions = self.positions(centres, offsets)
        height, width = self.size
        inside = _inside(positions, height, width)
        keep = inside & (offsets.abs().amax(dim=1)[None, :] <= radii[:, None])
        if self.regions is None:
            return keep
        # Carry the region along with the handle (see the class docstring).
        shift = centres.round() - self.start
        source = positions - shift[:, None, :]
        source_inside = _inside(source, height, width)
        source = source.long()
        xs = source[..., 0].clamp(0, width - 1)
        ys = source[..., 1].clamp(0, height - 1)
        semantic = keep & source_inside & (self.regions[ys, xs] == self.labels[:, None])
        ahead = unit_directions(centres.round(), self.targets)
        facing = (offsets[None] * ahead[:, None, :]).sum(dim=-1) >= 0
        half_disc = keep & facing & (offsets.norm(dim=1)[None, :] <= radii[:, None])
        fallback = self.forward_area(shift, ahead) < self.min_forward_area
        return torch.where(fallback[:, None], half_disc, semantic)

    def forward_area(self, shift: torch.Tensor, ahead: torch.Tensor) -> torch.Tensor:
        """[N]: positions of each carried region (shifted by ``shift``, inside the map) strictly ahead of the
        handle, in the half-plane facing the unit direction ``ahead``."""
        from_start = self.grid[None] - self.start[:, None, None, :]  # s - p0 = q - h for the carried q
        in_front = (from_start * ahead[:, None, None, :]).sum(dim=-1) > 0
        carried_inside = _inside(self.grid[None] + shift[:, None, None, :], *self.size)
        return (self.own_region & in_front & carried_inside).sum(dim=(1, 2))

    def motion_weights(self, centres: torch.Tensor) -> torch.Tensor:
        return self.weights(centres, self.motion_offsets, self.motion_radii)

    def tracking_weights(self, centres: torch.Tensor) -> torch.Tensor:
        return self.weights(centres, self.tracking_offsets, self.tracking_radii)


def _inside(positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return ((positions[..., 0] >= 0) & (positions[..., 0] <= width - 1)
            & (positions[..., 1] >= 0) & (positions[..., 1] <= height - 1))


# ----------------------------------------------------------------------------------------------- losses


def motion_supervision_loss(features: torch.Tensor, handles: torch.Tensor, targets: torch.Tensor,
                            geometry: PatchGeometry, active: torch.Tensor) -> torch.Tensor:
    """DragDiffusion's motion supervision: sum_i sum_{q in patch_i} mean_c |F(q + d_i) - sg(F(q))|.

    The patch sits on the rounded handle; ``q + d_i`` (d_i the unit direction to the target) is sampled
    bilinearly. Handles with ``active`` False (already arrived) contribute nothing. As in DragDiffusion the
    L1 distance is averaged over channels and summed over patch positions.
    """
    centres = handles.round()
    positions = geometry.positions(centres, geometry.motion_offsets)
    shifted = positions + unit_directions(centres, targets)[:, None, :]
    source = sample_features(features, positions).detach()
    moved = sample_features(features, shifted)
    per_position = (moved - source).abs().mean(dim=-1)
    weights = geometry.motion_weights(centres) & active[:, None]
    return (per_position * weights).sum()


def track_points(features: torch.Tensor, reference: torch.Tensor, handles: torch.Tensor,
                 geometry: PatchGeometry) -> torch.Tensor:
    """Point tracking: in each handle's window, the position whose feature is L1-nearest to ``reference``.

    Args:
        features: current features [1,D,H,W].
        reference: original features at the original handles [N,D].
        handles: current handles [N,2].
        geometry: window and region rules.
    Returns:
        new handles [N,2] (integer-valued). Ties go to the first position in row-major order.
    """
    with torch.no_grad():
        centres = handles.round()
        positions = geometry.positions(centres, geometry.tracking_offsets)
        height, width = geometry.size
        xs = positions[..., 0].long().clamp(0, width - 1)
        ys = positions[..., 1].long().clamp(0, height - 1)
        candidates = features[0][:, ys, xs].permute(1, 2, 0)  # [N,K,D]
        distance = (candidates - reference[:, None, :]).abs().sum(dim=-1)
        distance = distance.masked_fill(~geometry.tracking_weights(centres), float("inf"))
        best = distance.argmin(dim=1)
        return positions[torch.arange(len(handles), device=handles.device), best]


class MaskPenalty:
    """The mask term |(pred(z) - pred(z_orig)) * (1 - M)|_1, with M resized (nearest) to the prediction's grid.

    Args:
        mask: None (no term) or [H,W] bool, True = may change.
        prediction0: the prediction at the starting latent [1,C,h,w].
    """

    def __init__(self, mask: Optional[torch.Tensor], prediction0: torch.Tensor):
        self.prediction0 = prediction0
        keep = None if mask is None else (~resize_nearest(mask, prediction0.shape[-2:])).float()
        # Counted once here, not read back at every step; a mask that lets everything change has no term.
        self.keep_count = 0 if keep is None else int(keep.sum())
        self.keep = keep if self.keep_count else None

    def sum(self, prediction: torch.Tensor) -> torch.Tensor:
        """Summed over elements (DragDiffusion)."""
        if self.keep is None:
            return prediction.new_zeros(())
        return ((prediction - self.prediction0).abs() * self.keep).sum()

    def mean(self, prediction: torch.Tensor) -> torch.Tensor:
        """Averaged over the elements that must stay (FreeDrag's per-element scale)."""
        if self.keep is None:
            return prediction.new_zeros(())
        channels = prediction.shape[1]
        return ((prediction - self.prediction0).abs() * self.keep).sum() / (self.keep_count * channels)


# ----------------------------------------------------------------------------------------------- optimiser


class LossScaler:
    """Dynamic loss scaling for backward passes through a float16 network, as ``torch.amp.GradScaler`` does.

    In float16, gradients below 6e-5 lose precision and those below 6e-8 become zero; a full-size UNet's gradients
    are that small. The loss is multiplied by ``scale`` (a power of two, so the float32 gradient divided by it
    again is exact) before the backward pass. When the scaled gradient overflows (inf or nan), the scale halves
    and the backward pass is repeated on the same graph, so no step is lost; after ``GROWTH_INTERVAL`` steps
    without overflow it doubles. The graph is therefore kept after the backward pass: callers drop their
    references to the loss and its inputs before the next forward pass, or both graphs would be alive at once.
    For float32 and bfloat16 networks it does nothing (scale 1, no retries, no read-back of values).

    Args:
        compute_dtype: the dtype the network computes in.
    """

    INITIAL_SCALE = 2.0 ** 16
    GROWTH_INTERVAL = 100

    def __init__(self, compute_dtype: torch.dtype):
        self.enabled = compute_dtype == torch.float16
        self.scale = self.INITIAL_SCALE if self.enabled else 1.0
        self.steps_since_overflow = 0

    def gradient(self, loss: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """d loss / d ``tensor`` (a float32 leaf), unscaled. Only ``tensor``'s gradient is computed: nothing
        accumulates in the network's parameters."""
        if not self.enabled:
            return torch.autograd.grad(loss, tensor)[0]
        while True:
            (scaled,) = torch.autograd.grad(loss * self.scale, tensor, retain_graph=True)
            gradient = scaled / self.scale
            if self.scale <= 1.0 or _all_finite(gradient):
                break
            self.scale /= 2
            self.steps_since_overflow = 0
        self.steps_since_overflow += 1
        if self.steps_since_overflow >= self.GROWTH_INTERVAL:
            self.scale *= 2
            self.steps_since_overflow = 0
        return gradient


def _all_finite(tensor: torch.Tensor) -> bool:
    finite = torch.isfinite(tensor).all()  # computed on meta too, so bench estimate counts the check's kernels
    # A meta tensor (bench estimate) has no values to read back.
    return tensor.device.type == "meta" or bool(finite)


class LatentAdam:
    """Adam on a float32 copy of the latent (DragDiffusion: lr 0.01).

    Args:
        latent: the starting latent (copied).
        lr: learning rate.
        compute_dtype: the dtype the network behind the loss computes in; float16 turns on :class:`LossScaler`.
        region: None, or a bool tensor broadcastable to the latent: elements outside get a zero gradient, which
            Adam turns into no update at all, so they stay bitwise unchanged.
    """

    def __init__(self, latent: torch.Tensor, lr: float, compute_dtype: torch.dtype = torch.float32,
                 region: Optional[torch.Tensor] = None):
        self.latent = latent.detach().clone().float().requires_grad_(True)
        self.optimizer = torch.optim.Adam([self.latent], lr=lr)
        self.scaler = LossScaler(compute_dtype)
        self.region = region

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Set and return the latent's gradient of ``loss`` (float32, unscaled, zero outside the region)."""
        gradient = self.scaler.gradient(loss, self.latent)
        if self.region is not None:
            gradient = torch.where(self.region, gradient, torch.zeros_like(gradient))
        self.latent.grad = gradient
        return gradient

    def step(self, loss: torch.Tensor) -> None:
        self.backward(loss)
        self.optimizer.step()


def arrived(handles: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[N] bool: handle within ``REACHED_DISTANCE`` of its target."""
    return (handles - targets).norm(dim=1) <= REACHED_DISTANCE


def make_result(problem: DragProblem, optimizer: LatentAdam, handles: torch.Tensor, steps: int, method: str,
                history: list, converged: Optional[bool] = None, **info) -> DragResult:
    """Assemble a :class:`DragResult` (``converged`` defaults to "every handle arrived")."""
    if converged is None:
        converged = bool(arrived(handles, problem.targets).all())
    return DragResult(
        latent=optimizer.latent.detach().to(problem.dtype).clone(),
        handles=[(float(x), float(y)) for x, y in handles.tolist()],
        steps=steps,
        converged=converged,
        method=method,
        handle_history=torch.stack(history).cpu(),
        info=info,
    )
