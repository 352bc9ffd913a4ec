"""Latent optimisation for drag editing: one entry point, :func:`drag`, for DragDiffusion, FreeDrag and
AdaptiveDrag; the correspondence loss (CLoss) used while sampling is in :mod:`.closs`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import InputError
from ..progress import ProgressFn
from .adaptive import AdaptiveOptions, run_adaptive
from .closs import correspondence_loss
from .common import DragResult, DragStart, EmptyMaskWarning, FeatureFn, drag_start, parse_options, prepare_problem
from .dragdiffusion import DragDiffusionOptions, run_dragdiffusion
from .freedrag import FreeDragOptions, run_freedrag

#: method name -> (options dataclass, runner)
METHODS = {
    "dragdiffusion": (DragDiffusionOptions, run_dragdiffusion),
    "freedrag": (FreeDragOptions, run_freedrag),
    "adaptive": (AdaptiveOptions, run_adaptive),
}


def drag(
    latent: torch.Tensor,
    feature_fn: FeatureFn,
    handles: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    method: str = "adaptive",
    mask=None,
    regions=None,
    progress: ProgressFn = None,
    compute_dtype: Optional[torch.dtype] = None,
    start: Optional[DragStart] = None,
    **options,
) -> DragResult:
    """Optimise ``latent`` so the content at each handle moves to its target.

    Args:
        latent: [1,C,h,w] tensor to optimise; not modified. Adam runs on a float32 copy; feature_fn is called
            with the latent in the input's dtype.
        feature_fn: differentiable ``feature_fn(latent)`` returning features [1,D,H,W], or a pair
            ``(features, prediction)`` with a latent-shaped prediction (the pipeline's x_{t-1}). The mask term
            compares the prediction (else the latent) with its value at the starting latent outside the mask.
        handles, targets: sequences of (x, y) in feature-map pixels (floats allowed).
        method: "dragdiffusion", "freedrag" or "adaptive".
        mask: None or [H,W] bool (tensor or array), True = may change. None: no mask term. A mask with no True
            element is treated as None, with an ``EmptyMaskWarning`` (it would freeze everything).
        regions: None or [H,W] int superpixel labels; used by "adaptive" (semantic regions).
        progress: ``progress(step, total)`` after every optimisation step; an exception it raises (a cancel)
            propagates. For "adaptive" ``total`` may grow during the run.
        compute_dtype: the dtype feature_fn's network computes in (default: the latent's). float16 turns on
            dynamic loss scaling of the backward passes (:class:`.common.LossScaler`), as a float16 UNet needs.
        start: the starting features and prediction (:func:`drag_start` of the same latent and feature_fn), e.g.
            kept from an earlier drag of the same latent; None computes them (one feature_fn call).
        **options: the method's hyper-parameters, defaults from the papers: see :class:`DragDiffusionOptions`,
            :class:`FreeDragOptions`, :class:`AdaptiveOptions`.
    Returns:
        :class:`DragResult`.
    Raises:
        InputError (a ValueError): unknown method or option, bad option value, handles/targets of different
        lengths or outside the feature map, mask or regions of the wrong shape.

    Works inside ``torch.inference_mode()``: gradients are switched on here. Deterministic for given inputs
    (on GPU as far as the feature function and ``grid_sample``'s backward are).
    """
    if method not in METHODS:
        raise InputError(f"unknown drag method {method!r}; choose one of {', '.join(METHODS)}")
    options_class, run = METHODS[method]
    parsed = parse_options(options_class, options, method)
    with torch.inference_mode(False), torch.enable_grad():
        problem = prepare_problem(latent, feature_fn, handles, targets, mask, regions, compute_dtype, start)
        return run(problem, parsed, progress)


__all__ = [
    "AdaptiveOptions",
    "DragDiffusionOptions",
    "DragResult",
    "DragStart",
    "EmptyMaskWarning",
    "FreeDragOptions",
    "METHODS",
    "correspondence_loss",
    "drag",
    "drag_start",
]
