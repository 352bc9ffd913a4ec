"""DDIM Inversion: the image's latent taken back to the timestep where the drag optimisation runs."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from adaptivedrag_core.drag import DragStart
from adaptivedrag_core.features import UNetFeatures, compact_drag_start, drag_start_from
from adaptivedrag_core.inversion import DDIMSchedule, ddim_invert, make_schedule, unet_noise_fn
from adaptivedrag_core.lora import identity_lora
from adaptivedrag_core.models import SD15_SCHEDULER_CONFIG
from adaptivedrag_core.pipeline import VAE_DOWNSCALE, EditSettings

from .bridge import (CoreModel, bridged_model, check_text_width, latent_samples, ordinary, scaled_latent,
                     text_embeddings)
from .runtime import node_progress, release_memory
from .spec import IDENTITY_LORA, INVERTED_LATENT, InputSpec, NodeResult, NodeSpec, OutputSpec
from .working_copy import WorkingCopy, working_copy_of

# Reference recordings kept per inversion (each is about 0.8 GiB at 512 px): the last two start settings tried.
REFERENCES_KEPT = 2


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
        working_copy: the input image and working size when the latent came from Encode Working Copy; None
            when it came from VAE Encode (the image is then the latent's own size).
        references: reference-branch recordings (on the CPU) by (start layer, start step), made by the CLoss
            Sampler the first time it needs one (:meth:`reference`). They depend only on this inversion, so every
            re-drag of the same image reuses them, as it reuses the inversion itself.
        drag_starts: the drag's starting features by (feature block, mask term), kept compact on the CPU
            (:meth:`drag_start`; 5 MiB at 512 px), so a re-drag runs no UNet pass for them.
    """

    model: Any
    lora: Optional[dict]
    clean_latent: torch.Tensor
    inverted_latent: torch.Tensor
    schedule: DDIMSchedule
    text_embeddings: torch.Tensor
    working_copy: Optional[WorkingCopy] = None
    references: OrderedDict = field(default_factory=OrderedDict, repr=False, compare=False)
    drag_starts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def working_size(self) -> tuple[int, int]:
        """(width, height) in pixels of the image the latent encodes (the working copy)."""
        return self.clean_latent.shape[-1] * VAE_DOWNSCALE, self.clean_latent.shape[-2] * VAE_DOWNSCALE

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height) in pixels of the input image, the one points and masks are given on."""
        return self.working_copy.original_size if self.working_copy is not None else self.working_size

    def drag_start(self, feature_fn: UNetFeatures, latent: torch.Tensor) -> DragStart:
        """The drag's start at ``latent`` (this inversion's, on the UNet's device): a kept one, or one computed
        and kept (:func:`~adaptivedrag_core.features.compact_drag_start`)."""
        key = (feature_fn.block_index, feature_fn.with_prediction)
        if key not in self.drag_starts:
            self.drag_starts[key] = tuple(None if tensor is None else tensor.cpu()
                                          for tensor in compact_drag_start(feature_fn, latent))
        return drag_start_from(feature_fn, self.drag_starts[key], latent)

    def reference(self, key: tuple, record: Callable[[], Any]):
        """The reference recording for ``key`` (start layer, start step): a kept one, or ``record()``'s, which is
        kept, forgetting the least recently used beyond :data:`REFERENCES_KEPT`."""
        if key in self.references:
            self.references.move_to_end(key)
        else:
            self.references[key] = record()
            while len(self.references) > REFERENCES_KEPT:
                self.references.popitem(last=False)
        return self.references[key]


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
    embeddings = text_embeddings(positive)
    schedule = make_schedule(DDIMScheduler(**SD15_SCHEDULER_CONFIG), steps, strength)
    with bridged_model(model, stage="inversion", latent=latent_samples(latent)) as core:
        check_text_width(embeddings, core)
        clean = scaled_latent(latent, core)
        with lora_context(core, lora):
            inverted = ddim_invert(unet_noise_fn(core.unet, embeddings.to(core.device)), clean, schedule,
                                   node_progress())
    release_memory()
    result = InvertedLatent(model, lora, ordinary(clean, "cpu"), ordinary(inverted, "cpu"), schedule,
                            ordinary(embeddings, "cpu"), working_copy_of(latent))
    note = (f"inverted {len(schedule.timesteps)} of {steps} DDIM steps at {'x'.join(map(str, result.working_size))}"
            + (" with the identity LoRA" if lora else ", no identity LoRA"))
    return NodeResult((result,), notes=[note])


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
