"""UNet decoder features for the drag optimisation.

DragDiffusion supervises motion on the output of ``up_blocks[2]`` (diffusers numbering), bilinearly resized to
half the image size (256x256 for a 512 image). When a mask is used, the loss also needs the latent one DDIM step
later, x_{t-1}, which needs the full UNet; without a mask the UNet stops right after the feature block.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .inversion import DDIMSchedule, ddim_step


class _FeaturesReady(Exception):
    """Raised by the forward hook to skip the decoder blocks the loss does not use."""


def make_feature_fn(
    unet,
    text_embeddings: torch.Tensor,
    schedule: DDIMSchedule,
    feature_size: tuple[int, int],
    block_index: int = 2,
    with_prediction: bool = True,
) -> Callable[[torch.Tensor], object]:
    """Build ``feature_fn(latent)`` for :func:`adaptivedrag_core.drag.drag` at the inverted timestep.

    Args:
        unet: the UNet (with the identity LoRA active while the function is used).
        text_embeddings: [1, 77, D] conditioning.
        schedule: the edit's DDIM schedule; features are taken at ``schedule.start_timestep``.
        feature_size: (width, height) of the feature map handed to the optimiser.
        block_index: which ``unet.up_blocks`` output to use (2 in DragDiffusion).
        with_prediction: also return x_{t-1} for the mask term (runs the whole UNet).

    Returns:
        ``latent -> features [1, D, H, W]`` or ``latent -> (features, x_{t-1})``.
    """
    timestep = schedule.start_timestep
    dtype = next(unet.parameters()).dtype
    width, height = feature_size
    captured = {}

    def hook(_module, _inputs, output):
        captured["features"] = output
        if not with_prediction:
            raise _FeaturesReady

    def feature_fn(latent: torch.Tensor):
        handle = unet.up_blocks[block_index].register_forward_hook(hook)
        # A fresh copy per call: the embeddings may be inference tensors (ComfyUI), which autograd cannot save.
        context = text_embeddings.to(dtype).clone()
        try:
            noise = unet(latent.to(dtype), timestep, encoder_hidden_states=context).sample
        except _FeaturesReady:
            noise = None
        finally:
            handle.remove()
        features = F.interpolate(captured.pop("features").float(), size=(height, width), mode="bilinear",
                                 align_corners=False)
        if noise is None:
            return features
        return features, ddim_step(latent, noise.to(latent.dtype), schedule, timestep, schedule.previous(timestep))

    return feature_fn
