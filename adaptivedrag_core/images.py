"""Images in and out of the pipeline.

Any mode and any size is accepted. Files are read upright: a photo's EXIF orientation is applied, so points are
given on the picture as a viewer shows it. The edit runs on a *working copy*:

1. the image is converted to RGB (an alpha channel is kept aside; grayscale of 16 bits or more is read on its
   full range, see :data:`GRAY_FULL_SCALE`);
2. it is resized so its longer side is ``work_size`` (512 by default, SD1.5's native size) and both sides are
   rounded to a multiple of 8, since the VAE works in 8x8 pixel cells;
3. after the edit the result is resized back to the input's exact size (Lanczos), the alpha channel is put back
   and the original mode is restored: a palette image gets its own palette back, 16-bit grayscale stays 16-bit.
   A palette image with transparency comes back as RGBA.

Points are mapped to the working copy with ``DragPoints.rescaled`` and masks/label maps with
:func:`resize_labels`, so every input stays aligned with the same content.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import InputError


def sample_image_path() -> Path:
    """The bundled sample picture (the demo's input, and the benchmarks')."""
    return Path(str(resources.files("adaptivedrag_core") / "assets" / "sample.png"))


#: The value of white in each grayscale mode. 16-bit files (and 32-bit integer images, which Pillow also gives
#: for them) span 0..65535; float images use Pillow's own 0..255 scale.
GRAY_FULL_SCALE = {"L": 255, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 255}
#: Grayscale modes deeper than 8 bits, which Pillow's own conversions to L and RGB clip at 255.
HIGH_BIT_MODES = frozenset(GRAY_FULL_SCALE) - {"L"}
#: Modes with an alpha channel ("A" is also LAB's second channel, so the band names cannot tell).
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
#: Modes an RGB result is converted back into as they are (Pillow converts both ways).
CONVERTIBLE_MODES = ("CMYK", "YCbCr", "HSV", "LAB", "RGBX")
# ITU-R 601-2 luma, the weights Pillow's RGB -> L conversion uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def load_image(path, what: str = "image") -> Image.Image:
    """Open an image file fully and upright (EXIF orientation applied), or raise InputError naming the file.

    Args:
        path: the file.
        what: what the file is for, as errors name it ("image", "mask").
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError:
        raise InputError(f"{what} {path} is too large: Pillow opens at most {2 * Image.MAX_IMAGE_PIXELS} pixels "
                         "safely") from None
    except Exception as err:  # a decoder fails in many ways on a broken file; each means the file is unusable
        raise InputError(f"cannot read {what} {path}: {err}") from None


def load_mask(path, width: int, height: int) -> np.ndarray:
    """A user mask file as bool [H, W] (True = may change); it must have the image's size."""
    mask_image = load_image(path, "mask")
    if mask_image.size != (width, height):
        raise InputError(
            f"mask {path} is {mask_image.width}x{mask_image.height} but the image is {width}x{height}"
        )
    return np.asarray(eight_bit(mask_image).convert("L")) > 127


def gray_levels(image: Image.Image) -> np.ndarray:
    """A grayscale image of any depth (a mode in :data:`GRAY_FULL_SCALE`) as float64 levels in [0, 1]."""
    return np.clip(np.asarray(image, dtype=np.float64) / GRAY_FULL_SCALE[image.mode], 0.0, 1.0)


def gray_image(levels: np.ndarray, mode: str) -> Image.Image:
    """Levels in [0, 1] as a grayscale image of ``mode`` ("L", "I;16", "I" or "F"; other 16-bit modes give
    "I;16", which holds the same values)."""
    values = np.clip(levels, 0.0, 1.0) * GRAY_FULL_SCALE[mode]
    if mode == "F":
        return Image.fromarray(values.astype(np.float32))
    dtype = {"L": np.uint8, "I": np.int32}.get(mode, np.uint16)
    return Image.fromarray(np.round(values).astype(dtype))


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with 8 bits per channel: deeper grayscale is scaled to "L" on its full range; any other image is
    returned as it is."""
    return gray_image(gray_levels(image), "L") if image.mode in HIGH_BIT_MODES else image


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of an image of any mode, for pictures and masks (no clipping of 16-bit grayscale)."""
    return eight_bit(image).convert("RGB")


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
        palette: the input's palette (a flat RGB list) for a palette image without transparency, else None.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    original_mode: str
    alpha: Optional[Image.Image]
    palette: Optional[list] = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.pixels.shape[-1], self.pixels.shape[-2])

    def restore(self, pixels: torch.Tensor) -> Image.Image:
        """Turn a decoded [1, 3, H, W] tensor in [-1, 1] back into an image shaped like the input."""
        if self.original_mode in HIGH_BIT_MODES:
            # Resized and scaled in floating point, so the result keeps the input's depth.
            return gray_image(resize_levels(luma(pixels), self.original_size), self.original_mode)
        result = self._in_original_mode(tensor_to_pil(pixels).resize(self.original_size, Image.LANCZOS))
        if self.alpha is not None:
            result.putalpha(self.alpha)
        return result

    def _in_original_mode(self, rgb: Image.Image) -> Image.Image:
        mode = self.original_mode
        if mode in ("L", "LA", "La"):
            return rgb.convert("L")
        if mode == "1":
            return rgb.convert("L").convert("1", dither=Image.Dither.NONE)
        if mode == "P" and self.palette is not None:
            palette = Image.new("P", (1, 1))
            palette.putpalette(self.palette)
            # Nearest palette colour, no dithering: unchanged content maps back to its own palette entry.
            return rgb.quantize(palette=palette, dither=Image.Dither.NONE)
        if mode in CONVERTIBLE_MODES:
            return rgb.convert(mode)
        return rgb  # RGB; with the alpha put back, RGBA (also for RGBa, PA and P with transparency)


def prepare_image(image: Image.Image, work_size: int = 512) -> WorkingImage:
    """Convert any PIL image into a :class:`WorkingImage` (see the module docstring)."""
    if work_size < 8:
        raise InputError(f"work size must be at least 8 pixels, got {work_size}")
    alpha = image.getchannel("A") if image.mode in ALPHA_MODES else None
    if image.mode == "P" and "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
    size = working_size(image.width, image.height, work_size)
    if image.mode in HIGH_BIT_MODES:
        levels = torch.from_numpy(resize_levels(gray_levels(image), size).astype(np.float32))
        pixels = (levels * 2 - 1).expand(1, 3, -1, -1).contiguous()
    else:
        pixels = pil_to_tensor(image.convert("RGB").resize(size, Image.LANCZOS))
    palette = image.getpalette() if image.mode == "P" and alpha is None else None
    return WorkingImage(pixels, image.size, image.mode, alpha, palette)


def luma(pixels: torch.Tensor) -> np.ndarray:
    """Gray levels in [0, 1] (float64 [H, W]) of an RGB tensor [1, 3, H, W] in [-1, 1]."""
    rgb = ((pixels[0].detach().double().cpu().clamp(-1, 1) + 1) / 2).numpy()
    return sum(weight * channel for weight, channel in zip(LUMA_WEIGHTS, rgb))


def resize_levels(levels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Lanczos resize of levels [H, W] in [0, 1] to ``size`` (width, height), in float32, clipped to [0, 1]."""
    resized = Image.fromarray(np.asarray(levels, dtype=np.float32)).resize(size, Image.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)


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
