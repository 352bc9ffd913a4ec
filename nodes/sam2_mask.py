"""SAM2 Loader and SAM2 Superpixel Mask: the AdaptiveDrag auto mask (SAM2 features -> SLIC -> regions, mask)."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from adaptivedrag_core.automask import DEFAULT_N_SEGMENTS, VARIANTS, auto_mask, render_overlay
from adaptivedrag_core.sam2_loader import SIZES, load_sam2, sam2_on

from .bridge import comfy_image, comfy_mask, for_display, image_array, image_size
from .runtime import model_files, model_path, node_progress, register_model_folder, release_memory, torch_device
from .spec import DRAG_POINTS, SAM2_MODEL, SUPERPIXELS, InputSpec, NodeResult, NodeSpec, OutputSpec

SAM2_FOLDER = "sam2"
SAM2_EXTENSIONS = {".pt", ".safetensors"}
MODEL_SIZES = ("auto",) + SIZES


def sam2_files() -> list[str]:
    """The checkpoints in ``ComfyUI/models/sam2`` (registering the folder first)."""
    register_model_folder(SAM2_FOLDER, SAM2_EXTENSIONS)
    return model_files(SAM2_FOLDER)


def load_sam2_model(model_name: str, model_size: str = "auto") -> NodeResult:
    """Load a SAM2 checkpoint from ``models/sam2``.

    Args:
        model_name: file name inside the folder.
        model_size: tiny / small / base_plus / large, or "auto" to read it from the file name or weights.
    """
    register_model_folder(SAM2_FOLDER, SAM2_EXTENSIONS)
    path = model_path(SAM2_FOLDER, model_name)
    # On the CPU; the mask node puts it on the GPU only while it runs, leaving the memory to the edit.
    encoder = load_sam2(path, None if model_size == "auto" else model_size)
    return NodeResult((encoder,))


def superpixel_mask(image: torch.Tensor, drag_points, sam2_model: Optional[object] = None,
                    variant: str = "features", n_segments: int = DEFAULT_N_SEGMENTS) -> NodeResult:
    """The auto mask of ``image`` for ``drag_points``: SLIC superpixels on SAM2 features.

    Args:
        image: ComfyUI IMAGE (its first image is used).
        drag_points: ``DragPoints`` in this image's pixels.
        sam2_model: from the SAM2 Loader; without it SLIC runs on Lab colour (the core warns: poorer regions).
        variant: "features" (the paper: SLIC on SAM2 encoder features) or "sam_masks" (the public code: SLIC
            on SAM2's automatic masks; needs the SAM2 model).
        n_segments: SLIC's target number of superpixels.

    Returns:
        MASK [1, H, W] (1 = may change), SUPERPIXELS (int labels [H, W]) and an overlay IMAGE, which the node
        also shows; the core's warnings (no SAM2, a mask covering almost everything) go on the node.
    """
    drag_points.check_image_size(*image_size(image))
    pixels = image_array(image)
    with sam2_on(sam2_model, torch_device()):
        result = auto_mask(pixels, drag_points, sam2_model, variant=variant, n_segments=n_segments,
                           progress=node_progress())
    overlay = comfy_image(np.asarray(render_overlay(pixels, result, drag_points)))
    release_memory()
    note = (f"mask covers {result.coverage:.0%} of the image; {len(np.unique(result.regions))} superpixels "
            f"({variant}{', SAM2' if sam2_model is not None else ', colour only'})")
    return NodeResult((comfy_mask(result.mask), result.regions, overlay), ui_images={"images": for_display(overlay)},
                      notes=[note])


LOADER_SPEC = NodeSpec(
    node_id="AdaptiveDrag_SAM2Loader",
    display_name="SAM2 Loader (AdaptiveDrag)",
    description="Loads a SAM2 / SAM2.1 checkpoint (.pt or .safetensors) from ComfyUI/models/sam2 for the auto mask.",
    inputs=(
        InputSpec("model_name", "COMBO", "A SAM2 checkpoint in ComfyUI/models/sam2 (e.g. sam2.1_hiera_tiny.pt).",
                  options=sam2_files),
        InputSpec("model_size", "COMBO", "Model size; auto reads it from the file name, then from the weights.",
                  default="auto", options=MODEL_SIZES),
    ),
    outputs=(OutputSpec("sam2_model", SAM2_MODEL, "SAM2 image encoder for SAM2 Superpixel Mask."),),
    run=load_sam2_model,
)

MASK_SPEC = NodeSpec(
    node_id="AdaptiveDrag_SAM2SuperpixelMask",
    display_name="SAM2 Superpixel Mask (AdaptiveDrag)",
    description="AdaptiveDrag's automatic mask: SLIC superpixels on SAM2 image features; the superpixels under "
                "the handles, extended toward their targets, form the editable region.",
    inputs=(
        InputSpec("image", "IMAGE", "The image being edited."),
        InputSpec("drag_points", DRAG_POINTS, "Handle -> target pairs from Drag Points."),
        InputSpec("sam2_model", SAM2_MODEL, "SAM2 from SAM2 Loader. Optional: without it, superpixels follow "
                  "colour only (poorer regions).", optional=True),
        InputSpec("variant", "COMBO", "features: SLIC on SAM2 encoder features (the paper). sam_masks: SLIC on "
                  "SAM2's automatic masks (the public code; needs SAM2 and the optional sam2 package, slower).",
                  default="features", options=VARIANTS),
        InputSpec("n_segments", "INT", "Target number of superpixels for SLIC.", default=DEFAULT_N_SEGMENTS,
                  min=2, max=2000),
    ),
    outputs=(
        OutputSpec("mask", "MASK", "Editable region (1 = may change)."),
        OutputSpec("superpixels", SUPERPIXELS, "Superpixel labels for Semantic Drag's semantic regions."),
        OutputSpec("overlay", "IMAGE", "The image with superpixel borders, the mask and the points drawn."),
    ),
    run=superpixel_mask,
)
