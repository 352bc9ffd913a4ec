"""DDIM schedule, the shared deterministic DDIM step, DDIM inversion up to a chosen strength and plain sampling
back.

With ``num_steps`` = 50 and ``strength`` = 0.7 the image is inverted through the 35 smallest timesteps of the
50-step DDIM schedule (1, 21, ..., 681), and sampling later walks the same timesteps back down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import InputError
from .progress import ProgressFn, report


@dataclass(frozen=True)
class DDIMSchedule:
    """The part of a DDIM schedule an edit uses.

    Args:
        timesteps: sampling timesteps, descending, starting at the inverted timestep (e.g. 681, 661, ..., 1).
        alphas_cumprod: the model's cumulative alphas (1000 values), float64 on CPU.
        final_alpha_cumprod: alpha used "before" timestep 0 (SD1.5: alphas_cumprod[0], set_alpha_to_one off).
        step_ratio: timestep distance between two DDIM steps (1000 // num_steps).
    """

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    step_ratio: int

    @property
    def start_timestep(self) -> int:
        """The timestep of the inverted latent z_t (where the drag optimisation runs)."""
        return self.timesteps[0]

    def alpha(self, timestep: int) -> float:
        return float(self.alphas_cumprod[timestep]) if timestep >= 0 else self.final_alpha_cumprod

    def previous(self, timestep: int) -> int:
        return timestep - self.step_ratio


def make_schedule(scheduler, num_steps: int = 50, strength: float = 0.7) -> DDIMSchedule:
    """Build the schedule from a diffusers ``DDIMScheduler`` (SD1.5 settings).

    Args:
        scheduler: a diffusers DDIMScheduler; only its configuration is read.
        num_steps: DDIM steps of the full schedule (50).
        strength: fraction of the schedule to invert (0.7 -> 35 of 50 steps).
    """
    if not 0 < strength <= 1:
        raise InputError(f"inversion strength must be in (0, 1], got {strength}")
    if num_steps < 1:
        raise InputError(f"number of DDIM steps must be positive, got {num_steps}")
    inverted_steps = max(1, round(strength * num_steps))
    scheduler.set_timesteps(num_steps)
    timesteps = tuple(int(t) for t in scheduler.timesteps[num_steps - inverted_steps:])
    return DDIMSchedule(
        timesteps=timesteps,
        alphas_cumprod=scheduler.alphas_cumprod.double().cpu(),
        final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
        step_ratio=scheduler.config.num_train_timesteps // num_steps,
    )


def predict_clean(latent: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """x0 predicted from x_t and the predicted noise."""
    return (latent - (1 - alpha) ** 0.5 * noise) / alpha**0.5


def ddim_step(latent: torch.Tensor, noise: torch.Tensor, schedule: DDIMSchedule, t_from: int, t_to: int):
    """Deterministic DDIM move of ``latent`` from ``t_from`` to ``t_to`` with predicted ``noise``.

    The same formula serves sampling (t_to < t_from) and inversion (t_to > t_from).
    """
    return ddim_move(latent, noise, schedule.alpha(t_from), schedule.alpha(t_to))


def ddim_move(latent: torch.Tensor, noise: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """:func:`ddim_step` with the two cumulative alphas given (read from the schedule once rather than at each
    call: inside a step that is captured as a CUDA graph, nothing should be read from a tensor)."""
    clean = predict_clean(latent, noise, alpha_from)
    return alpha_to**0.5 * clean + (1 - alpha_to) ** 0.5 * noise


NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


def unet_noise_fn(unet, text_embeddings: torch.Tensor, uncond_embeddings=None, guidance_scale: float = 1.0) -> NoiseFn:
    """``noise(latent, t)`` with the UNet and fixed conditioning, computed in the UNet's dtype.

    Args:
        unet: the UNet.
        text_embeddings: [1, 77, D] prompt embeddings.
        uncond_embeddings: [1, 77, D] embeddings of the empty prompt, for classifier-free guidance.
        guidance_scale: 1 (default, as in both papers) means no guidance; above 1 the UNet runs on a batch of
            (unconditional, conditional) and the noise is ``u + scale * (c - u)``.
    """
    dtype = next(unet.parameters()).dtype
    guided = uncond_embeddings is not None and guidance_scale != 1.0

    def noise(latent: torch.Tensor, timestep: int) -> torch.Tensor:
        if not guided:
            embeddings = text_embeddings.to(dtype).expand(latent.shape[0], -1, -1)
            return unet(latent.to(dtype), timestep, encoder_hidden_states=embeddings).sample.to(latent.dtype)
        context = torch.cat([uncond_embeddings, text_embeddings]).to(dtype)
        both = unet(torch.cat([latent, latent]).to(dtype), timestep, encoder_hidden_states=context).sample
        unconditional, conditional = both.to(latent.dtype).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    return noise


@torch.no_grad()
def ddim_invert(
    noise_fn: NoiseFn, latent: torch.Tensor, schedule: DDIMSchedule, progress: ProgressFn = None
) -> torch.Tensor:
    """Invert a clean (scaled) latent up to ``schedule.start_timestep`` without guidance.

    Args:
        noise_fn: ``noise(latent, t)``, usually :func:`unet_noise_fn` with the identity LoRA active.
        latent: z_0, [1, 4, h, w], already multiplied by the VAE latent scale.
        schedule: from :func:`make_schedule`.
        progress: ``progress(step, total)`` callback.

    Returns:
        z_t at ``schedule.start_timestep``.
    """
    ascending = schedule.timesteps[::-1]
    for i, timestep in enumerate(ascending, start=1):
        latent = ddim_step(latent, noise_fn(latent, timestep), schedule, schedule.previous(timestep), timestep)
        report(progress, i, len(ascending))
    return latent



@torch.no_grad()
def ddim_sample(noise_fn: NoiseFn, latent: torch.Tensor, schedule: DDIMSchedule) -> torch.Tensor:
    """Plain deterministic DDIM sampling of z_t from ``schedule.start_timestep`` down to the clean latent (no
    reference branch, no guidance): the way back of :func:`ddim_invert`."""
    for timestep in schedule.timesteps:
        latent = ddim_step(latent, noise_fn(latent, timestep), schedule, timestep, schedule.previous(timestep))
    return latent
