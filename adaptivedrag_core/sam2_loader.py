"""SAM2 from a local checkpoint, offline, as an image encoder for the auto mask.

The model is built from the configs that ship inside the ``sam2`` package and filled with the weights of a
local file: an official ``.pt`` (``{"model": state_dict}``, read with ``weights_only=True``) or a
``.safetensors`` file with the same keys (fp16/bf16 files are fine, weights are cast to float32).

The model size (tiny / small / base_plus / large) and version (SAM2 or SAM2.1) come from an explicit
``model_size`` (``"tiny"``, ``"b+"``, ``"sam2.1_small"``, ...), else from the file name
(``sam2.1_hiera_tiny.pt``, ``sam2_hiera_b+.safetensors``, ...), else from the weights themselves (the trunk's
width and depth tell the size, the ``no_obj_embed_spatial`` tensor tells SAM2.1).

The config YAML is read with OmegaConf and instantiated with hydra's ``instantiate``, not through hydra's
``compose``: ``compose`` needs hydra's process-wide ``GlobalHydra`` set to sam2's config module, which another
package in the same process (ComfyUI custom nodes) may have initialised differently. The YAMLs have no
defaults list, so both routes give the same config.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import InputError

SIZES = ("tiny", "small", "base_plus", "large")
VERSIONS = ("2", "2.1")

# Config file suffix, trunk embed_dim and trunk block count of each size (from the shipped configs).
_SIZE_CONFIG = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
_SIZE_BY_TRUNK = {(96, 12): "tiny", (96, 16): "small", (112, 24): "base_plus", (144, 48): "large"}

_SIZE_ALIASES = {
    "tiny": "tiny", "t": "tiny",
    "small": "small", "s": "small",
    "base_plus": "base_plus", "base-plus": "base_plus", "baseplus": "base_plus", "base+": "base_plus",
    "b+": "base_plus", "bplus": "base_plus",
    "large": "large", "l": "large",
}
_SIZE_WORDS = r"base[_-]?plus|base\+|b\+|bplus|tiny|small|large"
_VERSION_PREFIX = re.compile(r"^sam2(?:[._-]?1)?[._-]*(?:hiera[._-]*)?")
_PATCH_EMBED = "image_encoder.trunk.patch_embed.proj.weight"
_TRUNK_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")
_SAM21_ONLY_KEY = "no_obj_embed_spatial"


@dataclass(frozen=True)
class Sam2Spec:
    """Which SAM2 model: ``version`` "2" or "2.1", ``size`` one of :data:`SIZES`."""

    version: str
    size: str

    @property
    def config_path(self) -> str:
        """Path of the shipped config inside the ``sam2`` package."""
        folder = "sam2.1" if self.version == "2.1" else "sam2"
        return f"configs/{folder}/{folder}_hiera_{_SIZE_CONFIG[self.size]}.yaml"

    def __str__(self) -> str:
        return f"SAM{self.version} {self.size}"


def parse_model_name(text: str) -> tuple[Optional[str], Optional[str]]:
    """(version, size) read from a checkpoint file name; either is None when the name does not say.

    Args:
        text: a file name such as ``"sam2.1_hiera_tiny.pt"`` or ``"sam2_hiera_b+.safetensors"``.
    """
    name = Path(str(text)).name.lower()
    version = "2.1" if re.search(r"sam2[._-]?1(?![0-9])", name) else "2" if "sam2" in name else None
    match = re.search(rf"hiera[._-]*({_SIZE_WORDS}|t|s|l)(?![a-z0-9+])", name) or re.search(
        rf"(?<![a-z0-9])({_SIZE_WORDS})(?![a-z0-9+])", name
    )
    return version, (_SIZE_ALIASES[match.group(1)] if match else None)


def parse_model_size(text: str) -> tuple[Optional[str], str]:
    """(version or None, size) from an explicit size option such as ``"tiny"``, ``"b+"`` or ``"sam2.1_large"``.

    Raises:
        InputError: the text names no known size.
    """
    lowered = str(text).strip().lower()
    version = "2.1" if re.match(r"sam2[._-]?1", lowered) else "2" if lowered.startswith("sam2") else None
    size = _SIZE_ALIASES.get(_VERSION_PREFIX.sub("", lowered))
    if size is None:
        raise InputError(
            f"unknown SAM2 model size {text!r}: use tiny, small, base_plus (b+) or large, "
            "optionally prefixed with sam2_ or sam2.1_"
        )
    return version, size


def detect_spec(state_dict: dict) -> Optional[Sam2Spec]:
    """The SAM2 model a state dict belongs to, from its trunk width and depth; None if it is not SAM2's."""
    patch_embed = state_dict.get(_PATCH_EMBED)
    if patch_embed is None:
        return None
    blocks = {int(m.group(1)) for key in state_dict if (m := _TRUNK_BLOCK.match(key))}
    size = _SIZE_BY_TRUNK.get((int(patch_embed.shape[0]), len(blocks)))
    if size is None:
        return None
    return Sam2Spec("2.1" if _SAM21_ONLY_KEY in state_dict else "2", size)


def read_state_dict(path: Path) -> dict:
    """The tensors of a ``.pt`` (weights only; the ``"model"`` entry if present) or ``.safetensors`` file."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for corrupt or foreign files
        raise InputError(f"cannot read SAM2 checkpoint {path}: {type(err).__name__}: {err}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{path} holds no SAM2 state dict (expected {{'model': state_dict}} or a state dict)")
    return data


def build_sam2_model(spec: Sam2Spec):
    """A randomly initialised SAM2 model (``sam2.modeling.sam2_base.SAM2Base``) from the shipped config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config_file = importlib.resources.files("sam2") / spec.config_path
    config = OmegaConf.load(str(config_file))
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


