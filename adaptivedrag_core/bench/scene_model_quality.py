"""``bench scene-model``: how good the scene model itself is, on held-out scenes.

- **VAE**: PSNR of encode (posterior mean) then decode;
- **round trip**: identity LoRA, DDIM inversion at a strength, then sampling back without a drag (the edit's
  reference branch), decoded; PSNR against the input;
- **feature tracking**: whether the drag's features (``up_blocks[2]`` at the inverted timestep) can find a dragged
  object where the ground truth put it, at several inversion strengths: the premise of motion supervision and
  point tracking, measured without any optimiser (:func:`feature_tracking`);
- **samples**: a grid of pictures sampled from noise with DDIM, with the empty prompt and with captions.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..features import make_feature_fn
from ..images import prepare_image
from ..inversion import ddim_invert, ddim_step, make_schedule, unet_noise_fn
from ..models import SDComponents, encode_prompt
from ..pipeline import DragPipeline, EditSettings
from ..scenes import make_cases, random_scene, scene_set
from .scene_metrics import psnr
from .scenes import DEFAULT_CASE_SEED

#: Held-out scenes: the training scenes come from seed 0's stream.
HELD_OUT_SEED = 2000
#: Inversion strengths at which :func:`feature_tracking` looks (0.7 is the papers').
TRACKING_STRENGTHS = (0.7, 0.5, 0.3)


def held_out_scenes(count: int, size: int, seed: int = HELD_OUT_SEED) -> list[np.ndarray]:
    return list(scene_set(seed, count, size)[0])


def image_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(float(((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2).mean()))


def vae_psnr(components: SDComponents, count: int = 100, seed: int = HELD_OUT_SEED) -> list[float]:
    """Per scene PSNR (dB) of the VAE's reconstruction (posterior mean, as the edit encodes)."""
    scores = []
    for scene in held_out_scenes(count, components.native_size, seed):
        with torch.no_grad():
            latent = _encode(components, scene, components.vae.device)
            decoded = components.vae.decode(latent / components.latent_scale).sample
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


def tracking_error(before: torch.Tensor, after: torch.Tensor, handles, targets, image_size: int) -> list[float]:
    """How far from each target the handle's feature is found in the moved scene's features, per drag length.

    Args:
        before, after: [1, D, H, W] feature maps of the scene and of its ground truth (the objects moved).
        handles, targets: (x, y) image pixels of each drag.
        image_size: the image side the points refer to (the maps may be smaller).

    Returns one figure per drag: the distance from the target to the ``after`` cell nearest (L2) to the handle's
    ``before`` feature, divided by the drag's length. 0 finds the object where it went; 1 is no better than not
    moving (the point stayed at its handle).
    """
    height, width = before.shape[-2:]
    scale_x, scale_y = width / image_size, height / image_size
    errors = []
    for (hx, hy), (tx, ty) in zip(handles, targets):
        column = min(width - 1, int(hx * scale_x))
        row = min(height - 1, int(hy * scale_y))
        query = before[0, :, row, column]
        distances = (after[0] - query[:, None, None]).pow(2).sum(0)
        found_row, found_column = divmod(int(distances.argmin()), width)
        found = ((found_column + 0.5) / scale_x, (found_row + 0.5) / scale_y)
        errors.append(math.hypot(found[0] - tx, found[1] - ty) / max(math.hypot(tx - hx, ty - hy), 1.0))
    return errors


@torch.no_grad()
def feature_tracking(components: SDComponents, cases: int = 12, strengths=TRACKING_STRENGTHS, device="cpu",
                     seed: int = DEFAULT_CASE_SEED) -> dict[float, list[float]]:
    """:func:`tracking_error` of every drag of ``cases`` held-out drag cases, per inversion strength.

    Each scene and its ground truth are encoded, DDIM-inverted to the strength's timestep (the empty prompt, no
    LoRA: the base model's features) and passed through the UNet to the drag's feature block, as the edit's
    defaults do (``EditSettings.feature_block``, ``feature_scale``). A model whose features cannot find the moved
    object cannot guide a drag to it, so this is a drag's precondition, measured in seconds.
    """
    defaults = EditSettings()
    size = components.native_size
    feature_side = round(size * defaults.feature_scale)
    embeddings = encode_prompt(components, "", device=device)
    noise_fn = unet_noise_fn(components.unet, embeddings)
    drag_cases = make_cases(cases, seed, size)
    latents = [(_encode(components, case.scene.render().image, device),
                _encode(components, case.ground_truth().render().image, device)) for case in drag_cases]
    errors = {}
    for strength in strengths:
        schedule = make_schedule(components.make_scheduler(), defaults.num_steps, strength)
        features = make_feature_fn(components.unet, embeddings, schedule, (feature_side, feature_side),
                                   defaults.feature_block, with_prediction=False)
        errors[strength] = []
        for case, (scene, moved) in zip(drag_cases, latents):
            before = features.features_only(ddim_invert(noise_fn, scene, schedule))
            after = features.features_only(ddim_invert(noise_fn, moved, schedule))
            errors[strength] += tracking_error(before, after, case.handles, case.targets, size)
    return errors


def _encode(components: SDComponents, picture: np.ndarray, device) -> torch.Tensor:
    pixels = torch.from_numpy(picture).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    return components.vae.encode(pixels).latent_dist.mean * components.latent_scale


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
                        grid_path=None, tracking_cases: int = 12, log: Callable[[str], None] = print) -> dict:
    """Every figure of ``docs/quality.md``'s model section; writes the sample grid to ``grid_path`` if given,
    first, since it is the quickest look at whether the model draws objects (a run cut short still has it)."""
    report = {}
    if grid_path is not None:
        rng = np.random.default_rng(HELD_OUT_SEED + 7)
        captions = [random_scene(rng, components.native_size).caption() for _ in range(8)]
        pictures = sample_from_noise(components, [""] * 8 + captions, device=device)
        grid(pictures, 8).save(grid_path)
        log(f"samples from noise: {grid_path}")
        report.update(grid=str(grid_path), grid_prompts=[""] * 8 + captions)
    vae = vae_psnr(components, scenes)
    log(f"VAE reconstruction: mean PSNR {statistics.fmean(vae):.2f} dB on {scenes} held-out scenes")
    trips = round_trip_psnr(components, round_trips, device=device)
    log(f"round trip (LoRA, strength 0.7, no drag): mean PSNR {statistics.fmean(trips):.2f} dB")
    report.update(vae_psnr_mean=round(statistics.fmean(vae), 2), vae_psnr_min=round(min(vae), 2),
                  round_trip_psnr_mean=round(statistics.fmean(trips), 2), round_trip_psnr_min=round(min(trips), 2),
                  scenes=scenes, round_trips=round_trips)
    if tracking_cases:
        tracking = feature_tracking(components, tracking_cases, device=device)
        report["tracking_cases"] = tracking_cases
        report["tracking_error"] = {}
        for strength, errors in tracking.items():
            median, mean = statistics.median(errors), statistics.fmean(errors)
            report["tracking_error"][str(strength)] = {"median": round(median, 3), "mean": round(mean, 3)}
            log(f"feature tracking at strength {strength}: error / drag length median {median:.2f}, mean {mean:.2f} "
                f"({len(errors)} drags; 0 finds the moved object, 1 is no better than not moving)")
    return report


def _to_uint8(decoded: torch.Tensor) -> np.ndarray:
    return ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
