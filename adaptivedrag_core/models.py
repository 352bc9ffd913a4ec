"""Stable Diffusion 1.x components: the container every stage takes, and the tiny random-weight factory.

Real checkpoints are loaded offline from the user's files (see ``load_sd15``); the tiny factory builds
the same architecture family with tiny widths for tests and the demo.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

SD15_LATENT_SCALE = 0.18215

# SD1.5's DDIM schedule (method.md, "DDIM inversion").
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class SDComponents:
    """What a drag edit needs from an SD1.x model.

    Args:
        unet: the diffusers UNet (the identity LoRA is injected into it as a peft adapter).
        vae: the diffusers AutoencoderKL.
        text_encoder: CLIP text model, or None when the caller supplies text embeddings itself.
        tokenizer: CLIP tokenizer, or None (an empty prompt still works without one).
        latent_scale: multiply VAE latents by this (0.18215 for SD1.x).
        scheduler_config: DDIMScheduler settings.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: Optional[torch.nn.Module]
    tokenizer: Optional[object]
    latent_scale: float = SD15_LATENT_SCALE
    scheduler_config: Optional[dict] = None

    def __post_init__(self):
        if self.scheduler_config is None:
            self.scheduler_config = dict(SD15_SCHEDULER_CONFIG)

    def make_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**self.scheduler_config)

    def to(self, device=None, dtype=None) -> "SDComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self


def tiny_sd_components(seed: int = 0) -> SDComponents:
    """Random-weight SD1.x-family model with tiny widths (same block layout, 16 self-attention layers).

    The output of such a model is noise; it exists so the whole pipeline can run in seconds on a CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer with a character-level vocabulary and no merges (any text tokenises)."""
    from transformers import CLIPTokenizer

    chars = _byte_level_alphabet()
    vocab_tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(
            json.dumps({token: i for i, token in enumerate(vocab_tokens)}), encoding="utf-8"
        )
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token="<|endoftext|>", model_max_length=77)
    return tokenizer


def _byte_level_alphabet() -> list[str]:
    # GPT-2/CLIP byte-level BPE: every byte maps to one printable unicode character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