class Sam2Encoder:
    """A SAM2 model used as an image encoder, plus SAM2's automatic mask generator.

    Args:
        model: a ``SAM2Base`` in eval mode.
        spec: which model it is.
        mask_generator_options: keyword arguments for ``SAM2AutomaticMaskGenerator`` (e.g. ``points_per_side``);
            empty means SAM2's defaults, which the public AdaptiveDrag code uses.
    """

    def __init__(self, model, spec: Sam2Spec, mask_generator_options: Optional[dict] = None):
        self.model = model
        self.spec = spec
        self.mask_generator_options = dict(mask_generator_options or {})

    def features(self, image: np.ndarray) -> torch.Tensor:
        """The image-encoder feature map [256, 64, 64] (float32, CPU) of an RGB uint8 [H, W, 3] image.

        SAM2's own preprocessing: the image is resized to the model's square input (1024) and normalised with
        ImageNet statistics; the map is the stride-16 neck output with SAM2's ``no_mem_embed`` added, i.e.
        exactly the embedding SAM2's image predictor hands to its mask decoder.
        """
        predictor = self._predictor()
        predictor.set_image(np.array(image, dtype=np.uint8))  # a writable copy, as torch wants
        return predictor.get_image_embedding()[0].float().cpu()

    def automatic_masks(self, image: np.ndarray) -> list[np.ndarray]:
        """SAM2's automatic masks of an RGB uint8 image: a list of bool [H, W] arrays (possibly empty)."""
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        with _quiet_sam2_construction():
            generator = SAM2AutomaticMaskGenerator(self.model, **self.mask_generator_options)
        records = generator.generate(np.array(image, dtype=np.uint8))
        return [np.asarray(record["segmentation"], dtype=bool) for record in records]

    def _predictor(self):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        with _quiet_sam2_construction():
            return SAM2ImagePredictor(self.model)


@contextlib.contextmanager
def sam2_on(encoder: Optional[Sam2Encoder], device):
    """Put ``encoder``'s model on ``device`` for the ``with`` block and back where it was afterwards (also on an
    exception); nothing for None. SAM2 large holds 0.84 GiB of weights: kept on the CPU between masks, it leaves
    the GPU to the edit."""
    if encoder is None:
        yield encoder
        return
    home = next(encoder.model.parameters()).device
    encoder.model.to(device)
    try:
        yield encoder
    finally:
        encoder.model.to(home)


@contextlib.contextmanager
def _quiet_sam2_construction():
    # SAM2's transforms use torch.jit.script, which recent torch flags with a FutureWarning on every build;
    # the user can do nothing about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        yield


def load_sam2(path, model_size: Optional[str] = None, device="cpu") -> Sam2Encoder:
    """Load a SAM2 checkpoint from a local file as a :class:`Sam2Encoder` (eval mode, float32).

    Args:
        path: ``.pt`` or ``.safetensors`` file.
        model_size: tiny / small / base_plus (b+) / large, optionally ``sam2_`` / ``sam2.1_`` prefixed; None reads
            it from the file name, then from the weights.
        device: where the model runs.

    Raises:
        InputError: unusable device, missing or unreadable file, unknown size, or weights that do not fit the model
            (the message says which model the file looks like, when that can be told).
    """
    path = Path(path)
    option = parse_model_size(model_size) if model_size else (None, None)
    if not path.is_file():
        raise InputError(f"SAM2 checkpoint not found: {path}")
    state_dict = read_state_dict(path)
    detected = detect_spec(state_dict)
    spec = _choose_spec(path, option, detected)
    model = build_sam2_model(spec)
    _load_weights(model, state_dict, spec, detected, path)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:  # unknown device string, or a build without that backend
        raise InputError(f"cannot run SAM2 on device {device!r}: {err}") from None
    return Sam2Encoder(model.eval(), spec)


def _choose_spec(path: Path, option: tuple, detected: Optional[Sam2Spec]) -> Sam2Spec:
    # The explicit option wins over the file name, which wins over what the weights look like.
    name_version, name_size = parse_model_name(path.name)
    option_version, option_size = option
    size = option_size or name_size or (detected.size if detected else None)
    if size is None:
        raise InputError(
            f"cannot tell the SAM2 model size of {path.name}: its name does not say and its weights are not "
            "SAM2's; pass the size (tiny, small, base_plus or large)"
        )
    version = option_version or name_version or (detected.version if detected else "2.1")
    return Sam2Spec(version, size)


def _load_weights(model, state_dict: dict, spec: Sam2Spec, detected: Optional[Sam2Spec], path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state_dict) if expected[k].shape != state_dict[k].shape)
    if missing or unexpected or reshaped:
        looks_like = f"; the file looks like {detected}" if detected and detected != spec else ""
        raise InputError(
            f"{path.name} does not fit {spec} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} wrongly shaped tensors){looks_like}"
        )
    model.load_state_dict(state_dict, strict=True)


def random_sam2(model_size: str = "tiny", seed: int = 0, version: str = "2.1") -> Sam2Encoder:
    """A randomly initialised SAM2 (from the shipped config) on CPU, for tests and the speed benchmark.

    Args:
        model_size: tiny / small / base_plus / large.
        seed: seed for the initial weights (the global RNG is left as it was).
        version: "2" or "2.1".
    """
    if version not in VERSIONS:
        raise InputError(f"unknown SAM2 version {version!r}: use 2 or 2.1")
    _, size = parse_model_size(model_size)
    spec = Sam2Spec(version, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam2_model(spec)
    return Sam2Encoder(model.eval(), spec)
