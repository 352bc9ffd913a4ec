"""CLoss Sampler: DDIM sampling of the dragged latent with reference-latent control and AdaptiveDrag's CLoss."""

from __future__ import annotations

from adaptivedrag_core.drag.closs import CLOSS_KINDS
from adaptivedrag_core.pipeline import VAE_DOWNSCALE, EditSettings
from adaptivedrag_core.sampling import CLossSettings, record_reference, sample_dragged

from .bridge import comfy_latent, core_model
from .ddim_inversion import lora_context
from .runtime import node_progress, part_progress, release_memory
from .semantic_drag import DraggedLatent
from .spec import DRAGGED_LATENT, InputSpec, NodeResult, NodeSpec, OutputSpec


def sample(dragged: DraggedLatent, closs: bool = True, closs_weight: float = 1.0, closs_kind: str = "contrastive",
           reference_start_layer: int = 10, reference_start_step: int = 0) -> NodeResult:
    """Denoise the dragged z_t to a clean latent.

    The un-dragged z_t is denoised first, recording its self-attention keys/values; the dragged branch then uses
    them (reference-latent control), which keeps the subject's identity.

    Args:
        dragged: from Semantic Drag (it carries the inversion: schedule, prompt, LoRA, original latent).
        closs: apply the correspondence loss while sampling (AdaptiveDrag).
        closs_weight: its weight (1.0).
        closs_kind: "contrastive" (the paper) or "mse" (the public code).
        reference_start_layer, reference_start_step: where reference control starts (10, 0).

    Returns:
        LATENT (unscaled, ComfyUI's convention) for VAE Decode.
    """
    EditSettings(closs_weight=closs_weight, closs_kind=closs_kind, reference_start_layer=reference_start_layer,
                 reference_start_step=reference_start_step).validate()
    inversion = dragged.inversion
    core = core_model(inversion.model, trainable=closs)
    device = core.device
    embeddings = inversion.text_embeddings.to(device)
    latent_w, latent_h = (size // VAE_DOWNSCALE for size in inversion.image_size)
    handles, targets = dragged.points.to_grid(latent_w, latent_h)
    settings = CLossSettings(weight=closs_weight, kind=closs_kind) if closs else None
    progress = node_progress()
    with lora_context(core, inversion.lora):
        key = (reference_start_layer, reference_start_step)
        if key not in inversion.references:
            recorded = record_reference(core.unet, embeddings, inversion.schedule,
                                        inversion.inverted_latent.to(device), reference_start_layer,
                                        reference_start_step, part_progress(progress, 0, 2))
            inversion.references[key] = recorded.to("cpu")
        reference = inversion.references[key].to(device)
        latent = sample_dragged(core.unet, embeddings, inversion.schedule, dragged.latent.to(device), reference,
                                reference_start_layer, reference_start_step, closs=settings,
                                original_latent=inversion.clean_latent.to(device), handles=handles,
                                targets=targets, progress=part_progress(progress, 1, 2))
    del reference
    release_memory()
    return NodeResult((comfy_latent(latent, core.latent_scale),))


SPEC = NodeSpec(
    node_id="AdaptiveDrag_CLossSampler",
    display_name="CLoss Sampler (AdaptiveDrag)",
    description="Samples the dragged latent back to an image latent with reference-latent control (identity "
                "kept from the original) and AdaptiveDrag's correspondence loss. Connect to VAE Decode.",
    inputs=(
        InputSpec("dragged", DRAGGED_LATENT, "From Semantic Drag."),
        InputSpec("closs", "BOOLEAN", "Correspondence loss: pull each target's patch toward its handle's "
                  "original content while sampling (AdaptiveDrag; off = plain DragDiffusion/FreeDrag sampling).",
                  default=True),
        InputSpec("closs_weight", "FLOAT", "Weight of the correspondence loss (1.0).", default=1.0, min=0.0,
                  max=1000.0, step=0.1),
        InputSpec("closs_kind", "COMBO", "contrastive: symmetric cross-entropy on cosine similarities (paper). "
                  "mse: squared error between patches (public code).", default="contrastive", options=CLOSS_KINDS),
        InputSpec("reference_start_layer", "INT", "First self-attention layer that takes the original's "
                  "keys/values (10).", default=10, min=0, max=64),
        InputSpec("reference_start_step", "INT", "First sampling step with reference control (0).", default=0,
                  min=0, max=1000),
    ),
    outputs=(OutputSpec("latent", "LATENT", "The edited image's latent, for VAE Decode."),),
    run=sample,
)
