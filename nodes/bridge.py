"""ComfyUI's standard types to the core's and back: MODEL, CONDITIONING, LATENT, IMAGE, MASK.

A ComfyUI MODEL becomes a diffusers ``UNet2DConditionModel`` that *shares* the model's weights: the
UNet is built on the meta device and the ComfyUI tensors are assigned to it, so nothing is copied (except
for the nodes that back-propagate, see :func:`core_model`). ComfyUI first loads the model with its patches
(LoraLoader and friends) applied, so the user's LoRAs are part of what the core sees. The given MODEL is
never changed: a clone is loaded.

ComfyUI runs nodes under ``torch.inference_mode()``; tensors handed to the core are made ordinary first
(:func:`ordinary`), so the core's optimisers can use them in autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import SD15_LATENT_SCALE

# What ComfyUI's model detection reports for every SD1.x checkpoint.
SD1_SIGNATURE = {"context_dim": 768, "model_channels": 320, "in_channels": 4}


@dataclass
class CoreModel:
    """The core's view of a MODEL.

    Args:
        unet: diffusers UNet2DConditionModel (for a ComfyUI MODEL it shares the patched weights).
        latent_scale: multiply an unscaled ComfyUI latent by this to get the core's scaled latent.
    """

    unet: torch.nn.Module
    latent_scale: float = SD15_LATENT_SCALE

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device


def core_model(model: Any, trainable: bool = False) -> CoreModel:
    """The core's UNet for a ComfyUI MODEL (a ``ModelPatcher``).

    Args:
        model: a ComfyUI MODEL; outside ComfyUI (scripts, tests) also a :class:`CoreModel` or an
            ``SDComponents`` from the core.
        trainable: the caller back-propagates through the UNet (LoRA training, latent optimisation, CLoss).
            Weights ComfyUI created under ``torch.inference_mode`` cannot take part in autograd, so those
            are copied once; otherwise every weight is shared.
    """
    if isinstance(model, CoreModel):
        return model
    if hasattr(model, "unet") and hasattr(model, "latent_scale"):
        return CoreModel(model.unet, model.latent_scale)
    if hasattr(model, "model") and hasattr(model, "clone"):
        return _from_model_patcher(model, trainable)
    raise InputError(f"expected a MODEL from Load Checkpoint, got {type(model).__name__}")


def check_sd1(unet_config: dict) -> None:
    """Raise InputError unless ComfyUI's detected UNet config is an SD1.x one."""
    found = {key: unet_config.get(key) for key in SD1_SIGNATURE}
    if found != SD1_SIGNATURE:
        details = ", ".join(f"{key} {value}" for key, value in found.items())
        raise InputError(f"checkpoint is not SD1.x ({details}); AdaptiveDrag needs an SD1.x (e.g. SD1.5) model")


def diffusers_unet_config(unet_config: dict) -> dict:
    """The ``UNet2DConditionModel`` config matching ComfyUI's SD1.x UNet config."""
    channel_mult = unet_config["channel_mult"]
    # ComfyUI lists a transformer depth per down-block resnet; a level has attention if its first has.
    first_resnet = np.cumsum([0] + list(unet_config["num_res_blocks"]))[: len(channel_mult)]
    block_has_attention = [unet_config["transformer_depth"][i] > 0 for i in first_resnet]
    return {
        "sample_size": 64,
        "in_channels": unet_config["in_channels"],
        "out_channels": unet_config["out_channels"],
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in block_has_attention),
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(block_has_attention)),
        "block_out_channels": tuple(unet_config["model_channels"] * m for m in channel_mult),
        "layers_per_block": unet_config["num_res_blocks"][0],
        "cross_attention_dim": unet_config["context_dim"],
        "attention_head_dim": unet_config.get("num_heads", 8),
        "use_linear_projection": unet_config.get("use_linear_in_transformer", False),
    }


