"""Identity LoRA Finetune: DragDiffusion's per-image LoRA, trained on the MODEL the user loaded.

ComfyUI's cache keeps the LoRA while the graph runs; a disk cache (``ComfyUI/user/adaptivedrag/lora_cache``, keyed
by the image's latent, the model's weights, the prompt and the settings) keeps it across restarts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.lora import load_lora, save_lora, train_identity_lora
from adaptivedrag_core.pipeline import AUTO_ON_OFF, EditSettings, lora_checkpointing

from .bridge import (CoreModel, bridged_model, check_text_width, latent_samples, ordinary, scaled_latent,
                     text_embeddings)
from .runtime import cache_folder, node_progress, release_memory, torch_device
from .spec import IDENTITY_LORA, InputSpec, NodeResult, NodeSpec, OutputSpec

LORA_CACHE = "lora_cache"
# LoRA files kept in the disk cache (about 13 MB each at rank 16); the least recently used go first.
LORA_CACHE_FILES = 32
# Values sampled from each weight tensor for the model's fingerprint in the cache key.
FINGERPRINT_VALUES = 64


def train_lora(model, latent: dict, positive: list, steps: int = 80, rank: int = 16, lr: float = 5e-4,
               batch_size: int = 4, seed: int = 0, gradient_checkpointing: Optional[str] = "auto",
               keep_on_disk: Optional[bool] = True) -> NodeResult:
    """Fine-tune an identity LoRA on the image's latent, or take it from the disk cache.

    Args:
        model: ComfyUI MODEL (SD1.x, with any LoRAs the user applied).
        latent: LATENT of the image (Encode Working Copy or VAE Encode); its first latent is used.
        positive: CONDITIONING of the prompt (CLIP Text Encode).
        steps, rank, lr, batch_size, seed: training settings (DragDiffusion: 80, 16, 5e-4, 4).
        gradient_checkpointing: "auto" (on for GPUs under 11 GiB), "on" or "off"; None (a workflow saved before
            the input existed) is "auto".
        keep_on_disk: keep the LoRA in the disk cache and use a kept one; None (an older workflow) is on.

    Returns:
        The LoRA weights (a state dict of CPU tensors; the given MODEL is not changed).
    """
    EditSettings(lora_steps=steps, lora_rank=rank, lora_lr=lr, lora_batch_size=batch_size, seed=seed).validate()
    checkpointing = lora_checkpointing(AUTO_ON_OFF[gradient_checkpointing or "auto"], torch_device())
    embeddings = text_embeddings(positive)
    stage = "lora_checkpointed" if checkpointing else "lora"
    with bridged_model(model, trainable=True, stage=stage, latent=latent_samples(latent)) as core:
        check_text_width(embeddings, core)
        clean = scaled_latent(latent, core)
        folder = cache_folder(LORA_CACHE) if keep_on_disk is not False else None
        path = None
        if folder is not None:
            path = folder / f"lora-{cache_key(core, clean, embeddings, steps, rank, lr, batch_size, seed)}.safetensors"
        state = kept_lora(path)
        if state is not None:
            note = f"identity LoRA from the disk cache ({path.name}): not retrained"
        else:
            state = train_identity_lora(core.unet, clean, embeddings.to(core.device), steps=steps, rank=rank, lr=lr,
                                        batch_size=batch_size, seed=seed, progress=node_progress(),
                                        gradient_checkpointing=checkpointing)
            state = {key: ordinary(value, "cpu") for key, value in state.items()}
            note = f"identity LoRA trained: {steps} steps, rank {rank}" + (
                f", kept on disk as {path.name}" if path is not None else "")
            if path is not None:
                save_lora(state, path, overwrite=True)
                forget_oldest(folder, LORA_CACHE_FILES)
    release_memory()
    return NodeResult((state,), notes=[note])


def cache_key(core: CoreModel, clean: torch.Tensor, embeddings: torch.Tensor, *settings) -> str:
    """A digest of everything the trained LoRA depends on: the scaled latent, the model's (patched) weights, the
    prompt embeddings and the training settings."""
    digest = hashlib.sha256()
    for tensor in (clean, embeddings, weights_fingerprint(core.unet)):
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digest.update(repr(settings).encode())
    return digest.hexdigest()[:32]


def weights_fingerprint(unet: torch.nn.Module) -> torch.Tensor:
    """Evenly spaced values of every weight tensor: a cheap stand-in for the weights in a cache key, which tells
    checkpoints, fine-tunes and LoraLoader strengths apart without reading every value."""
    samples = []
    with torch.no_grad():
        for value in unet.state_dict().values():
            flat = value.reshape(-1)
            samples.append(flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)].float().cpu())
    return torch.cat(samples)


def kept_lora(path: Optional[Path]) -> Optional[dict]:
    """The LoRA kept at ``path``, or None when there is none (or it is unreadable: it is then trained again and
    replaced)."""
    if path is None or not path.is_file():
        return None
    try:
        state = load_lora(path)
    except InputError:
        return None
    path.touch()  # recently used: kept longest
    return state


def forget_oldest(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used LoRA files in ``folder``."""
    files = sorted(folder.glob("lora-*.safetensors"), key=lambda path: path.stat().st_mtime, reverse=True)
    for path in files[keep:]:
        path.unlink(missing_ok=True)


SPEC = NodeSpec(
    node_id="AdaptiveDrag_IdentityLoRA",
    display_name="Identity LoRA Finetune (AdaptiveDrag)",
    description="Fine-tunes a small LoRA on this one image so inversion and sampling reproduce it faithfully "
                "(DragDiffusion). Cached: moving only the drag points does not retrain it, and with keep_on_disk "
                "neither does a restart of ComfyUI.",
    inputs=(
        InputSpec("model", "MODEL", "SD1.x model from Load Checkpoint (after any LoraLoader)."),
        InputSpec("latent", "LATENT", "The image's latent from Encode Working Copy (or VAE Encode)."),
        InputSpec("positive", "CONDITIONING", "Prompt describing the image (CLIP Text Encode; may be empty)."),
        InputSpec("steps", "INT", "Training steps (DragDiffusion: 80).", default=80, min=1, max=1000),
        InputSpec("rank", "INT", "LoRA rank (16).", default=16, min=1, max=128),
        InputSpec("lr", "FLOAT", "AdamW learning rate (5e-4).", default=5e-4, min=1e-6, max=1e-1, step=1e-5),
        InputSpec("batch_size", "INT", "Noised copies of the image per step (4).", default=4, min=1, max=16),
        InputSpec("seed", "INT", "Seed for the LoRA initialisation, timesteps and noise. A plain number, not "
                  "randomised after each run, so the LoRA stays cached.", default=0, min=0, max=2**32 - 1),
        InputSpec("gradient_checkpointing", "COMBO", "Recompute activations in the backward pass: the same LoRA "
                  "with about 2 GiB less GPU memory at 512 px, for a third more computation. auto: on for GPUs "
                  "under 11 GiB.", default="auto", options=tuple(AUTO_ON_OFF), optional=True),
        InputSpec("keep_on_disk", "BOOLEAN", "Keep the LoRA in ComfyUI/user/adaptivedrag/lora_cache (the last "
                  f"{LORA_CACHE_FILES}, by image, model, prompt and settings), so a restart does not retrain it.",
                  default=True, optional=True),
    ),
    outputs=(OutputSpec("lora", IDENTITY_LORA, "Identity LoRA weights for DDIM Inversion."),),
    run=train_lora,
)
