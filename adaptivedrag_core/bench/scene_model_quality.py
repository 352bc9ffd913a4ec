"""``bench scene-model``: how good the scene model itself is, on held-out scenes.

- **VAE**: PSNR of encode (posterior mean) then decode;
- **round trip**: identity LoRA, DDIM inversion at a strength, then sampling back without a drag (the edit's
  reference branch), decoded; PSNR against the input;
- **feature tracking**: whether the drag's features (``up_blocks[2]`` at the inverted timestep) can find a dragged
  object where the ground truth put it, at several inversion strengths: the premise of motion supervision and
  point tracking, measured without any optimiser (:func:`feature_tracking`);
- **latent transplant**: whether the inverted latent carries a dragged object locally, so that content moved in
  z_t is drawn where it was moved: the premise of optimising z_t, measured without any optimiser
  (:func:`latent_transplant`);
- **samples**: a grid of pictures sampled from noise with DDIM, with the empty prompt and with captions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from ..features import make_feature_fn
from ..images import prepare_image
from ..inversion import ddim_invert, ddim_sample, make_schedule, unet_noise_fn
from ..models import SDComponents, encode_prompt
from ..pipeline import DragPipeline, EditSettings
from ..scenes import DragCase, make_cases, random_scene, scene_set
from .scene_metrics import psnr, score_case
from .scenes import DEFAULT_CASE_SEED

#: Held-out scenes: the training scenes come from seed 0's stream.
HELD_OUT_SEED = 2000
#: Inversion strengths at which :func:`feature_tracking` looks (0.7 is the papers').
TRACKING_STRENGTHS = (0.7, 0.5, 0.3)
#: Inversion strengths at which :func:`latent_transplant` looks (the first, the papers', is the one drawn).
TRANSPLANT_STRENGTHS = (0.7, 0.5)


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
    encoded = encoded_cases(components, cases, seed, device)
    errors = {}
    for strength in strengths:
        schedule = make_schedule(components.make_scheduler(), defaults.num_steps, strength)
        features = make_feature_fn(components.unet, embeddings, schedule, (feature_side, feature_side),
                                   defaults.feature_block, with_prediction=False)
        errors[strength] = []
        for case, scene, moved in encoded:
            before = features.features_only(ddim_invert(noise_fn, scene, schedule))
            after = features.features_only(ddim_invert(noise_fn, moved, schedule))
            errors[strength] += tracking_error(before, after, case.handles, case.targets, size)
    return errors


def encoded_cases(components: SDComponents, cases: int, seed: int, device
                  ) -> list[tuple[DragCase, torch.Tensor, torch.Tensor]]:
    """``cases`` held-out drag cases, each with the (scaled) latents of its scene and of its ground truth."""
    return [(case, _encode(components, case.scene.render().image, device),
             _encode(components, case.ground_truth().render().image, device))
            for case in make_cases(cases, seed, components.native_size)]


#: A drag's object counts as drawn at a place when found within this fraction of the drag's length of it.
PLACE_TOLERANCE = 0.25


@dataclass(frozen=True)
class TransplantScores:
    """What :func:`latent_transplant` finds, per drag (``md_per_drag``, ``halfway_kept``) or per case (``iou``).

    Args:
        md_per_drag: MD of the whole transplant divided by the drag's length (0: drawn at the target; 1: left
            where it was).
        iou: of the moved objects' footprints at their targets, whole transplant (1: drawn there whole).
        halfway_kept: whether the half-way latent draws the object whole at its start or at its target (within
            :data:`PLACE_TOLERANCE` of the drag's length); False means it is drawn nowhere near either.
        pictures: per case, the row [scene, whole transplant, half-way latent, ground truth] ([S, S, 3] uint8 each).
    """

    md_per_drag: list
    iou: list
    halfway_kept: list
    pictures: list


@torch.no_grad()
def latent_transplant(components: SDComponents, cases: int = 8, strengths=TRANSPLANT_STRENGTHS, device="cpu",
                      seed: int = DEFAULT_CASE_SEED) -> dict[float, TransplantScores]:
    """Move each dragged object in the inverted latent by hand, sample back, and score where it is drawn.

    Each case's scene and its ground truth (the objects moved) are encoded and DDIM-inverted to the strength's
    timestep (the empty prompt, no LoRA: the base model). The scene's z_t takes the ground truth's z_t on the
    latent cells under the moved objects' old and new footprints (:func:`moved_cells`) and keeps its own
    everywhere else; it is sampled back with DDIM, decoded, and scored like an edit
    (:func:`~adaptivedrag_core.bench.scene_metrics.score_case`), from the picture only.

    That latent is about the best a drag can reach: the object's content at the target and the background where
    it was, nothing else changed. Drag methods optimise z_t and expect the sampler to draw what they moved in it
    where they moved it; if this hand-made move is not drawn at the target, the latent does not carry the picture
    locally and no optimiser will move the object (the model's fault). If it is drawn and a drag still fails, the
    optimiser did not reach such a latent (the method's, or features it can match without moving anything).

    An optimiser moves z_t a little at a time, so the sampler also meets latents part of the way there. The
    half-way latent mixes the two on those cells with equal weights that keep the noise's variance (cos and sin
    of 45 degrees); a model with a strong prior draws the object whole somewhere (where it was, or where it
    went), one that erases it there will erase it during a drag too (``halfway_kept``).
    """
    noise_fn = unet_noise_fn(components.unet, encode_prompt(components, "", device=device))
    encoded = encoded_cases(components, cases, seed, device)
    cells_of = [torch.from_numpy(moved_cells(case, scene.shape[-1])).to(device) for case, scene, _ in encoded]
    scores = {}
    for strength in strengths:
        schedule = make_schedule(components.make_scheduler(), EditSettings().num_steps, strength)
        scores[strength] = TransplantScores([], [], [], [])
        for (case, scene, moved), cells in zip(encoded, cells_of):
            start, end = ddim_invert(noise_fn, scene, schedule), ddim_invert(noise_fn, moved, schedule)
            whole_picture = _sample_picture(components, noise_fn, schedule, torch.where(cells, end, start))
            half_picture = _sample_picture(components, noise_fn, schedule,
                                           torch.where(cells, (start + end) * math.sqrt(0.5), start))
            whole, half = score_case(case, whole_picture), score_case(case, half_picture)
            for found, target, length in zip(whole.found, case.targets, case.drag_lengths()):
                scores[strength].md_per_drag.append(math.dist(found, target) / max(length, 1.0))
            scores[strength].halfway_kept.extend(drawn_at_start_or_target(case, half.found))
            scores[strength].iou.append(whole.iou)
            scores[strength].pictures.append([case.scene.render().image, whole_picture, half_picture,
                                              case.ground_truth().render().image])
    return scores


def drawn_at_start_or_target(case: DragCase, found) -> list[bool]:
    """Per drag, whether the object ``found`` (where :func:`score_case` found it) is at its start or its target,
    within :data:`PLACE_TOLERANCE` of the drag's length."""
    return [min(math.dist(position, handle), math.dist(position, target)) <= PLACE_TOLERANCE * length
            for position, handle, target, length in zip(found, case.handles, case.targets, case.drag_lengths())]


def _sample_picture(components: SDComponents, noise_fn, schedule, latent: torch.Tensor) -> np.ndarray:
    decoded = components.vae.decode(ddim_sample(noise_fn, latent, schedule) / components.latent_scale)
    return _to_uint8(decoded.sample)


def moved_cells(case: DragCase, side: int) -> np.ndarray:
    """[side, side] bool: the latent cells that any moved object's footprint touches, before or after its move."""
    before, after = case.scene.render(), case.ground_truth().render()
    cell = case.scene.size // side
    pixels = np.zeros((case.scene.size, case.scene.size), bool)
    for index in case.moved:
        pixels |= before.footprint(index) | after.footprint(index)
    return pixels.reshape(side, cell, side, cell).any(axis=(1, 3))


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
        pictures.append(_sample_picture(components, noise_fn, schedule, latent))
    return pictures


def grid(pictures: list[np.ndarray], columns: int) -> Image.Image:
    rows = [np.concatenate(pictures[i:i + columns], axis=1) for i in range(0, len(pictures), columns)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def measure_scene_model(components: SDComponents, scenes: int = 100, round_trips: int = 10, device="cpu",
                        grid_path=None, tracking_cases: int = 12, transplant_cases: int = 8,
                        transplant_grid_path=None, log: Callable[[str], None] = print) -> dict:
    """Every figure of ``docs/quality.md``'s model section; writes the sample grid to ``grid_path`` if given,
    first, since it is the quickest look at whether the model draws objects (a run cut short still has it), and
    the latent transplant's pictures at the papers' strength to ``transplant_grid_path`` if given."""
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
    if transplant_cases:
        report["transplant_cases"] = transplant_cases
        report["latent_transplant"] = {}
        transplants = latent_transplant(components, transplant_cases, device=device)
        if transplant_grid_path is not None:
            rows = transplants[TRANSPLANT_STRENGTHS[0]].pictures
            grid([picture for row in rows for picture in row], 4).save(transplant_grid_path)
            log(f"latent transplant pictures (scene, transplant, half-way, truth): {transplant_grid_path}")
            report["transplant_grid"] = str(transplant_grid_path)
        for strength, scores in transplants.items():
            median, iou = statistics.median(scores.md_per_drag), statistics.fmean(scores.iou)
            kept = sum(scores.halfway_kept)
            report["latent_transplant"][str(strength)] = {"md_per_drag_median": round(median, 3),
                                                          "iou_mean": round(iou, 3), "halfway_kept": kept,
                                                          "drags": len(scores.halfway_kept)}
            log(f"latent transplant at strength {strength}: MD / drag median {median:.2f}, IoU mean {iou:.2f} "
                f"({len(scores.md_per_drag)} drags; MD / drag 0 with IoU 1: drawn at the target; MD / drag 1 with "
                f"IoU 0: left where it was); half-way, the object is drawn at its start or its target in {kept} "
                f"of {len(scores.halfway_kept)} drags (the others erase it)")
    return report


def _to_uint8(decoded: torch.Tensor) -> np.ndarray:
    return ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
