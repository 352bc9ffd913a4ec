"""Identity LoRA Finetune: DragDiffusion's per-image LoRA, trained on the MODEL the user loaded."""

from __future__ import annotations

from adaptivedrag_core.lora import train_identity_lora
from adaptivedrag_core.pipeline import CHECKPOINTING_CHOICES, EditSettings, lora_checkpointing

from .bridge import check_text_width, core_model, ordinary, scaled_latent, text_embeddings
from .runtime import node_progress, release_memory
from .spec import IDENTITY_LORA, InputSpec, NodeResult, NodeSpec, OutputSpec


def train_lora(model, latent: dict, positive: list, steps: int = 80, rank: int = 16, lr: float = 5e-4,
               batch_size: int = 4, seed: int = 0, gradient_checkpointing: str = "auto") -> NodeResult:
    """Fine-tune an identity LoRA on the image's latent.

    Args:
        model: ComfyUI MODEL (SD1.x, with any LoRAs the user applied).
        latent: LATENT of the image (VAE Encode); its first latent is used.
        positive: CONDITIONING of the prompt (CLIP Text Encode).
        steps, rank, lr, batch_size, seed: training settings (DragDiffusion: 80, 16, 5e-4, 4).
        gradient_checkpointing: "auto" (on for GPUs under 11 GiB), "on" or "off"; None (a workflow saved before
            the input existed) is "auto".

    Returns:
        The LoRA weights (a state dict of CPU tensors; the given MODEL is not changed).
    """
    EditSettings(lora_steps=steps, lora_rank=rank, lora_lr=lr, lora_batch_size=batch_size, seed=seed).validate()
    core = core_model(model, trainable=True)
    embeddings = text_embeddings(positive)
    check_text_width(embeddings, core)
    state = train_identity_lora(core.unet, scaled_latent(latent, core), embeddings.to(core.device), steps=steps,
                                rank=rank, lr=lr, batch_size=batch_size, seed=seed, progress=node_progress(),
                                gradient_checkpointing=lora_checkpointing(
                                    CHECKPOINTING_CHOICES[gradient_checkpointing or "auto"], core.device))
    release_memory()
    return NodeResult(({key: ordinary(value, "cpu") for key, value in state.items()},))


SPEC = NodeSpec(
    node_id="AdaptiveDrag_IdentityLoRA",
    display_name="Identity LoRA Finetune (AdaptiveDrag)",
    description="Fine-tunes a small LoRA on this one image so inversion and sampling reproduce it faithfully "
                "(DragDiffusion). Cached by ComfyUI: moving only the drag points does not retrain it.",
    inputs=(
        InputSpec("model", "MODEL", "SD1.x model from Load Checkpoint (after any LoraLoader)."),
        InputSpec("latent", "LATENT", "The image's latent from VAE Encode."),
        InputSpec("positive", "CONDITIONING", "Prompt describing the image (CLIP Text Encode; may be empty)."),
        InputSpec("steps", "INT", "Training steps (DragDiffusion: 80).", default=80, min=1, max=1000),
        InputSpec("rank", "INT", "LoRA rank (16).", default=16, min=1, max=128),
        InputSpec("lr", "FLOAT", "AdamW learning rate (5e-4).", default=5e-4, min=1e-6, max=1e-1, step=1e-5),
        InputSpec("batch_size", "INT", "Noised copies of the image per step (4).", default=4, min=1, max=16),
        InputSpec("seed", "INT", "Seed for the LoRA initialisation, timesteps and noise.", default=0, min=0,
                  max=2**32 - 1, seed_control=True),
        InputSpec("gradient_checkpointing", "COMBO", "Recompute activations in the backward pass: the same LoRA "
                  "with about 2 GiB less GPU memory at 512 px, for a third more computation. auto: on for GPUs "
                  "under 11 GiB.", default="auto", options=tuple(CHECKPOINTING_CHOICES), optional=True),
    ),
    outputs=(OutputSpec("lora", IDENTITY_LORA, "Identity LoRA weights for DDIM Inversion."),),
    run=train_lora,
)
