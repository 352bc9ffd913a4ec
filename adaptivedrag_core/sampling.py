"""DDIM sampling of the dragged latent with reference-latent control and the correspondence loss (CLoss).

1. The reference branch (the un-dragged z_t) is denoised once while its self-attention keys/values are recorded
   (:mod:`reference`). Its result is also the plain reconstruction of the input.
2. The dragged z_t is denoised with those keys/values replayed. With CLoss on, at each step the predicted clean
   latent's patch around every target is pulled toward the original latent's patch around the matching handle,
   by one Adam step on the current latent (AdaptiveDrag, "correspondence sample"). The noise predicted before
   that update is reused for the DDIM step, so CLoss costs one backward pass per step and no extra forward.

   The Adam step changes only the latent near the targets (CLoss's footprint dilated by ``region_margin``) and,
   when a mask is given, inside it: Adam moves every element it is given by about lr on its first step,
   whatever the gradient, so unconfined it would change the whole latent. The backward pass is loss-scaled for
   a float16 UNet (:class:`~adaptivedrag_core.drag.common.LossScaler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .drag.closs import DEFAULT_CLOSS_KIND, closs_region, correspondence_loss, footprint_radius
from .drag.common import LatentAdam, usable_mask
from .graphs import NoiseStep
from .inversion import DDIMSchedule, ddim_step, predict_clean, unet_noise_fn
from .progress import ProgressFn, report
from .reference import ReferenceRecording, reference_control


@dataclass(frozen=True)
class CLossSettings:
    """Correspondence-loss settings.

    Args:
        weight: scales CLoss's step size, lr x weight (Adam ignores a loss's scale, so weighting the loss itself
            would change nothing); 0 disables it.
        kind: "mse" (public code, the default) or "contrastive" (the paper's symmetric cross-entropy on cosine
            similarities); see :mod:`.drag.closs` for why.
        patch_radius: half-size of the latent patches compared (5 -> 11x11, as in the public code).
        lr: Adam learning rate on the current latent (0.01).
        steps: apply during the first ``steps`` sampling steps (None: every step).
        region_margin: latent pixels added around CLoss's footprint at each target; only that square (and the
            mask, if any) may change (2).
    """

    weight: float = 1.0
    kind: str = DEFAULT_CLOSS_KIND
    patch_radius: int = 5
    lr: float = 0.01
    steps: Optional[int] = None
    region_margin: int = 2

    def region(self, shape, targets, mask: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
        """The [h,w] bool latent positions this CLoss may change (see the module docstring)."""
        radius = footprint_radius(self.kind, self.patch_radius) + self.region_margin
        return closs_region(shape, targets, radius, mask, device)


@dataclass
class ReferenceBranch:
    """What the reference pass produces: the recorded keys/values and the reconstructed clean latent."""

    recording: ReferenceRecording
    reconstruction: torch.Tensor

    def to(self, device) -> "ReferenceBranch":
        """A copy on ``device`` (or this branch, if it is there already)."""
        if self.reconstruction.device == torch.device(device):
            return self
        moved = {slot: (k.to(device), v.to(device)) for slot, (k, v) in self.recording.keys_values.items()}
        return ReferenceBranch(ReferenceRecording(moved), self.reconstruction.to(device))


def _timesteps(schedule: DDIMSchedule):
    return [(i, t, schedule.previous(t)) for i, t in enumerate(schedule.timesteps)]


def record_reference(
    unet, text_embeddings, schedule: DDIMSchedule, inverted_latent: torch.Tensor, start_layer: int = 10,
    start_step: int = 0, progress: ProgressFn = None, uncond_embeddings=None, guidance_scale: float = 1.0,
) -> ReferenceBranch:
    """Denoise the un-dragged latent, recording the self-attention keys/values the edited branch will use.

    Runs outside inference mode so the recording can later take part in CLoss's backward pass. The edited branch
    must be sampled with the same guidance (its attention calls must match the recorded ones).
    """
    recording = ReferenceRecording()
    with torch.inference_mode(False), torch.no_grad(), reference_control(
        unet, recording, start_layer, start_step
    ) as control:
        noise_fn = _noise_fn(unet, text_embeddings, uncond_embeddings, guidance_scale)
        latent = inverted_latent.clone()
        control.mode = "record"
        for i, t, t_prev in _timesteps(schedule):
            control.step = i
            latent = ddim_step(latent, noise_fn(latent, t), schedule, t, t_prev)
            report(progress, i + 1, len(schedule.timesteps))
    return ReferenceBranch(recording, latent)


def sample_dragged(
    unet,
    text_embeddings: torch.Tensor,
    schedule: DDIMSchedule,
    dragged_latent: torch.Tensor,
    reference: ReferenceBranch,
    start_layer: int = 10,
    start_step: int = 0,
    closs: Optional[CLossSettings] = None,
    original_latent: Optional[torch.Tensor] = None,
    handles: Sequence[tuple[float, float]] = (),
    targets: Sequence[tuple[float, float]] = (),
    progress: ProgressFn = None,
    uncond_embeddings=None,
    guidance_scale: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    graphs=None,
) -> torch.Tensor:
    """Denoise the dragged z_t to z_0 with the reference keys/values replayed, optionally with CLoss.

    Args:
        unet, text_embeddings, schedule: as for the inversion.
        dragged_latent: the optimised z_t.
        reference: from :func:`record_reference` with the same unet, conditioning, schedule and layers.
        start_layer, start_step: where reference control starts (must match the recording).
        closs: CLoss settings, or None for none.
        original_latent: the input's clean latent z_0 (needed by CLoss).
        handles, targets: points in latent-grid pixels (needed by CLoss).
        progress: ``progress(step, total)``.
        uncond_embeddings, guidance_scale: classifier-free guidance (off at scale 1); as for the recording.
        mask: None or [h,w] bool on the latent grid, True = may change: CLoss changes nothing outside it. An
            empty mask counts as none (``EmptyMaskWarning``).
        graphs: a :class:`~adaptivedrag_core.graphs.StepGraphs`: the UNet calls run as capture-ready steps
            (:class:`~adaptivedrag_core.graphs.NoiseStep`), replayed from CUDA graphs when it is enabled.
    Returns:
        z_0, in ``dragged_latent``'s dtype.
    """
    use_closs = closs is not None and closs.weight > 0
    if use_closs and (original_latent is None or not handles):
        raise ValueError("CLoss needs the original latent and the handle/target points")
    with torch.inference_mode(False), reference_control(unet, reference.recording, start_layer, start_step) as control:
        noise_fn = _noise_fn(unet, text_embeddings, uncond_embeddings, guidance_scale)
        if graphs is not None:
            noise_fn = NoiseStep(noise_fn, graphs, "sampling", control)
        latent = dragged_latent.detach().clone()
        if use_closs:
            original_latent = original_latent.clone()
            # On the device once: a copy of Python data to a GPU waits for it, at every step otherwise.
            handles, targets = (torch.as_tensor(points, dtype=torch.float32, device=latent.device).reshape(-1, 2)
                                for points in (handles, targets))
            optimizer = _closs_optimizer(latent, unet, closs, targets, mask)
            latent = optimizer.latent
        control.mode = "replay"
        for i, t, t_prev in _timesteps(schedule):
            control.step = i
            if use_closs and (closs.steps is None or i < closs.steps):
                noise = _closs_update(noise_fn, t, schedule, optimizer, closs, original_latent, handles, targets)
            else:
                with torch.no_grad():
                    noise = noise_fn(latent, t)
            with torch.no_grad():
                latent.copy_(ddim_step(latent, noise, schedule, t, t_prev))
            report(progress, i + 1, len(schedule.timesteps))
    return latent.detach().to(dragged_latent.dtype)


def _noise_fn(unet, text_embeddings, uncond_embeddings, guidance_scale):
    # Clones made outside inference mode are ordinary tensors, which autograd can save (ComfyUI runs nodes
    # under inference mode).
    uncond = None if uncond_embeddings is None else uncond_embeddings.clone()
    return unet_noise_fn(unet, text_embeddings.clone(), uncond, guidance_scale)


def _closs_optimizer(latent: torch.Tensor, unet, closs: CLossSettings, targets, mask):
    """Adam on (a float32 copy of) the latent for CLoss, confined to its region, loss-scaled for a float16 UNet."""
    region = closs.region(latent.shape[-2:], targets, usable_mask(mask), latent.device)
    return LatentAdam(latent, closs.lr * closs.weight, next(unet.parameters()).dtype, region)


def _closs_update(noise_fn, timestep, schedule, optimizer, closs, original_latent, handles, targets):
    """One Adam step of CLoss on ``optimizer.latent`` (in place); returns the noise predicted before the step."""
    latent = optimizer.latent
    with torch.enable_grad():
        noise = noise_fn(latent, timestep)
        clean = predict_clean(latent, noise, schedule.alpha(timestep))
        loss = correspondence_loss(
            clean, original_latent, handles, targets, kind=closs.kind, patch_radius=closs.patch_radius
        )
        optimizer.step(loss)
    return noise.detach()
