"""``bench scene-model``: how good the scene model itself is, on held-out scenes.

- **VAE**: PSNR of encode (posterior mean) then decode;
- **round trip**: identity LoRA, DDIM inversion at a strength, then sampling back without a drag (the edit's
  reference branch), decoded; PSNR against the input;
- **samples**: a grid of pictures sampled from noise with DDIM, with the empty prompt and with captions.
"""

from __future__ import annotations

import statistics
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..images import prepare_image
from ..inversion import ddim_step, make_schedule, unet_noise_fn
from ..models import SDComponents, encode_prompt
from ..pipeline import DragPipeline, EditSettings
from ..scenes import random_scene
from .scene_metrics import psnr

#: Held-out scenes: the training scenes come from seed 0's stream.
HELD_OUT_SEED = 2000


def held_out_scenes(count: int, size: int, seed: int = HELD_OUT_SEED) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, size).render().image for _ in range(count)]


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(float(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).mean()))


def vae_psnr(components: SDComponents, count: int = 100, seed: int = HELD_OUT_SEED) -> list[float]:
    """Per scene PSNR (dB) of the VAE's reconstruction (posterior mean, as the edit encodes)."""
    vae = components.vae
    scores = []
    for scene in held_out_scenes(count, components.native_size, seed):
        pixels = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            decoded = vae.decode(vae.encode(pixels.to(vae.device)).latent_dist.mean).sample
        scores.append(image_psnr(scene, _to_uint8(decoded)))
    return scores


def round_trip_psnr(components: SDComponents, count: int = 10, strength: float = 0.7, lora_steps: int = 80,
                    device="cpu", seed: int = HELD_OUT_SEED,
                    progress: Optional[Callable[[int, int], None]] = None) -> list[float]:
    """Per scene PSNR (dB) of LoRA + inversion at ``strength`` + sampling back with no drag, against the input."""
    pipeline = DragPipeline(components, device=device, model_id="round-trip")
    settings = EditSettings(work_size=components.native_size, strength=strength, lora_steps=lora_steps)
    scores = []
    for number, scene in enumerate(held_out_scenes(count, components.native_size, seed + 1)):
        working = prepare_image(Image.fromarray(scene), settings.work_size)
        inversion = pipeline.invert(working, settings)
        reference = pipeline.reference(inversion, settings)
        decoded = pipeline.decode_latent(reference.reconstruction)
        scores.append(image_psnr(scene, np.asarray(working.restore(decoded).convert("RGB"))))
        pipeline.clear_cache()
        if progress is not None:
            progress(number + 1, count)
    return scores


@torch.no_grad()
def sample_from_noise(components: SDComponents, prompts: list[str], num_steps: int = 50, seed: int = 0,
                      device="cpu") -> list[np.ndarray]:
    """One DDIM sample (the full schedule, from pure noise) per prompt, as uint8 pictures."""
    unet = components.unet
    schedule = make_schedule(components.make_scheduler(), num_steps, strength=1.0)
    side = components.native_size // 8
    generator = torch.Generator().manual_seed(seed)
    pictures = []
    for prompt in prompts:
        noise_fn = unet_noise_fn(unet, encode_prompt(components, prompt, device=device))
        latent = torch.randn(1, unet.config.in_channels, side, side, generator=generator).to(device)
        for timestep in schedule.timesteps:
            latent = ddim_step(latent, noise_fn(latent, timestep), schedule, timestep, schedule.previous(timestep))
        decoded = components.vae.decode(latent / components.latent_scale).sample
        pictures.append(_to_uint8(decoded))
    return pictures


def grid(pictures: list[np.ndarray], columns: int) -> Image.Image:
    rows = [np.concatenate(pictures[i:i + columns], axis=1) for i in range(0, len(pictures), columns)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def measure_scene_model(components: SDComponents, scenes: int = 100, round_trips: int = 10, device="cpu",
                        grid_path=None, log: Callable[[str], None] = print) -> dict:
    """Every figure of ``docs/quality.md``'s model section; writes the sample grid to ``grid_path`` if given."""
    vae = vae_psnr(components, scenes)
    log(f"VAE reconstruction: mean PSNR {statistics.fmean(vae):.2f} dB on {scenes} held-out scenes")
    trips = round_trip_psnr(components, round_trips, device=device)
    log(f"round trip (LoRA, strength 0.7, no drag): mean PSNR {statistics.fmean(trips):.2f} dB")
    report = {"vae_psnr_mean": round(statistics.fmean(vae), 2), "vae_psnr_min": round(min(vae), 2),
              "round_trip_psnr_mean": round(statistics.fmean(trips), 2),
              "round_trip_psnr_min": round(min(trips), 2), "scenes": scenes, "round_trips": round_trips}
    if grid_path is not None:
        rng = np.random.default_rng(HELD_OUT_SEED + 7)
        captions = [random_scene(rng, components.native_size).caption() for _ in range(8)]
        pictures = sample_from_noise(components, [""] * 8 + captions, device=device)
        grid(pictures, 8).save(grid_path)
        report["grid"] = str(grid_path)
        report["grid_prompts"] = [""] * 8 + captions
    return report


def _to_uint8(decoded: torch.Tensor) -> np.ndarray:
    return ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
