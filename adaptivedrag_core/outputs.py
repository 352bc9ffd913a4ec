"""Writing result files safely: every output is checked before any work starts (its format, its folder, that a
file can be created there), nothing is overwritten without ``force``, and every file is written under a temporary
name first, so a failure or an interrupt never leaves a half-written file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from PIL import Image

from .errors import InputError
from .images import ALPHA_MODES, HIGH_BIT_MODES, eight_bit, gray_image, gray_levels

#: Modes each output format stores as they are (checked with Pillow 13); an image in another mode is written in
#: the nearest mode its format holds (:func:`writable`).
FORMAT_MODES = {
    "PNG": ("1", "L", "LA", "I;16", "P", "RGB", "RGBA"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "TIFF": ("1", "L", "LA", "I", "I;16", "F", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB"),
    "BMP": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),
}
_GRAY_MODES = HIGH_BIT_MODES | {"1", "L", "LA", "La"}


def image_format(path: Path, option: str = "output") -> str:
    """The PIL format that writes ``path``, from its extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt not in FORMAT_MODES:
        raise InputError(f"{option} {path}: cannot write images of type {Path(path).suffix or '(no extension)'!r}; "
                         "use .png, .jpg, .webp, .tif, .bmp or .gif")
    return fmt


def check_outputs(outputs: dict, force: bool, files: Optional[dict] = None) -> None:
    """Check every output before the work starts.

    Args:
        outputs: option name (as the user typed it, e.g. ``--out``) -> path of an image to write.
        force: allow overwriting existing files.
        files: option name -> path of another file to write (e.g. a LoRA), checked the same way but for the
            image format.
    """
    files = files or {}
    paths = [Path(p).resolve() for p in (*outputs.values(), *files.values())]
    if len(set(paths)) != len(paths):
        raise InputError("output files must be different paths")
    for option, path in outputs.items():
        image_format(path, option)
    for option, path in {**outputs, **files}.items():
        check_writable(option, Path(path), force)


def check_writable(option: str, path: Path, force: bool) -> None:
    """Raise InputError unless a file can be written at ``path``: not a folder, not an existing file (unless
    ``force``), in an existing folder where a file can be created (tried with an empty file, removed at once)."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder")
    if path.exists() and not force:
        raise InputError(f"{option} {path} already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise InputError(f"{option} {path}: folder {path.parent} does not exist")
    probe = partial_path(path)
    try:
        probe.open("wb").close()
        probe.unlink()
    except OSError as err:
        raise InputError(f"{option} {path}: cannot write in {path.parent} ({err.strerror or err})") from None


def partial_path(path: Path) -> Path:
    """The temporary name ``path`` is written under (one per process, so two writers never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Write a file through ``write(temporary_path)``, then rename it to ``path`` in one step.

    On any failure, an interrupt included, the temporary file is removed and ``path`` is as it was.

    Returns:
        ``path``.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def writable(image: Image.Image, fmt: str) -> Image.Image:
    """``image`` in a mode ``fmt`` stores: its own where the format holds it, else the nearest one.

    16-bit and float grayscale become 16-bit grayscale where the format has it, else 8-bit (scaled on their full
    range, never clipped); other grayscale becomes L (LA with alpha); colour becomes RGB (RGBA with alpha). Alpha
    is dropped where the format has none (JPEG).
    """
    modes = FORMAT_MODES[fmt]
    if image.mode in modes:
        return image
    if image.mode in HIGH_BIT_MODES and "I;16" in modes:
        return gray_image(gray_levels(image), "I;16")
    has_alpha = image.mode in ALPHA_MODES
    gray = image.mode in _GRAY_MODES
    candidates = {(True, True): ("LA", "RGBA", "L", "RGB"), (True, False): ("L", "RGB"),
                  (False, True): ("RGBA", "RGB"), (False, False): ("RGB",)}[gray, has_alpha]
    mode = next((mode for mode in candidates if mode in modes), candidates[-1])
    return eight_bit(image).convert(mode)


def save_image(image: Image.Image, path, force: bool) -> None:
    """Write ``image`` to ``path`` atomically (refusing to overwrite unless ``force``), in the nearest mode the
    file's format holds (:func:`writable`)."""
    path = Path(path)
    check_outputs({"output": path}, force)
    fmt = image_format(path)
    image = writable(image, fmt)
    atomic_write(path, lambda partial: image.save(partial, format=fmt))
