"""The ComfyUI services the nodes use (progress bar, device, cache release), each with a plain fallback.

ComfyUI is imported lazily, so the node logic also runs in scripts and tests where it is not installed.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.progress import ProgressFn


def _comfy(module_name: str):
    """``comfy.<module_name>`` when running inside ComfyUI, else None."""
    try:
        return importlib.import_module(f"comfy.{module_name}")
    except ImportError:
        return None


class ComfyProgress:
    """A core ``progress(step, total)`` hook driving ``comfy.utils.ProgressBar``.

    The bar's update calls ComfyUI's hook, which raises when the user presses Cancel, so a long loop
    that reports every iteration stops promptly.
    """

    def __init__(self, progress_bar_class):
        self._progress_bar_class = progress_bar_class
        self._bar = None

    def __call__(self, step: int, total: int) -> None:
        if self._bar is None:
            self._bar = self._progress_bar_class(total)
        self._bar.update_absolute(step, total)


def node_progress() -> ProgressFn:
    """A progress hook for one node run: ComfyUI's progress bar, or None outside ComfyUI."""
    utils = _comfy("utils")
    return ComfyProgress(utils.ProgressBar) if utils is not None else None


def part_progress(progress: ProgressFn, part: int, parts: int) -> ProgressFn:
    """Report a loop that is part ``part`` (0-based) of ``parts`` equal loops on one progress bar."""
    if progress is None:
        return None
    return lambda step, total: progress(part * total + step, parts * total)


def torch_device() -> torch.device:
    """The device ComfyUI computes on (it honours ``--cpu``); the CPU outside ComfyUI."""
    model_management = _comfy("model_management")
    return model_management.get_torch_device() if model_management is not None else torch.device("cpu")


def release_memory() -> None:
    """Let ComfyUI return cached accelerator memory after a heavy node."""
    model_management = _comfy("model_management")
    if model_management is not None:
        model_management.soft_empty_cache()


# --------------------------------------------------------------------------- model folders
def _folder_paths():
    """ComfyUI's ``folder_paths`` module when running inside ComfyUI, else None."""
    try:
        return importlib.import_module("folder_paths")
    except ImportError:
        return None


def register_model_folder(folder_name: str, extensions: set[str]) -> None:
    """Make ``ComfyUI/models/<folder_name>`` a model folder (plus any extra_model_paths entry) for these files."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return
    default = os.path.join(folder_paths.models_dir, folder_name)
    paths, known = folder_paths.folder_names_and_paths.get(folder_name, ([], set()))
    # Other packs or extra_model_paths.yaml may have registered the folder already: keep what they added.
    folder_paths.folder_names_and_paths[folder_name] = ([default] + [p for p in paths if p != default],
                                                        set(known) | set(extensions))


def model_files(folder_name: str) -> list[str]:
    """File names in a registered model folder; empty outside ComfyUI."""
    folder_paths = _folder_paths()
    return folder_paths.get_filename_list(folder_name) if folder_paths is not None else []


def model_path(folder_name: str, file_name: str) -> str:
    """Full path of a file in a model folder; raises InputError naming the folder when it is not there."""
    folder_paths = _folder_paths()
    path = folder_paths.get_full_path(folder_name, file_name) if folder_paths is not None and file_name else None
    if path is None:
        raise InputError(f"model file {file_name!r} not found in models/{folder_name}")
    return path


def cache_folder(name: str) -> Optional[Path]:
    """``ComfyUI/user/adaptivedrag/<name>``, where the pack keeps results across restarts; None outside ComfyUI."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return None
    return Path(folder_paths.get_user_directory()) / "adaptivedrag" / name
