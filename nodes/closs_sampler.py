"""CLoss Sampler: DDIM sampling of the dragged latent with reference-latent control and AdaptiveDrag's CLoss."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from adaptivedrag_core.drag.closs import CLOSS_KINDS, DEFAULT_CLOSS_KIND
from adaptivedrag_core.images import resize_labels
from adaptivedrag_core.pipeline import EditSettings
from adaptivedrag_core.preview import side_by_side
from adaptivedrag_core.sampling import CLossSettings, record_reference, sample_dragged

from .bridge import bridged_model, comfy_image, comfy_latent, for_display, image_array, vae_decode
from .ddim_inversion import InvertedLatent, lora_context
from .runtime import node_progress, part_progress, release_memory
from .semantic_drag import DraggedLatent, handle_ends
from .spec import DRAGGED_LATENT, InputSpec, NodeResult, NodeSpec, OutputSpec, Unavailable

# The UI key of the preview: the input with the requested arrows beside the result with where the handles ended.
PREVIEW_UI_KEY = "images"
NO_VAE = "connect the VAE to CLoss Sampler's vae input to get its image (at the input's size)"


def sample(dragged: DraggedLatent, closs: bool = True, closs_weight: float = 1.0, closs_kind: str = DEFAULT_CLOSS_KIND,
           reference_start_layer: int = 10, reference_start_step: int = 0, vae=None) -> NodeResult:
    """Denoise the dragged z_t to a clean latent, and with a VAE decode it at the input's size.

    The un-dragged z_t is denoised first, recording its self-attention keys/values; the dragged branch then uses
    them (reference-latent control), which keeps the subject's identity.

    Args:
        dragged: from Semantic Drag (it carries the inversion: schedule, prompt, LoRA, original latent).
        closs: apply the correspondence loss while sampling (AdaptiveDrag).
        closs_weight: its weight (1.0).
        closs_kind: "mse" (the public code, the default) or "contrastive" (the paper).
        reference_start_layer, reference_start_step: where reference control starts (10, 0).
        vae: ComfyUI VAE, optional: decodes the result, gives it back at the input's size and shows the preview.

    Returns:
        LATENT of the working copy (unscaled, ComfyUI's convention) for VAE Decode; IMAGE at the input's size
        (Unavailable without a VAE); the preview (input with arrows | result with where each handle ended) and
        the final handle positions on the node.
    """
    EditSettings(closs_weight=closs_weight, closs_kind=closs_kind, reference_start_layer=reference_start_layer,
                 reference_start_step=reference_start_step).validate()
    inversion = dragged.inversion
    latent_h, latent_w = inversion.clean_latent.shape[-2:]
    handles, targets = dragged.points.to_grid(latent_w, latent_h)
    # CLoss changes the latent only near the targets and, as the drag did, inside the drag's mask.
    mask = None if dragged.mask is None else torch.from_numpy(resize_labels(dragged.mask, latent_w, latent_h))
    settings = CLossSettings(weight=closs_weight, kind=closs_kind) if closs else None
    progress = node_progress()
    with bridged_model(inversion.model, trainable=closs, stage="sampling", latent=inversion.clean_latent) as core:
        device = core.device
        embeddings = inversion.text_embeddings.to(device)
        with lora_context(core, inversion.lora):
            reference = inversion.reference((reference_start_layer, reference_start_step), lambda: record_reference(
                core.unet, embeddings, inversion.schedule, inversion.inverted_latent.to(device), reference_start_layer,
                reference_start_step, part_progress(progress, 0, 2)).to("cpu"))
            latent = sample_dragged(core.unet, embeddings, inversion.schedule, dragged.latent.to(device),
                                    reference.to(device), reference_start_layer, reference_start_step,
                                    closs=settings, original_latent=inversion.clean_latent.to(device),
                                    handles=handles, targets=targets, progress=part_progress(progress, 1, 2),
                                    mask=mask)
    release_memory()
    result = comfy_latent(latent, core.latent_scale)
    notes = [f"final handles (target in brackets): {handle_ends(dragged.points, dragged.final_handles)}"]
    if vae is None:
        return NodeResult((result, Unavailable(NO_VAE)), notes=notes + [f"no VAE: {NO_VAE}"])
    image = restored_image(vae, result["samples"], inversion)
    preview = preview_image(vae, inversion, dragged, image, core.latent_scale)
    width, height = inversion.image_size
    notes.append(f"result {width}x{height} (worked at {'x'.join(map(str, inversion.working_size))})")
    return NodeResult((result, image), ui_images={PREVIEW_UI_KEY: preview}, notes=notes)


def restored_image(vae, samples: torch.Tensor, inversion: InvertedLatent) -> torch.Tensor:
    """The decoded result as an IMAGE at the input's size."""
    decoded = vae_decode(vae, samples)
    return inversion.working_copy.restore(decoded) if inversion.working_copy is not None else decoded


def preview_image(vae, inversion: InvertedLatent, dragged: DraggedLatent, result: torch.Tensor,
                  latent_scale: float) -> torch.Tensor:
    """IMAGE: the input with the requested arrows beside the result with where each handle ended, enlarged for a
    small input (the arrows are drawn at the enlarged size).

    Args:
        vae, inversion, dragged: as for :func:`sample`.
        result: the result IMAGE at the input's size.
        latent_scale: the scale of the inversion's latents (to decode the input from its latent when the graph
            used VAE Encode, which leaves the input itself out of reach).
    """
    if inversion.working_copy is not None:
        original = inversion.working_copy.original
    else:
        original = vae_decode(vae, inversion.clean_latent / latent_scale)
    shown = [to_pil(for_display(image)) for image in (original, result)]
    sheet = side_by_side(*shown, dragged.points, dragged.final_handles)
    return comfy_image(np.asarray(sheet))


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_array(image))


SPEC = NodeSpec(
    node_id="AdaptiveDrag_CLossSampler",
    display_name="CLoss Sampler (AdaptiveDrag)",
    description="Samples the dragged latent back to an image with reference-latent control (identity kept from "
                "the original) and AdaptiveDrag's correspondence loss. With the VAE connected it gives the image "
                "at the input's size and shows the input with the drag arrows beside the result.",
    inputs=(
        InputSpec("dragged", DRAGGED_LATENT, "From Semantic Drag."),
        InputSpec("closs", "BOOLEAN", "Correspondence loss: pull each target's patch toward its handle's "
                  "original content while sampling (AdaptiveDrag; off = plain DragDiffusion/FreeDrag sampling).",
                  default=True),
        InputSpec("closs_weight", "FLOAT", "Weight of the correspondence loss (1.0).", default=1.0, min=0.0,
                  max=1000.0, step=0.1),
        InputSpec("closs_kind", "COMBO", "mse: squared error between patches (public code; the default, it edited "
                  "at least as well). contrastive: symmetric cross-entropy on cosine similarities (paper).",
                  default=DEFAULT_CLOSS_KIND, options=CLOSS_KINDS),
        InputSpec("reference_start_layer", "INT", "First self-attention layer that takes the original's "
                  "keys/values (10).", default=10, min=0, max=64),
        InputSpec("reference_start_step", "INT", "First sampling step with reference control (0).", default=0,
                  min=0, max=1000),
        InputSpec("vae", "VAE", "The checkpoint's VAE: decodes the result at the input's size (image output) "
                  "and shows the preview on this node.", optional=True),
    ),
    outputs=(
        OutputSpec("latent", "LATENT", "The edited working copy's latent, for VAE Decode."),
        OutputSpec("image", "IMAGE", "The edited image at the input's size (needs the vae input)."),
    ),
    run=sample,
)