def _from_model_patcher(model, trainable: bool) -> CoreModel:
    import comfy.model_management
    import comfy.utils
    from diffusers import UNet2DConditionModel

    unet_config = model.model.model_config.unet_config
    check_sd1(unet_config)
    patched = model.clone()
    # Outside inference mode, so weights ComfyUI moves or patches now are ordinary tensors.
    with torch.inference_mode(False):
        # Loading applies the clone's weight patches (the user's LoRAs) to the shared weights, in ComfyUI's
        # own way, and keeps them there while this node runs.
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        comfy_weights = patched.model.diffusion_model.state_dict()
        key_map = comfy.utils.unet_to_diffusers(unet_config)
        weights = {diffusers_key: comfy_weights[comfy_key] for diffusers_key, comfy_key in key_map.items()
                   if comfy_key in comfy_weights}
        if trainable:
            weights = {key: value.clone() if value.is_inference() else value for key, value in weights.items()}
        with torch.device("meta"):
            unet = UNet2DConditionModel(**diffusers_unet_config(unet_config))
        # Frozen before assigning: an inference tensor may not be made to require gradients.
        unet.eval().requires_grad_(False)
        unet.load_state_dict(weights, strict=True, assign=True)
    return CoreModel(unet, float(model.model.latent_format.scale_factor))


# --------------------------------------------------------------------------- conditioning and latents
def ordinary(tensor: torch.Tensor, device=None) -> torch.Tensor:
    """A float32 copy that is not an inference tensor, so autograd may use it.

    ComfyUI runs nodes under ``torch.inference_mode()``, so every tensor a node receives or makes is an
    inference tensor, and those cannot be saved for a backward pass (LoRA training, drag, CLoss).
    """
    with torch.inference_mode(False):
        return tensor.detach().to(device=device, dtype=torch.float32).clone()


def text_embeddings(conditioning: list) -> torch.Tensor:
    """The prompt embeddings [1, 77, D] of a CONDITIONING (its first entry), as an ordinary tensor."""
    if not conditioning:
        raise InputError("conditioning is empty: connect a CLIP Text Encode node")
    embeddings = conditioning[0][0]
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 3:
        raise InputError("conditioning is not a CLIP Text Encode output")
    return ordinary(embeddings[:1])


def check_text_width(embeddings: torch.Tensor, model: CoreModel) -> None:
    """Raise if the prompt embeddings do not fit the UNet's cross-attention (CLIP of another model)."""
    expected = model.unet.config.cross_attention_dim
    if embeddings.shape[-1] != expected:
        raise InputError(
            f"conditioning has width {embeddings.shape[-1]} but the model expects {expected}: "
            "use the CLIP from the same SD1.x checkpoint"
        )


def scaled_latent(latent: dict, model: CoreModel) -> torch.Tensor:
    """The first latent of a ComfyUI LATENT, scaled for the core, as a new ordinary tensor [1, 4, h, w]."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise InputError("expected a LATENT from VAE Encode")
    if samples.shape[1] != model.unet.config.in_channels:
        raise InputError(f"latent has {samples.shape[1]} channels but the model expects {model.unet.config.in_channels}")
    return ordinary(samples[:1] * model.latent_scale, model.device)


def comfy_latent(scaled: torch.Tensor, latent_scale: float) -> dict:
    """A ComfyUI LATENT (unscaled, on the CPU) from a core latent."""
    return {"samples": (scaled.detach().float() / latent_scale).cpu()}


# --------------------------------------------------------------------------- images and masks
def image_array(image: torch.Tensor) -> np.ndarray:
    """The first image of a ComfyUI IMAGE [B, H, W, C] in 0..1 as RGB uint8 [H, W, 3]."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise InputError("expected an IMAGE from Load Image")
    pixels = image[0, ..., :3].detach().float().cpu().clamp(0, 1)
    if pixels.shape[-1] == 1:
        pixels = pixels.expand(-1, -1, 3)
    return (pixels.numpy() * 255).round().astype(np.uint8)


def image_size(image: torch.Tensor) -> tuple[int, int]:
    """(width, height) of a ComfyUI IMAGE."""
    return int(image.shape[2]), int(image.shape[1])


def comfy_image(array: np.ndarray) -> torch.Tensor:
    """A ComfyUI IMAGE [1, H, W, 3] from RGB uint8 [H, W, 3]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).div(255).unsqueeze(0)


def mask_array(mask: torch.Tensor, width: int, height: int) -> np.ndarray:
    """A ComfyUI MASK ([H, W] or [B, H, W], 1 = may change) as bool [H, W] of the image's size."""
    mask = mask.detach().float().cpu()
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise InputError(f"mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != (height, width):
        raise InputError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}")
    return mask.numpy() > 0.5


def comfy_mask(mask: np.ndarray) -> torch.Tensor:
    """A ComfyUI MASK [1, H, W] (1.0 = may change) from bool [H, W]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)).unsqueeze(0)
