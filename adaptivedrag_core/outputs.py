"""Writing result files safely: checked before any work starts, never overwritten without ``force``, and written
under a temporary name first so a failure never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .errors import InputError


def image_format(path: Path, option: str = "output") -> str:
    """The PIL format that writes ``path``, from its extension."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InputError(f"{option} {path}: cannot write images of type {Path(path).suffix or '(no extension)'!r}; "
                         "use .png, .jpg or .webp")
    return fmt


def check_outputs(outputs: dict, force: bool) -> None:
    """Check every output before the work starts.

    Args:
        outputs: option name (as the user typed it, e.g. ``--out``) -> path.
        force: allow overwriting existing files.
    """
    paths = [Path(p).resolve() for p in outputs.values()]
    if len(set(paths)) != len(paths):
        raise InputError("output files must be different paths")
    for option, path in outputs.items():
        path = Path(path)
        image_format(path, option)
        if path.exists() and not force:
            raise InputError(f"{option} {path} already exists; pass --force to overwrite it")
        if not path.parent.is_dir():
            raise InputError(f"{option} {path}: folder {path.parent} does not exist")


def save_image(image: Image.Image, path, force: bool) -> None:
    """Write ``image`` to ``path`` atomically (refusing to overwrite unless ``force``)."""
    path = Path(path)
    check_outputs({"output": path}, force)
    fmt = image_format(path)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format=fmt)
    partial.replace(path)
