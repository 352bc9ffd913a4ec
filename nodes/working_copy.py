"""Encode Working Copy: the image resized to the working size and VAE-encoded, as the command line edits it.

The later nodes take the points and masks in the input image's pixels and map them onto the working copy; the
CLoss Sampler gives the result back at the input's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from adaptivedrag_core.images import resize_rgb, working_size

from .bridge import comfy_image, image_array, image_size, vae_encode
from .spec import InputSpec, NodeResult, NodeSpec, OutputSpec

# The LATENT dict key that carries the WorkingCopy beside ComfyUI's "samples".
WORKING_COPY_KEY = "adaptivedrag_working_copy"
DEFAULT_WORK_SIZE = 512


@dataclass(frozen=True)
class WorkingCopy:
    """The input image and the size it is edited at.

    Args:
        original: the input's first image, IMAGE [1, H, W, 3] on the CPU (the sampler's preview draws on it).
        size: (width, height) of the working copy, multiples of 8.
    """

    original: torch.Tensor
    size: tuple[int, int]

    @property
    def original_size(self) -> tuple[int, int]:
        return image_size(self.original)

    def restore(self, image: torch.Tensor) -> torch.Tensor:
        """An IMAGE [1, h, w, 3] of the working copy back at the input's size (Lanczos, as the command line)."""
        return comfy_image(resize_rgb(image_array(image), *self.original_size))


def working_copy_of(latent: dict) -> Optional[WorkingCopy]:
    """The WorkingCopy a LATENT from Encode Working Copy carries; None for one from VAE Encode."""
    copy = latent.get(WORKING_COPY_KEY) if isinstance(latent, dict) else None
    return copy if isinstance(copy, WorkingCopy) else None


def encode_working_copy(image: torch.Tensor, vae, work_size: int = DEFAULT_WORK_SIZE) -> NodeResult:
    """Resize ``image`` so its longer side is ``work_size`` (sides multiples of 8) and encode it.

    Args:
        image: ComfyUI IMAGE; its first image is used.
        vae: ComfyUI VAE (Load Checkpoint's).
        work_size: longer side of the working copy (512, SD1.5's native size).

    Returns:
        LATENT of the working copy (unscaled, like VAE Encode's) that also carries the input image and the
        working size, for the nodes after it.
    """
    pixels = image_array(image)
    height, width = pixels.shape[:2]
    size = working_size(width, height, work_size)
    samples = vae_encode(vae, comfy_image(resize_rgb(pixels, *size)))
    copy = WorkingCopy(image[:1, ..., :3].detach().float().cpu(), size)
    note = f"working copy {size[0]}x{size[1]} of the {width}x{height} input"
    return NodeResult(({"samples": samples, WORKING_COPY_KEY: copy},), notes=[note])


SPEC = NodeSpec(
    node_id="AdaptiveDrag_EncodeWorkingCopy",
    display_name="Encode Working Copy (AdaptiveDrag)",
    description="VAE-encodes the image at the working size (longer side 512 by default, SD1.5's own), as the "
                "command line does. The AdaptiveDrag nodes after it map points and masks onto it, and the CLoss "
                "Sampler gives the result back at the input's size. Use it instead of VAE Encode.",
    inputs=(
        InputSpec("image", "IMAGE", "The image to edit (the one Drag Points shows), at any size."),
        InputSpec("vae", "VAE", "The VAE of the SD1.x checkpoint."),
        InputSpec("work_size", "INT", "Longer side of the working copy in pixels (512: SD1.5's native size; "
                  "larger costs memory and time, and SD1.5 does worse far from 512).", default=DEFAULT_WORK_SIZE,
                  min=64, max=2048, step=8),
    ),
    outputs=(OutputSpec("latent", "LATENT", "The working copy's latent, for Identity LoRA and DDIM Inversion."),),
    run=encode_working_copy,
)
