"""DragBench metrics, computed the way DragDiffusion's evaluation scripts compute them.

- **MD (mean distance, lower is better).** DIFT features (Tang et al., "Emergent Correspondence from Image
  Diffusion"): the image is VAE-encoded (a sample of the latent distribution), noised to t = 261 and passed once
  through SD2.1's UNet with the sample's prompt; the output of ``up_blocks[1]`` is averaged over an ensemble of 8
  such noisings. The features of the original and the edited image are bilinearly upsampled to the original's
  size; for every handle, the original's feature vector at the handle is matched (cosine, argmax) over the whole
  edited image, and the distance from that match to the target is measured in pixels. MD is the mean over all
  points of the benchmark.
- **IF (image fidelity, higher is better) = 1 - LPIPS** (AlexNet, v0.1 linear layers) between the original and the
  edited image, both bilinearly resized to 224x224.

Models come from local files only. :class:`DiftFeaturizer` takes any :class:`~adaptivedrag_core.models.SDComponents`
(the tests hand it the tiny random model); :func:`load_dift_components` reads a diffusers SD2.1 folder offline.
LPIPS is implemented here on torchvision's AlexNet architecture, so no network access is ever needed: see
:func:`load_lpips` for the single weights file it takes.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from ..features import decoder_stops_after
from ..images import pil_to_tensor
from ..models import SDComponents, weights_variant, encode_prompt
from ..pipeline import place_module

# ------------------------------------------------------------------------------------------------------ DIFT


@dataclass(frozen=True)
class DiftSettings:
    """DIFT feature settings (DragDiffusion's evaluation: t=261, up_ft_index=1, ensemble 8).

    Args:
        timestep: diffusion timestep the image is noised to.
        up_ft_index: which ``unet.up_blocks`` output is the feature map.
        ensemble_size: noisings averaged per image.
        seed: seeds the latent samples and the noise; the same for every image, so a sample's MD does not depend
            on the order samples are evaluated in (the original script seeds once per run).
    """

    timestep: int = 261
    up_ft_index: int = 1
    ensemble_size: int = 8
    seed: int = 42


class DiftFeaturizer:
    """DIFT features of images from a diffusion model (SD2.1 for DragBench's MD).

    Args:
        components: the model; anything with ``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
            ``latent_scale`` and ``make_scheduler()`` (an :class:`SDComponents`).
        device: where the model runs (the modules are moved there).
        dtype: UNet and text-encoder dtype (default float32, as the original evaluation runs).
        settings: :class:`DiftSettings`.
    """

    def __init__(self, components: SDComponents, device="cpu", dtype: Optional[torch.dtype] = None,
                 settings: DiftSettings = DiftSettings()):
        self.components = components
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.settings = settings
        for module, dtype in ((components.unet, self.dtype), (components.text_encoder, self.dtype),
                              (components.vae, torch.float32)):
            place_module(module, self.device, dtype)
        self.scheduler = components.make_scheduler()

    @torch.no_grad()
    def features(self, image: Image.Image, prompt: str) -> torch.Tensor:
        """The ensemble-mean feature map [1, D, h, w] (float32, at the UNet block's resolution) of an image."""
        settings = self.settings
        generator = torch.Generator(self.device).manual_seed(settings.seed)
        pixels = pil_to_tensor(image).to(self.device).repeat(settings.ensemble_size, 1, 1, 1)
        latents = self.components.vae.encode(pixels).latent_dist.sample(generator) * self.components.latent_scale
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, torch.tensor([settings.timestep], device=self.device))
        context = encode_prompt(self.components, prompt, device=self.device).to(self.dtype)
        features = unet_block_output(self.components.unet, noisy.to(self.dtype), settings.timestep,
                                     context.expand(settings.ensemble_size, -1, -1), settings.up_ft_index)
        return features.float().mean(dim=0, keepdim=True)


def unet_block_output(unet, latents: torch.Tensor, timestep: int, context: torch.Tensor, block_index: int):
    """Output of ``unet.up_blocks[block_index]``; the UNet stops there instead of running its last blocks."""
    with decoder_stops_after(unet, block_index):
        return unet(latents, timestep, encoder_hidden_states=context).sample


def load_dift_components(path) -> SDComponents:
    """An SD2.1 diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), read
    offline (``local_files_only``), as :class:`SDComponents` for :class:`DiftFeaturizer`.

    Raises:
        InputError: a missing folder or part, or a part diffusers/transformers cannot read.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(path)
    parts = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
             "tokenizer": CLIPTokenizer, "scheduler": DDIMScheduler}
    if not folder.is_dir():
        raise InputError(f"--dift-model must be a diffusers SD2.1 folder; {folder} is not a folder")
    for name in parts:
        if not (folder / name).is_dir():
            raise InputError(f"DIFT model folder {folder} has no {name}/ folder")
    loaded = {}
    for name, cls in parts.items():
        try:
            if name == "scheduler":
                loaded[name] = cls.load_config(str(folder / name), local_files_only=True)
            elif name == "tokenizer":
                loaded[name] = cls.from_pretrained(str(folder / name), local_files_only=True)
            else:
                loaded[name] = cls.from_pretrained(str(folder / name), local_files_only=True,
                                                   variant=weights_variant(folder / name))
        except (OSError, ValueError) as error:
            raise InputError(f"cannot load the DIFT model's {name} from {folder / name}: {error}") from error
    for name in ("unet", "vae", "text_encoder"):
        loaded[name].eval().requires_grad_(False)
    # Only the settings DDIMScheduler takes: SD folders may carry other schedulers' settings.
    known = inspect.signature(DDIMScheduler.__init__).parameters
    scheduler_config = {key: value for key, value in loaded["scheduler"].items() if key in known}
    return SDComponents(unet=loaded["unet"], vae=loaded["vae"], text_encoder=loaded["text_encoder"],
                        tokenizer=loaded["tokenizer"], latent_scale=float(loaded["vae"].config.scaling_factor),
                        scheduler_config=scheduler_config)


def match_handles(source_features: torch.Tensor, edited_features: torch.Tensor, handles: Sequence,
                  size: tuple[int, int]) -> list[tuple[int, int]]:
    """For each handle, the (x, y) pixel of the edited image whose feature is most similar (cosine) to the
    original's feature at the handle; both maps are bilinearly upsampled to ``size`` = (width, height) first.

    Args:
        source_features, edited_features: [1, D, h, w] feature maps of the original and the edited image.
        handles: (x, y) image pixels (rounded to the nearest pixel, as the original indexes integer points).
        size: (width, height) of the original image.
    """
    width, height = size
    upsampled = F.interpolate(source_features, size=(height, width), mode="bilinear")
    queries = torch.stack([upsampled[0, :, _pixel(y, height), _pixel(x, width)] for x, y in handles])
    del upsampled
    edited = F.normalize(F.interpolate(edited_features, size=(height, width), mode="bilinear")[0], dim=0)
    queries = F.normalize(queries, dim=1)
    matches = []
    for query in queries:
        similarity = torch.einsum("d,dhw->hw", query, edited)
        row, col = divmod(int(similarity.argmax()), width)
        matches.append((col, row))
    return matches


def _pixel(value: float, length: int) -> int:
    return min(max(int(round(value)), 0), length - 1)


def match_distances(matches: Sequence, targets: Sequence) -> list[float]:
    """Pixel distance from every match to its target (the terms MD averages)."""
    return [math.dist(match, target) for match, target in zip(matches, targets, strict=True)]


# ----------------------------------------------------------------------------------------------------- LPIPS

# LPIPS's input scaling (its "ScalingLayer") and AlexNet's channel count at each of the five ReLU taps.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
ALEXNET_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in torchvision's ``alexnet().features``
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_SIZE = 224

_FEATURE_KEY = re.compile(r"(?:^|\.)(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_LINEAR_KEY = re.compile(r"(?:^|\.)lin(\d)\.model\.\d+\.weight$")


class AlexLPIPS(torch.nn.Module):
    """LPIPS distance with AlexNet features and learned per-channel weights (Zhang et al. 2018, v0.1).

    d(x, y) = sum over the 5 ReLU outputs l of  mean_{h,w}  sum_c  w_{l,c} (x^_l - y^_l)^2,  where x^_l is the
    feature map unit-normalised along the channels. Inputs are RGB in [-1, 1]. Built without weights (on the
    meta device): :func:`load_lpips` gives it its weights.
    """

    def __init__(self):
        super().__init__()
        from torchvision.models import alexnet

        with torch.device("meta"):  # no random initialisation: every weight is loaded from the file
            self.features = alexnet(weights=None).features[: ALEXNET_TAPS[-1] + 1]
            self.linear = torch.nn.ModuleList(
                torch.nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in ALEXNET_CHANNELS
            )
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs, each unit-normalised along the channels."""
        outputs = []
        hidden = (images - self.shift) / self.scale
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in ALEXNET_TAPS:
                outputs.append(hidden / (hidden.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return outputs

    @torch.no_grad()
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """LPIPS distance [N] between two batches of images [N, 3, H, W] in [-1, 1]."""
        distance = 0
        for linear, a, b in zip(self.linear, self.taps(first), self.taps(second), strict=True):
            distance = distance + linear((a - b).pow(2)).mean(dim=(1, 2, 3))
        return distance


def load_lpips(path, device="cpu") -> AlexLPIPS:
    """Load :class:`AlexLPIPS` from ONE local file holding both AlexNet's convolutions and LPIPS's linear layers.

    Accepted (``.safetensors``, or ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``), any key prefix:

    - ``features.{0,3,6,8,10}.{weight,bias}`` (torchvision's AlexNet state dict) or ``net.sliceK.N.{weight,bias}``
      (the ``lpips`` package's whole-model state dict), and
    - ``lin{0..4}.model.N.weight`` (the ``lpips`` package's ``weights/v0.1/alex.pth``).

    One way to make it, once, on a machine with internet access::

        alex = torchvision.models.alexnet(weights="IMAGENET1K_V1").state_dict()
        linear = torch.load("<site-packages>/lpips/weights/v0.1/alex.pth")
        torch.save({**alex, **linear}, "lpips_alex.pth")

    or ``torch.save(lpips.LPIPS(net="alex").state_dict(), "lpips_alex.pth")``.
    """
    state = _read_tensors(Path(path))
    model = AlexLPIPS()
    wanted = {f"features.{key}": value for key, value in model.features.state_dict().items()}
    wanted.update({f"linear.{key}": value for key, value in model.linear.state_dict().items()})
    found = {}
    for key, value in state.items():
        feature = _FEATURE_KEY.search(key)
        linear = _LINEAR_KEY.search(key)
        if feature:
            found[f"features.{feature.group(1)}.{feature.group(2)}"] = value
        elif linear:
            found[f"linear.{linear.group(1)}.weight"] = value
    missing = [key for key in wanted if key not in found]
    if missing:
        raise InputError(
            f"{path} is not an LPIPS AlexNet weights file: {len(missing)} tensors missing (e.g. {missing[0]}); it "
            "must hold AlexNet's features.* and LPIPS's lin0..lin4 weights (see docs/performance.md)"
        )
    for key, reference in wanted.items():
        if found[key].shape != reference.shape:
            raise InputError(f"{path}: {key} has shape {tuple(found[key].shape)}, expected {tuple(reference.shape)}")
    model.load_state_dict({key: found[key].float() for key in wanted}, strict=False, assign=True)
    return model.to(device)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"LPIPS weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # any failure here means the file is not plain tensors
        raise InputError(f"cannot read LPIPS weights {path} safely: {error}") from error
    if not isinstance(loaded, dict):
        raise InputError(f"{path} does not hold a state dict")
    return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}


def image_fidelity(lpips: AlexLPIPS, original: Image.Image, edited: Image.Image) -> float:
    """IF = 1 - LPIPS between the two images at 224x224 (the edited one is first resized to the original's size)."""
    device = lpips.shift.device
    pair = [pil_to_tensor(_same_size(image, original.size)).to(device) for image in (original, edited)]
    small = [F.interpolate(pixels, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear") for pixels in pair]
    return 1.0 - float(lpips(*small)[0])


def _same_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == size else image.resize(size, Image.BILINEAR)


def mean_distance_terms(dift: DiftFeaturizer, original: Image.Image, edited: Image.Image, prompt: str,
                        handles: Sequence, targets: Sequence) -> list[float]:
    """One MD term per pair: DIFT-match the original's handle features in the edited image, measure to the target."""
    original = original.convert("RGB")
    edited = _same_size(edited, original.size)
    matches = match_handles(dift.features(original, prompt), dift.features(edited, prompt), handles, original.size)
    return match_distances(matches, targets)
