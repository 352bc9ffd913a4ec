"""SAM2's automatic mask generator, for the auto mask's ``sam_masks`` variant (the public code's) only.

transformers has SAM2's image model but not the generator's exact procedure (point grid, stability score, box NMS,
as the public AdaptiveDrag code runs it), so this variant alone needs the optional ``sam2`` package
(``pip install sam2``, the ``sam-masks`` extra). The generator runs on the ``sam2`` package's own model, built from
that package's config and filled with the transformers model's weights under Meta's names; the video-tracking
parts, which image masks do not use, keep their initial values.

The config YAML is read with OmegaConf and instantiated with hydra's ``instantiate``, not through hydra's
``compose``: ``compose`` needs hydra's process-wide ``GlobalHydra`` set to sam2's config module, which another
package in the same process (ComfyUI custom nodes) may have initialised differently. The YAMLs have no
defaults list, so both routes give the same config.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import warnings

import numpy as np

from .errors import InputError
from .sam2_keys import is_video_only, to_original

# The sam2 package's config file suffix of each size.
_CONFIG_SUFFIX = {"tiny": "t", "small": "s", "base_plus": "b+", "large": "l"}
MISSING_PACKAGE = (
    "the sam_masks auto-mask variant needs SAM2's automatic mask generator from the optional sam2 package "
    "(pip install sam2); the default features variant does not"
)


def automatic_masks(model, spec, image: np.ndarray, options: dict) -> list[np.ndarray]:
    """SAM2's automatic masks of an RGB uint8 image: a list of bool [H, W] arrays (possibly empty).

    Args:
        model: transformers ``Sam2Model`` whose weights are used (on its device).
        spec: its ``Sam2Spec`` (size and version).
        image: RGB uint8 [H, W, 3].
        options: keyword arguments for ``SAM2AutomaticMaskGenerator``; empty means SAM2's defaults.

    Raises:
        InputError: the ``sam2`` package is not installed.
    """
    if not sam2_installed():
        raise InputError(MISSING_PACKAGE)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    with _quiet_sam2_construction():
        generator = SAM2AutomaticMaskGenerator(package_model(model, spec), **options)
    records = generator.generate(np.array(image, dtype=np.uint8))
    return [np.asarray(record["segmentation"], dtype=bool) for record in records]


def sam2_installed() -> bool:
    """Whether the optional ``sam2`` package can be imported."""
    return importlib.util.find_spec("sam2") is not None


def package_model(model, spec):
    """The ``sam2`` package's ``SAM2Base`` of ``spec`` holding ``model``'s weights, in eval mode on its device."""
    package = build_package_model(spec)
    result = package.load_state_dict(to_original(model.state_dict()), strict=False)
    left_out = [name for name in result.missing_keys if not is_video_only(name)]
    if left_out or result.unexpected_keys:
        raise RuntimeError(f"SAM2 weights do not fit the sam2 package's {spec}: missing {left_out}, "
                           f"unexpected {result.unexpected_keys}")
    return package.to(next(model.parameters()).device).eval()


def build_package_model(spec):
    """A randomly initialised ``SAM2Base`` of ``spec`` (size and version) from the ``sam2`` package's config."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = "sam2.1" if spec.version == "2.1" else "sam2"
    config_name = f"{folder}_hiera_{_CONFIG_SUFFIX[spec.size]}.yaml"
    config = OmegaConf.load(str(importlib.resources.files("sam2") / "configs" / folder / config_name))
    OmegaConf.resolve(config)
    return instantiate(config.model, _recursive_=True)


@contextlib.contextmanager
def _quiet_sam2_construction():
    # SAM2's transforms use torch.jit.script, which recent torch flags with a FutureWarning on every build;
    # the user can do nothing about it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        yield
