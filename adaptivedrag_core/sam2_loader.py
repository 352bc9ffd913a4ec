"""SAM2 from a local checkpoint, offline, as an image encoder for the auto mask.

The model is transformers' ``Sam2Model``, built from the configs that ship in this package
(``configs/sam2/{tiny,small,base_plus,large}.json``) and filled with the weights of a local file as users have it:
Meta's ``.pt`` (``{"model": state_dict}``, read with ``weights_only=True``) or a ``.safetensors`` file with the
same tensor names (fp16/bf16 files are fine, weights are cast to float32). The names are mapped onto transformers'
in :mod:`.sam2_keys`; no conversion step is asked of the user. SAM2 and SAM2.1 of one size share these configs:
the two versions differ only in video-tracking parts, which the image model leaves out.

The model size (tiny / small / base_plus / large) and version (SAM2 or SAM2.1) come from an explicit
``model_size`` (``"tiny"``, ``"b+"``, ``"sam2.1_small"``, ...), else from the file name
(``sam2.1_hiera_tiny.pt``, ``sam2_hiera_b+.safetensors``, ...), else from the weights themselves (the trunk's
width and depth tell the size, the ``no_obj_embed_spatial`` tensor tells SAM2.1).

The image embedding is the one SAM2's own image predictor computes: the image resized to the model's square input
(1024, bilinear with antialiasing) and normalised with ImageNet statistics, the stride-16 neck output plus the
"no memory" embedding. Only the ``sam_masks`` auto-mask variant needs the ``sam2`` package (its automatic mask
generator, see :mod:`.sam2_generator`).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .sam2_keys import original_name, to_transformers

SIZES = ("tiny", "small", "base_plus", "large")
VERSIONS = ("2", "2.1")

# Trunk embed_dim and trunk block count of each size (from the shipped configs).
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
# SAM2's input normalisation (ImageNet statistics).
_PIXEL_MEAN = (0.485, 0.456, 0.406)
_PIXEL_STD = (0.229, 0.224, 0.225)
# Names listed in a "does not fit" message, per kind.
_NAMES_SHOWN = 3


@dataclass(frozen=True)
class Sam2Spec:
    """Which SAM2 model: ``version`` "2" or "2.1", ``size`` one of :data:`SIZES`."""

    version: str
    size: str

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


def sam2_config(size: str):
    """transformers' ``Sam2Config`` of a size, from the config shipped in this package."""
    from transformers import Sam2Config

    config_file = importlib.resources.files("adaptivedrag_core") / "configs" / "sam2" / f"{size}.json"
    config = Sam2Config.from_dict(json.loads(config_file.read_text()))
    # The sam2 package's attention kernel, so both give the same embedding.
    config._attn_implementation = "sdpa"
    return config


def build_sam2_model(size: str, empty: bool = False):
    """transformers' ``Sam2Model`` of a size (see :func:`sam2_config`), randomly initialised.

    Args:
        size: one of :data:`SIZES`.
        empty: build on the meta device (no memory, no initialisation) for weights that are assigned next.
    """
    from transformers import Sam2Model

    with torch.device("meta") if empty else contextlib.nullcontext():
        return Sam2Model(sam2_config(size))


class Sam2Encoder:
    """A SAM2 model used as an image encoder, plus SAM2's automatic mask generator.

    Args:
        model: a transformers ``Sam2Model`` in eval mode.
        spec: which model it is.
        mask_generator_options: keyword arguments for ``SAM2AutomaticMaskGenerator`` (e.g. ``points_per_side``);
            empty means SAM2's defaults, which the public AdaptiveDrag code uses.
    """

    def __init__(self, model, spec: Sam2Spec, mask_generator_options: Optional[dict] = None):
        self.model = model
        self.spec = spec
        self.mask_generator_options = dict(mask_generator_options or {})

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the image the encoder takes (1024 x 1024)."""
        height, width = self.model.config.vision_config.backbone_config.image_size
        return int(height), int(width)

    def pixel_values(self, image: np.ndarray) -> torch.Tensor:
        """An RGB uint8 [H, W, 3] image as the encoder's input [1, 3, 1024, 1024] on the model's device: scaled to
        [0, 1], resized (bilinear, antialiased, as SAM2's transform) and normalised."""
        device = next(self.model.parameters()).device
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device).permute(2, 0, 1)[None].float() / 255
        pixels = F.interpolate(pixels, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_PIXEL_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(_PIXEL_STD, device=device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embeddings [B, 256, 64, 64] of encoder inputs [B, 3, 1024, 1024]."""
        with torch.no_grad():
            return self.model.get_image_embeddings(pixel_values)[-1]

    def features(self, image: np.ndarray) -> torch.Tensor:
        """The image-encoder feature map [256, 64, 64] (float32, CPU) of an RGB uint8 [H, W, 3] image: the
        embedding SAM2's image predictor hands to its mask decoder."""
        return self.embeddings(self.pixel_values(image))[0].float().cpu()

    def automatic_masks(self, image: np.ndarray) -> list[np.ndarray]:
        """SAM2's automatic masks of an RGB uint8 image: a list of bool [H, W] arrays (possibly empty).

        Raises:
            InputError: the optional ``sam2`` package is not installed.
        """
        from .sam2_generator import automatic_masks

        return automatic_masks(self.model, self.spec, image, self.mask_generator_options)


@contextlib.contextmanager
def sam2_on(encoder: Optional[Sam2Encoder], device):
    """Put ``encoder``'s model on ``device`` for the ``with`` block and back where it was afterwards (also on an
    exception); nothing for None. SAM2 large holds 0.81 GiB of weights: kept on the CPU between masks, it leaves
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
    model = build_sam2_model(spec.size, empty=True)
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
    # The model was built empty: every tensor is assigned here, as float32.
    weights = to_transformers(state_dict)
    expected = model.state_dict()
    missing = sorted({original_name(name) for name in set(expected) - set(weights.tensors)})
    reshaped = sorted(
        f"{original_name(name)} {list(weights.tensors[name].shape)} (needs {list(expected[name].shape)})"
        for name in set(expected) & set(weights.tensors) if weights.tensors[name].shape != expected[name].shape
    )
    if missing or weights.unknown or reshaped:
        looks_like = f"; the file looks like {detected}" if detected and detected != spec else ""
        raise InputError(
            f"{path.name} does not fit {spec}: {_listed('missing', missing)}, "
            f"{_listed('unexpected', weights.unknown)}, {_listed('wrongly shaped', reshaped)}{looks_like}"
        )
    model.load_state_dict({name: tensor.float() for name, tensor in weights.tensors.items()}, strict=True,
                          assign=True)


def _listed(kind: str, names: list[str]) -> str:
    if not names:
        return f"0 {kind}"
    more = f", ... {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:_NAMES_SHOWN])}{more})"


def random_sam2(model_size: str = "tiny", seed: int = 0, version: str = "2.1") -> Sam2Encoder:
    """A randomly initialised SAM2 (transformers' initialisation) on CPU, for tests and the benchmarks.

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
        model = build_sam2_model(size)
    return Sam2Encoder(model.eval(), spec)
