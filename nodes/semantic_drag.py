"""Semantic Drag: the latent optimisation (AdaptiveDrag, FreeDrag or DragDiffusion) at the inverted timestep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.pipeline import METHODS, EditSettings, drag_on_features, feature_grid_size
from adaptivedrag_core.points import DragPoints, map_point

from .bridge import bridged_model, fit_map, ordinary, user_mask
from .ddim_inversion import InvertedLatent, lora_context
from .runtime import node_progress, release_memory
from .spec import (DRAG_POINTS, DRAGGED_LATENT, INVERTED_LATENT, SUPERPIXELS, InputSpec, NodeResult, NodeSpec,
                   OutputSpec)

# The widgets each method uses; the page shows only the chosen method's (web/adaptivedrag_nodes.js keeps a copy).
METHOD_WIDGETS = {
    "adaptive": ("steps", "max_steps", "lr", "motion_radius", "tracking_radius", "mask_weight", "superpixel_radii",
                 "feature_scale"),
    "freedrag": ("max_steps", "lr", "freedrag_l", "freedrag_d", "freedrag_window_radius", "freedrag_gamma",
                 "feature_scale"),
    "dragdiffusion": ("steps", "lr", "motion_radius", "tracking_radius", "mask_weight", "feature_scale"),
}


@dataclass(frozen=True)
class DraggedLatent:
    """The optimised z_t and what the sampler needs with it.

    Args:
        inversion: the un-dragged state it started from (reference branch, schedule, LoRA).
        latent: the optimised z_t (scaled, CPU).
        points: the requested pairs, in the input image's pixels (``inversion.image_size``).
        final_handles: where the optimiser left each handle, same pixels.
        steps: optimisation steps used.
        mask: the mask the drag used, bool at the input image's size (None: none); CLoss Sampler keeps CLoss
            inside it too.
    """

    inversion: InvertedLatent
    latent: torch.Tensor
    points: DragPoints
    final_handles: list
    steps: int
    mask: Optional[np.ndarray] = None


def method_options(method: str, steps: int, max_steps: int, lr: float, motion_radius: int, tracking_radius: int,
                   mask_weight: float, superpixel_radii: bool, freedrag_l: float, freedrag_d: float,
                   freedrag_window_radius: int, freedrag_gamma: float) -> dict:
    """The node's widgets as the chosen method's ``drag()`` options."""
    if method == "dragdiffusion":
        return dict(max_steps=steps, motion_radius=motion_radius, tracking_radius=tracking_radius,
                    lam=mask_weight, lr=lr)
    if method == "adaptive":
        return dict(n_steps=steps, n_max=max_steps, motion_radius=motion_radius, tracking_radius=tracking_radius,
                    superpixel_radii=superpixel_radii, lam=mask_weight, lr=lr)
    return dict(l=freedrag_l, d=freedrag_d, max_steps=max_steps, window_radius=freedrag_window_radius,
                gamma=freedrag_gamma, lr=lr)


def points_for_latent(points: DragPoints, inversion: InvertedLatent) -> DragPoints:
    """The points in the pixels of the input image (``inversion.image_size``).

    VAE Encode crops an image to a multiple of 8 pixels, so without Encode Working Copy a few pixels of
    difference are expected and rescaled away; anything more means the points belong to another image.
    """
    width, height = inversion.image_size
    if (points.width, points.height) == (width, height):
        return points
    if inversion.working_copy is None and abs(points.width - width) < 8 and abs(points.height - height) < 8:
        return points.rescaled(width, height)
    source = "Encode Working Copy" if inversion.working_copy is not None else "VAE Encode"
    raise InputError(f"image is {width}x{height} (from the latent) but points were placed on "
                     f"{points.width}x{points.height}; connect the same image to Drag Points and {source}")


def handle_ends(points: DragPoints, final_handles: list) -> str:
    """Where each handle ended against its target, for a person: ``1 (x, y) for (tx, ty); 2 ...``."""
    return "; ".join(f"{number} ({x:.0f}, {y:.0f}) for ({tx:.0f}, {ty:.0f})" for number, ((x, y), (tx, ty))
                     in enumerate(zip(final_handles, points.targets), start=1))


def semantic_drag(inverted: InvertedLatent, drag_points: DragPoints, method: str = "adaptive",
                  mask: Optional[torch.Tensor] = None, superpixels: Optional[np.ndarray] = None,
                  steps: int = 80, max_steps: int = 300, lr: float = 0.01, motion_radius: int = 1,
                  tracking_radius: int = 3, mask_weight: float = 0.1, superpixel_radii: bool = False,
                  freedrag_l: float = 1.0, freedrag_d: float = 5.0, freedrag_window_radius: int = 3,
                  freedrag_gamma: float = 10.0, feature_scale: float = 0.5) -> NodeResult:
    """Optimise the inverted latent so the content at each handle moves to its target.

    Args:
        inverted: from DDIM Inversion.
        drag_points: from Drag Points, placed on the edited image.
        method: "adaptive", "freedrag" or "dragdiffusion".
        mask: optional MASK (1 = may change); outside it the image is kept. Another size than the image's is
            mapped onto it; an empty one (Load Image's placeholder for a picture without alpha) means no mask.
        superpixels: optional SUPERPIXELS from SAM2 Superpixel Mask (AdaptiveDrag's semantic regions), mapped
            onto the image like the mask.
        steps: DragDiffusion's step count / AdaptiveDrag's n (80).
        max_steps: AdaptiveDrag's n_max / FreeDrag's step budget (300).
        lr: Adam learning rate on the latent (0.01).
        motion_radius, tracking_radius: r_m (1) and r_p (3), DragDiffusion and AdaptiveDrag.
        mask_weight: lambda of the mask term (0.1), DragDiffusion and AdaptiveDrag.
        superpixel_radii: AdaptiveDrag: size r_m and r_p from the superpixels (public code).
        freedrag_l, freedrag_d, freedrag_window_radius, freedrag_gamma: FreeDrag's l (1), d (5), r (3), gamma (10).
        feature_scale: feature map size relative to the image (0.5).
    """
    options = method_options(method, steps, max_steps, lr, motion_radius, tracking_radius, mask_weight,
                             superpixel_radii, freedrag_l, freedrag_d, freedrag_window_radius, freedrag_gamma)
    EditSettings(method=method, drag_options=options, feature_scale=feature_scale).validate()
    points = points_for_latent(drag_points, inverted)
    width, height = inverted.image_size
    grid_size = feature_grid_size(*inverted.working_size, feature_scale)
    handles, targets = points.to_grid(*grid_size)
    fitted_mask = user_mask(mask, width, height)
    fitted_regions = fit_map(superpixels, "superpixels", width, height) if (
        method == "adaptive" and superpixels is not None) else None
    notes = [fitted.note for fitted in (fitted_mask, fitted_regions) if fitted is not None and fitted.note]

    with bridged_model(inverted.model, trainable=True, stage="drag", latent=inverted.inverted_latent) as core:
        with lora_context(core, inverted.lora):
            latent = inverted.inverted_latent.to(core.device).float()
            result = drag_on_features(core.unet, inverted.text_embeddings.to(core.device), inverted.schedule,
                                      latent, handles, targets, grid_size, method,
                                      fitted_mask.array, fitted_regions.array if fitted_regions else None,
                                      progress=node_progress(),
                                      start_for=lambda feature_fn: inverted.drag_start(feature_fn, latent),
                                      **options)
    release_memory()
    final = [map_point(point, *grid_size, width, height) for point in result.handles]
    notes.append(f"{method}: {int(result.steps)} steps; handles ended at (target in brackets): "
                 f"{handle_ends(points, final)}")
    return NodeResult((DraggedLatent(inverted, ordinary(result.latent, "cpu"), points, final,
                                     int(result.steps), fitted_mask.array),), notes=notes)


SPEC = NodeSpec(
    node_id="AdaptiveDrag_SemanticDrag",
    display_name="Semantic Drag (AdaptiveDrag)",
    description="Optimises the inverted latent so the content at each handle moves to its target: AdaptiveDrag "
                "(semantic regions, position-supervised steps), FreeDrag (feature dragging) or DragDiffusion "
                "(point tracking). Defaults are the papers'.",
    inputs=(
        InputSpec("inverted", INVERTED_LATENT, "From DDIM Inversion."),
        InputSpec("drag_points", DRAG_POINTS, "From Drag Points (placed on the image that was encoded)."),
        InputSpec("method", "COMBO", "adaptive: AdaptiveDrag. freedrag: FreeDrag. dragdiffusion: DragDiffusion.",
                  default="adaptive", options=METHODS),
        InputSpec("mask", "MASK", "Optional editable region (1 = may change): from SAM2 Superpixel Mask or "
                  "painted; the rest of the image is kept. Any size (mapped onto the image); an empty mask means "
                  "none.", optional=True),
        InputSpec("superpixels", SUPERPIXELS, "Optional superpixels from SAM2 Superpixel Mask: AdaptiveDrag's "
                  "semantic regions (other methods ignore them).", optional=True),
        InputSpec("steps", "INT", "DragDiffusion: optimisation steps. AdaptiveDrag: the step count n that sets "
                  "the ideal move per step (80).", default=80, min=1, max=2000),
        InputSpec("max_steps", "INT", "AdaptiveDrag: budget cap n_max. FreeDrag: step budget (300).",
                  default=300, min=1, max=5000),
        InputSpec("lr", "FLOAT", "Adam learning rate on the latent (0.01).", default=0.01, min=1e-5, max=1.0,
                  step=0.001),
        InputSpec("motion_radius", "INT", "r_m: half-size of the motion-supervision patch (1 -> 3x3), "
                  "DragDiffusion and AdaptiveDrag.", default=1, min=0, max=16),
        InputSpec("tracking_radius", "INT", "r_p: half-size of the point-tracking window (3 -> 7x7), "
                  "DragDiffusion and AdaptiveDrag.", default=3, min=1, max=32),
        InputSpec("mask_weight", "FLOAT", "lambda: weight keeping the region outside the mask unchanged (0.1), "
                  "DragDiffusion and AdaptiveDrag.", default=0.1, min=0.0, max=100.0, step=0.01),
        InputSpec("superpixel_radii", "BOOLEAN", "AdaptiveDrag: size r_m and r_p from the superpixels, as the "
                  "public code does (needs superpixels).", default=False),
        InputSpec("freedrag_l", "FLOAT", "FreeDrag: expected template distance l (1.0).", default=1.0, min=0.01,
                  max=100.0, step=0.01),
        InputSpec("freedrag_d", "FLOAT", "FreeDrag: longest move per drag d, in feature pixels (5.0).",
                  default=5.0, min=0.1, max=100.0, step=0.1),
        InputSpec("freedrag_window_radius", "INT", "FreeDrag: template window radius r (paper 3, public code 4).",
                  default=3, min=0, max=16),
        InputSpec("freedrag_gamma", "FLOAT", "FreeDrag: weight of the mask term gamma (10).", default=10.0,
                  min=0.0, max=1000.0, step=0.1),
        InputSpec("feature_scale", "FLOAT", "Feature map size relative to the image (0.5: 256x256 for 512x512).",
                  default=0.5, min=0.125, max=1.0, step=0.125),
    ),
    outputs=(OutputSpec("dragged", DRAGGED_LATENT, "The optimised latent, for CLoss Sampler."),),
    run=semantic_drag,
)
