"""UNet decoder features for the drag optimisation.

DragDiffusion supervises motion on the output of ``up_blocks[2]`` (diffusers numbering), bilinearly resized to
half the image size (256x256 for a 512 image). When a mask is used, the loss also needs the latent one DDIM step
later, x_{t-1}, which needs the full UNet; without a mask the UNet stops right after the feature block.

The UNet is stopped without an exception or a conditional jump: for that one call the decoder blocks after the
feature block, and the output layers, are swapped for pass-throughs (:func:`decoder_stops_after`). So a call is
the same fixed sequence of kernels every time, which a CUDA graph can capture, and the timestep is a device
tensor made once (diffusers would copy a Python int to the device, and wait for it, on every call).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F

from .drag.common import DragStart
from .inversion import DDIMSchedule, ddim_move


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder block after the feature block: hands its input on unchanged.

    It has the block's ``resnets`` count, which the UNet's forward uses to hand each block its skip connections.
    """

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.resnets = [None] * len(block.resnets)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def decoder_stops_after(unet, block_index: int):
    """Make ``unet``'s output the output of ``up_blocks[block_index]`` inside the ``with`` block.

    The later decoder blocks and the output norm and convolution are swapped for pass-throughs, and put back on
    exit (also on an exception). The blocks up to ``block_index`` run exactly as in the whole UNet.
    """
    blocks = unet.up_blocks
    later = {index: blocks[index] for index in range(block_index + 1, len(blocks))}
    outputs = (unet.conv_norm_out, unet.conv_act, unet.conv_out)
    try:
        for index, block in later.items():
            blocks[index] = _PassThrough(block)
        unet.conv_norm_out, unet.conv_act, unet.conv_out = None, None, torch.nn.Identity()
        yield unet
    finally:
        for index, block in later.items():
            blocks[index] = block
        unet.conv_norm_out, unet.conv_act, unet.conv_out = outputs


class UNetFeatures:
    """``feature_fn(latent)`` for :func:`adaptivedrag_core.drag.drag`: the UNet's decoder features at the inverted
    timestep, and x_{t-1} for the mask term.

    Args:
        unet: the UNet (with the identity LoRA active while the function is used).
        text_embeddings: [1, 77, D] conditioning.
        schedule: the edit's DDIM schedule; features are taken at ``schedule.start_timestep``.
        feature_size: (width, height) of the feature map handed to the optimiser.
        block_index: which ``unet.up_blocks`` output to use (2 in DragDiffusion).
        with_prediction: also return x_{t-1} for the mask term (runs the whole UNet).

    Calling it returns ``features [1, D, H, W]`` (float32), or ``(features, x_{t-1})`` with ``with_prediction``.
    """

    def __init__(self, unet, text_embeddings: torch.Tensor, schedule: DDIMSchedule, feature_size: tuple[int, int],
                 block_index: int = 2, with_prediction: bool = True):
        self.unet = unet
        self.text_embeddings = text_embeddings
        self.feature_size = feature_size
        self.block_index = block_index
        self.with_prediction = with_prediction
        parameter = next(unet.parameters())
        self.dtype = parameter.dtype
        timestep = schedule.start_timestep
        self.alphas = (schedule.alpha(timestep), schedule.alpha(schedule.previous(timestep)))  # for x_{t-1}
        # An ordinary tensor even under inference mode (ComfyUI), so autograd may use it.
        with torch.inference_mode(False):
            self.timestep = torch.full((1,), timestep, dtype=torch.int64, device=parameter.device)

    def __call__(self, latent: torch.Tensor):
        block_output, prediction = self.block_output(latent, self.with_prediction)
        features = self.resize(block_output)
        return features if prediction is None else (features, prediction)

    def features_only(self, latent: torch.Tensor) -> torch.Tensor:
        """The features alone: the UNet stops after the feature block, whatever ``with_prediction`` says."""
        return self.resize(self.block_output(latent, False)[0])

    def block_output(self, latent: torch.Tensor, with_prediction: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the feature block's output at its own resolution, in the UNet's dtype; x_{t-1} or None)."""
        # A fresh copy per call: the embeddings may be inference tensors (ComfyUI), which autograd cannot save.
        context = self.text_embeddings.to(self.dtype).clone()
        if not with_prediction:
            with decoder_stops_after(self.unet, self.block_index):
                return self.unet(latent.to(self.dtype), self.timestep, encoder_hidden_states=context).sample, None
        captured = {}
        block = self.unet.up_blocks[self.block_index]
        handle = block.register_forward_hook(lambda _module, _inputs, output: captured.update(features=output))
        try:
            noise = self.unet(latent.to(self.dtype), self.timestep, encoder_hidden_states=context).sample
        finally:
            handle.remove()
        return captured["features"], ddim_move(latent, noise.to(latent.dtype), *self.alphas)

    def resize(self, block_output: torch.Tensor) -> torch.Tensor:
        """The feature block's output as the optimiser's float32 feature map (bilinear, to ``feature_size``)."""
        width, height = self.feature_size
        return F.interpolate(block_output.float(), size=(height, width), mode="bilinear", align_corners=False)


#: What a drag starts from, kept compact (:func:`compact_drag_start`): the feature block's output at its own
#: resolution, and x_{t-1} for the mask term (None without one).
CompactStart = tuple[torch.Tensor, Optional[torch.Tensor]]


def compact_drag_start(feature_fn: UNetFeatures, latent: torch.Tensor) -> CompactStart:
    """The drag's starting point at ``latent``, for a cache: one feature-function call without autograd, its
    features kept at the feature block's resolution (640x64x64 in fp16 at 512 px, 5 MiB, not the 640x256x256
    float32 map the drag compares, 160 MiB). Call it with the identity LoRA active, as the drag runs."""
    with torch.inference_mode(False), torch.no_grad():
        return feature_fn.block_output(latent, feature_fn.with_prediction)


def drag_start_from(feature_fn: UNetFeatures, compact: CompactStart, latent: torch.Tensor) -> DragStart:
    """The :class:`~adaptivedrag_core.drag.DragStart` of ``latent`` from its :func:`compact_drag_start` (on any
    device: it is moved to the latent's), resized as the feature function resizes."""
    block_output, prediction = compact
    with torch.inference_mode(False), torch.no_grad():
        features = feature_fn.resize(block_output.to(latent.device))
        return DragStart(features, latent.clone() if prediction is None else prediction.to(latent.device))


def make_feature_fn(
    unet,
    text_embeddings: torch.Tensor,
    schedule: DDIMSchedule,
    feature_size: tuple[int, int],
    block_index: int = 2,
    with_prediction: bool = True,
) -> UNetFeatures:
    """Build ``feature_fn(latent)`` for :func:`adaptivedrag_core.drag.drag` at the inverted timestep: a
    :class:`UNetFeatures` (its docstring lists the arguments); its ``features_only(latent)`` stops after the
    feature block whatever ``with_prediction`` says."""
    return UNetFeatures(unet, text_embeddings, schedule, feature_size, block_index, with_prediction)
