"""DDIM Inversion: the image's latent taken back to the timestep where the drag optimisation runs."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from adaptivedrag_core.inversion import DDIMSchedule, ddim_invert, make_schedule, unet_noise_fn
from adaptivedrag_core.lora import identity_lora
from adaptivedrag_core.models import SD15_SCHEDULER_CONFIG
from adaptivedrag_core.pipeline import VAE_DOWNSCALE, EditSettings

from .bridge import CoreModel, check_text_width, core_model, ordinary, scaled_latent, text_embeddings
from .runtime import node_progress, release_memory
from .spec import IDENTITY_LORA, INVERTED_LATENT, InputSpec, NodeResult, NodeSpec, OutputSpec


@dataclass(frozen=True)
class InvertedLatent:
    """The un-dragged state of one image, everything later nodes need (tensors on the CPU, scaled latents).

    Args:
        model: the ComfyUI MODEL it was made with (later nodes bridge it again; it is never changed).
        lora: identity LoRA weights, or None.
        clean_latent: z_0, the image's scaled latent [1, 4, h, w].
        inverted_latent: z_t at ``schedule.start_timestep``.
        schedule: the DDIM schedule from z_t back to z_0.
        text_embeddings: the prompt's embeddings [1, 77, D].
        references: reference-branch recordings (on the CPU) by (start layer, start step), filled in by the
            CLoss Sampler the first time it needs one. They depend only on this inversion, so every re-drag of
            the same image reuses them, as it reuses the inversion itself.
    """

    model: Any
    lora: Optional[dict]
    clean_latent: torch.Tensor
    inverted_latent: torch.Tensor
    schedule: DDIMSchedule
    text_embeddings: torch.Tensor
    references: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels of the image the latent encodes."""
        return self.clean_latent.shape[-1] * VAE_DOWNSCALE, self.clean_latent.shape[-2] * VAE_DOWNSCALE


def lora_context(core: CoreModel, lora: Optional[dict]):
    """Activate the identity LoRA on the bridged UNet for a ``with`` block (nothing without one)."""
    return identity_lora(core.unet, lora) if lora else nullcontext()


def invert(model, latent: dict, positive: list, lora: Optional[dict] = None, steps: int = 50,
           strength: float = 0.7) -> NodeResult:
    """DDIM-invert the image's latent, without guidance, through ``strength`` of a ``steps``-step schedule.

    Args:
        model: ComfyUI MODEL (SD1.x).
        latent: LATENT of the image (VAE Encode).
        positive: CONDITIONING of the prompt.
        lora: identity LoRA from Identity LoRA Finetune, or None to invert with the plain model.
        steps: DDIM schedule length (50).
        strength: fraction of the schedule inverted (0.7 -> 35 of 50 steps).
    """
    from diffusers import DDIMScheduler

    EditSettings(num_steps=steps, strength=strength).validate()
    core = core_model(model)
    embeddings = text_embeddings(positive)
    check_text_width(embeddings, core)
    schedule = make_schedule(DDIMScheduler(**SD15_SCHEDULER_CONFIG), steps, strength)
    clean = scaled_latent(latent, core)
    with lora_context(core, lora):
        inverted = ddim_invert(unet_noise_fn(core.unet, embeddings.to(core.device)), clean, schedule,
                               node_progress())
    release_memory()
    return NodeResult((InvertedLatent(model, lora, ordinary(clean, "cpu"), ordinary(inverted, "cpu"), schedule,
                                      ordinary(embeddings, "cpu")),))


SPEC = NodeSpec(
    node_id="AdaptiveDrag_DDIMInversion",
    display_name="DDIM Inversion (AdaptiveDrag)",
    description="Inverts the image's latent with DDIM (no guidance) to the timestep where dragging happens. "
                "Cached by ComfyUI: moving only the drag points does not invert again.",
    inputs=(
        InputSpec("model", "MODEL", "The same SD1.x model used for the identity LoRA."),
        InputSpec("latent", "LATENT", "The image's latent from VAE Encode."),
        InputSpec("positive", "CONDITIONING", "Prompt describing the image (the same as for the LoRA)."),
        InputSpec("lora", IDENTITY_LORA, "Identity LoRA. Optional: without it the plain model is used "
                  "(faster, less faithful).", optional=True),
        InputSpec("steps", "INT", "DDIM steps of the full schedule (50).", default=50, min=1, max=1000),
        InputSpec("strength", "FLOAT", "Fraction of the schedule to invert (0.7: drag at step 35 of 50).",
                  default=0.7, min=0.01, max=1.0, step=0.01),
    ),
    outputs=(OutputSpec("inverted", INVERTED_LATENT, "The inverted latent with its schedule, prompt and LoRA."),),
    run=invert,
)
