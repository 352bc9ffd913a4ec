"""Images in and out of the pipeline.

Any mode and any size is accepted. The edit runs on a *working copy*:

1. the image is converted to RGB (an alpha channel is kept aside, grayscale is remembered);
2. it is resized so its longer side is ``work_size`` (512 by default, SD1.5's native size) and both sides are
   rounded to a multiple of 8, since the VAE works in 8x8 pixel cells;
3. after the edit the result is resized back to the input's exact size (Lanczos), the alpha channel is put back
   and the original mode is restored.

Points are mapped to the working copy with ``DragPoints.rescaled`` and masks/label maps with
:func:`resize_labels`, so every input stays aligned with the same content.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError


def load_image(path) -> Image.Image:
    """Open an image file fully, or raise InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def load_mask(path, width: int, height: int) -> np.ndarray:
    """A user mask file as bool [H, W] (True = may change); it must have the image's size."""
    mask_image = load_image(path)
    if mask_image.size != (width, height):
        raise InputError(
            f"mask {path} is {mask_image.width}x{mask_image.height} but the image is {width}x{height}"
        )
    return np.asarray(mask_image.convert("L")) > 127


def working_size(width: int, height: int, work_size: int) -> tuple[int, int]:
    """The (width, height) the edit runs at: longer side ``work_size``, both sides multiples of 8."""
    scale = work_size / max(width, height)
    return (max(8, int(round(width * scale / 8)) * 8), max(8, int(round(height * scale / 8)) * 8))


@dataclass
class WorkingImage:
    """An input image prepared for the pipeline, with what is needed to restore the result.

    Args:
        pixels: RGB at working size, float tensor [1, 3, H, W] in [-1, 1].
        original_size: (width, height) of the input.
        original_mode: PIL mode of the input.
        alpha: the input's alpha channel (PIL "L" image at input size), or None.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    original_mode: str
    alpha: Optional[Image.Image]

    @property
    def size(self) -> tuple[int, int]:
        return (self.pixels.shape[-1], self.pixels.shape[-2])

    def restore(self, pixels: torch.Tensor) -> Image.Image:
        """Turn a decoded [1, 3, H, W] tensor in [-1, 1] back into an image shaped like the input."""
        result = tensor_to_pil(pixels).resize(self.original_size, Image.LANCZOS)
        if self.original_mode in ("L", "LA", "I", "I;16", "F", "1"):
            result = result.convert("L")
        if self.alpha is not None:
            result.putalpha(self.alpha)
        return result


def prepare_image(image: Image.Image, work_size: int = 512) -> WorkingImage:
    """Convert any PIL image into a :class:`WorkingImage` (see the module docstring)."""
    if work_size < 8:
        raise InputError(f"work size must be at least 8 pixels, got {work_size}")
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    if image.mode == "P" and "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
    rgb = image.convert("RGB")
    rgb = rgb.resize(working_size(rgb.width, rgb.height, work_size), Image.LANCZOS)
    return WorkingImage(pil_to_tensor(rgb), image.size, image.mode, alpha)


def resize_rgb(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """RGB uint8 [H, W, 3] at (width, height), Lanczos as the working copy and its restore use; unchanged when
    it has that size already. For callers that hold arrays (the ComfyUI nodes)."""
    if pixels.shape[:2] == (height, width):
        return pixels
    return np.asarray(Image.fromarray(pixels, "RGB").resize((width, height), Image.LANCZOS))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(pixels: torch.Tensor) -> Image.Image:
    array = ((pixels[0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")


def resize_labels(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of a mask or label map to (width, height), pixel-centre aligned.

    One function for masks and superpixel labels, so both land on exactly the same grid cells.
    """
    labels = np.asarray(labels)
    src_h, src_w = labels.shape
    ys = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.int64), src_h - 1)
    xs = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.int64), src_w - 1)
    return labels[ys[:, None], xs[None, :]]
