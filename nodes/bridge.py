"""ComfyUI's standard types to the core's and back: MODEL, VAE, CONDITIONING, LATENT, IMAGE, MASK.

A ComfyUI MODEL becomes a diffusers ``UNet2DConditionModel`` that *shares* the model's weights: the
UNet is built once per ComfyUI model on the meta device and the ComfyUI tensors are assigned to it for one node
run, so nothing is copied (except low-precision weights, cast to the compute dtype; see :func:`bridged_model`).
ComfyUI first loads the model with its weight patches (LoraLoader and friends) applied, so the user's LoRAs are
part of what the core sees; the patches the core cannot apply (attention patches, FreeU, IPAdapter, ...) are named
in a warning on the node, and a model that is not SD1.5's epsilon prediction on its own noise schedule is
refused. The given MODEL is never changed: a clone is loaded.

ComfyUI runs nodes under ``torch.inference_mode()``; tensors handed to the core are made ordinary first
(:func:`ordinary`), so the core's optimisers can use them in autograd.
"""

from __future__ import annotations

import functools

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.images import resize_labels
from adaptivedrag_core.models import SD15_LATENT_SCALE, SD15_SCHEDULER_CONFIG, ordinary_alias

# What ComfyUI's model detection reports for every SD1.x checkpoint.
SD1_SIGNATURE = {"context_dim": 768, "model_channels": 320, "in_channels": 4}
# Weight dtypes the diffusers UNet computes in; other stored dtypes (fp8) are cast to the compute dtype.
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What Load Image gives as MASK for a picture without an alpha channel.
PLACEHOLDER_MASK_SIZE = (64, 64)
# Pictures shown on a node (previews, overlays) are enlarged to at least this width, so small inputs stay readable.
DISPLAY_MIN_WIDTH = 384


class IgnoredPatchWarning(UserWarning):
    """A MODEL carries patches that the AdaptiveDrag nodes do not apply."""


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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


@contextmanager
def bridged_model(model: Any, trainable: bool = False, stage: Optional[str] = None,
                  latent: Optional[torch.Tensor] = None) -> Iterator[CoreModel]:
    """The core's UNet for a ComfyUI MODEL (a ``ModelPatcher``), for one node run.

    The UNet module (and the identity-LoRA layers the core puts into it) is kept per ComfyUI model between runs;
    it holds ComfyUI's weights only inside the ``with`` block, so a model ComfyUI unloads or moves afterwards is
    not kept alive by it.

    Args:
        model: a ComfyUI MODEL; outside ComfyUI (scripts, tests) also a :class:`CoreModel` or an
            ``SDComponents`` from the core.
        trainable: the caller back-propagates through the UNet (LoRA training, latent optimisation, CLoss).
            Weights ComfyUI created under ``torch.inference_mode`` cannot be saved by autograd, so those are
            handed over as ordinary aliases of the same memory (``models.ordinary_alias``), not copies: the
            node's peak is the core's (``bench estimate --node-weights shared``).
        stage, latent: what the node runs (a key of :data:`STAGE_MEMORY_GIB_512`) and on which latent: ComfyUI
            frees the memory that needs (:func:`stage_memory`) when it loads the model.
    """
    if isinstance(model, CoreModel):
        yield model
    elif hasattr(model, "unet") and hasattr(model, "latent_scale"):
        yield CoreModel(model.unet, model.latent_scale)
    elif hasattr(model, "model") and hasattr(model, "clone"):
        core = _from_model_patcher(model, trainable, stage, latent)
        try:
            yield core
        finally:
            _forget_weights(core.unet)
    else:
        raise InputError(f"expected a MODEL from Load Checkpoint, got {type(model).__name__}")


def check_sd1(unet_config: dict) -> None:
    """Raise InputError unless ComfyUI's detected UNet config is an SD1.x one."""
    found = {key: unet_config.get(key) for key in SD1_SIGNATURE}
    if found != SD1_SIGNATURE:
        details = ", ".join(f"{key} {value}" for key, value in found.items())
        raise InputError(f"checkpoint is not SD1.x ({details}); AdaptiveDrag needs an SD1.x (e.g. SD1.5) model")


def check_epsilon_sampling(sampling) -> None:
    """Raise InputError unless a model's ``model_sampling`` is SD1.5's: epsilon prediction on its 1000-step
    noise schedule, which is what the core's DDIM inversion and sampling assume.

    Args:
        sampling: ComfyUI's ``model_sampling`` object (after object patches such as ModelSamplingDiscrete's).
    """
    import comfy.model_sampling

    prediction = type(sampling).calculate_denoised.__qualname__.split(".")[0]
    if not isinstance(sampling, comfy.model_sampling.EPS) or prediction != "EPS":
        raise InputError(f"the model's prediction type is {prediction}, not epsilon: AdaptiveDrag needs an SD1.x "
                         "epsilon model (remove ModelSamplingDiscrete or a similar node, or use another checkpoint)")
    sigmas = getattr(sampling, "sigmas", None)
    expected = sd15_sigmas()
    if (not isinstance(sigmas, torch.Tensor) or sigmas.shape != expected.shape
            or not torch.allclose(sigmas.detach().double().cpu(), expected, rtol=1e-3)):
        raise InputError("the model's noise schedule is not SD1.5's (zero terminal SNR, LCM or another "
                         "ModelSampling node): AdaptiveDrag inverts and samples on SD1.5's schedule")


@functools.lru_cache(maxsize=1)  # checked on every bridged node run; never modified (callers only compare)
def sd15_sigmas() -> torch.Tensor:
    """SD1.5's 1000 training noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64."""
    from diffusers import DDIMScheduler

    alphas_cumprod = DDIMScheduler(**SD15_SCHEDULER_CONFIG).alphas_cumprod.double()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def ignored_patches(model) -> list[str]:
    """What a ModelPatcher carries that the core's UNet does not apply, one readable name each.

    Weight patches (LoraLoader's) do apply; the model's sampling object and compute dtype are checked and used
    elsewhere. Everything else changes ComfyUI's own forward pass or sampler, which the core does not run.
    """
    names = []
    transformer_options = model.model_options.get("transformer_options", {})
    for kind, patches in transformer_options.get("patches", {}).items():
        names += [f"{kind} {callable_name(patch)}" for patch in patches]
    for kind, blocks in transformer_options.get("patches_replace", {}).items():
        names += [f"{kind} replacement {callable_name(patch)}" for patch in blocks.values()]
    for key, value in model.model_options.items():  # sampler functions and wrappers; flags are not callable
        names += [f"{key} {callable_name(patch)}" for patch in (value if isinstance(value, list) else [value])
                  if callable(patch)]
    names += [f"object patch {name}" for name in model.object_patches
              if name not in ("model_sampling", "manual_cast_dtype")]
    names += [f"weight wrapper on {key}" for key in getattr(model, "weight_wrapper_patches", {})]
    for kind in ("wrappers", "callbacks"):
        for name, groups in getattr(model, kind, {}).items():
            if any(groups.values()):
                names.append(f"{kind[:-1]} {name}")
    if getattr(model, "hook_patches", None):
        names.append("hooks")
    return names


def callable_name(function) -> str:
    """A short readable name of a patch function or object (``FreeU.patch.output_block_patch``)."""
    function = getattr(function, "func", function)  # functools.partial
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return name.replace(".<locals>", "")


def stage_memory(stage: str, latent: torch.Tensor, dtype: torch.dtype = torch.float16) -> int:
    """Bytes a stage needs on the GPU beyond the model's weights, for ComfyUI's ``memory_required``.

    From ``bench estimate`` at 512x512 in fp16 (docs/performance.md, "Memory and compute without a GPU": each
    stage's peak less the 2.142 GiB of weights), scaled by the latent's pixel count and the dtype's size.

    Args:
        stage: a key of :data:`STAGE_MEMORY_GIB_512`.
        latent: the scaled or unscaled latent [1, 4, h, w] the stage runs on.
        dtype: the UNet's compute dtype.
    """
    pixels = latent.shape[-1] * latent.shape[-2] / (64 * 64)
    return int(STAGE_MEMORY_GIB_512[stage] * 2**30 * pixels * dtype.itemsize / 2)


STAGE_MEMORY_GIB_512 = {
    "lora": 3.144,
    "lora_checkpointed": 0.903,
    "inversion": 0.081,
    "drag": 2.446,
    "sampling": 1.512,
}


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


# Per ComfyUI model (the BaseModel its ModelPatcher clones share): the diffusers UNet, weights on meta between
# node runs. It goes with the model.
_UNETS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _from_model_patcher(model, trainable: bool, stage: Optional[str], latent: Optional[torch.Tensor]) -> CoreModel:
    import warnings

    import comfy.model_management
    import comfy.utils

    unet_config = model.model.model_config.unet_config
    check_sd1(unet_config)
    check_epsilon_sampling(model.get_model_object("model_sampling"))
    ignored = ignored_patches(model)
    if ignored:
        warnings.warn("the AdaptiveDrag nodes apply weight patches (LoraLoader) only; ignored here: "
                      + ", ".join(ignored), IgnoredPatchWarning)
    dtype = compute_dtype(model.get_model_object("manual_cast_dtype"), model.model.get_dtype())
    memory_required = stage_memory(stage, latent, dtype) if stage else 0
    patched = model.clone()
    # Outside inference mode, so weights ComfyUI moves or patches now are ordinary tensors.
    with torch.inference_mode(False):
        # Loading applies the clone's weight patches (the user's LoRAs) to the shared weights, in ComfyUI's
        # own way, and keeps them there while this node runs.
        comfy.model_management.load_models_gpu([patched], memory_required=memory_required, force_full_load=True)
        comfy_weights = patched.model.diffusion_model.state_dict()
        check_plain_weights(comfy_weights)
        key_map = comfy.utils.unet_to_diffusers(unet_config)
        weights = {}
        for diffusers_key, comfy_key in key_map.items():
            if comfy_key in comfy_weights:
                value = comfy_weights[comfy_key]
                if value.is_floating_point() and value.dtype != dtype:
                    value = value.to(dtype)  # fp8 storage, or ComfyUI's manual cast: compute in ``dtype``
                weights[diffusers_key] = ordinary_alias(value) if trainable else value
        unet = _UNETS.get(model.model)
        if unet is None:
            with torch.device("meta"):
                unet = _UNETS.setdefault(model.model, diffusers_unet(unet_config))
        unet.load_state_dict(weights, strict=True, assign=True)
    return CoreModel(unet, float(model.model.latent_format.scale_factor))


def diffusers_unet(unet_config: dict) -> torch.nn.Module:
    """A frozen diffusers UNet for ComfyUI's SD1.x UNet config (on the current default device)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**diffusers_unet_config(unet_config))
    # Frozen before weights are assigned: an inference tensor may not be made to require gradients.
    return unet.eval().requires_grad_(False)


def check_plain_weights(comfy_weights: dict) -> None:
    """Refuse weights stored with per-tensor scales (ComfyUI's scaled fp8), which a plain cast would misread."""
    scaled = [key for key in comfy_weights if key.endswith(("scale_weight", "scale_input"))]
    if scaled:
        raise InputError(f"the model stores scaled fp8 weights ({scaled[0]}), which AdaptiveDrag cannot use; "
                         "load an fp16 or fp32 SD1.5 checkpoint")


def compute_dtype(manual_cast_dtype: Optional[torch.dtype], stored_dtype: torch.dtype) -> torch.dtype:
    """The dtype the core's UNet computes in: ComfyUI's manual-cast dtype when it casts, else the weights' own;
    low-precision storage (fp8) computes in float16."""
    if manual_cast_dtype in COMPUTE_DTYPES:
        return manual_cast_dtype
    return stored_dtype if stored_dtype in COMPUTE_DTYPES else torch.float16


def _forget_weights(unet: torch.nn.Module) -> None:
    """Point the UNet's weights at the meta device, so it keeps nothing of ComfyUI's alive between runs."""
    placeholders = {key: torch.empty_like(value, device="meta") for key, value in unet.state_dict().items()}
    unet.load_state_dict(placeholders, strict=True, assign=True)


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


def latent_samples(latent: dict) -> torch.Tensor:
    """The ``samples`` tensor [B, C, h, w] of a ComfyUI LATENT; raises InputError for anything else."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        raise InputError("expected a LATENT from Encode Working Copy or VAE Encode")
    return samples


def scaled_latent(latent: dict, model: CoreModel) -> torch.Tensor:
    """The first latent of a ComfyUI LATENT, scaled for the core, as a new ordinary tensor [1, 4, h, w]."""
    samples = latent_samples(latent)
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


def vae_encode(vae, image: torch.Tensor) -> torch.Tensor:
    """The unscaled latent [1, 4, h, w] of IMAGE [1, H, W, 3], as ComfyUI's VAE Encode makes it.

    Args:
        vae: a ComfyUI VAE; outside ComfyUI (tests, scripts) the core's ``SDComponents``.
        image: pixels in 0..1, sides multiples of 8.
    """
    if hasattr(vae, "first_stage_model"):
        return vae.encode(image[..., :3])
    if hasattr(vae, "vae") and hasattr(vae, "latent_scale"):
        with torch.no_grad():
            return vae.vae.encode(image[..., :3].permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean
    raise InputError(f"expected a VAE from Load Checkpoint, got {type(vae).__name__}")


def vae_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """IMAGE [1, H, W, 3] in 0..1 (CPU) of an unscaled latent, as ComfyUI's VAE Decode makes it."""
    if hasattr(vae, "first_stage_model"):
        return vae.decode(latent)[:1, ..., :3].float().cpu()
    if hasattr(vae, "vae") and hasattr(vae, "latent_scale"):
        with torch.no_grad():
            pixels = vae.vae.decode(latent.float()).sample
        return ((pixels.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()
    raise InputError(f"expected a VAE from Load Checkpoint, got {type(vae).__name__}")


@dataclass
class MappedMap:
    """A mask or label map fitted to the image the points belong to.

    Args:
        array: bool mask or int labels [H, W] at the image's size, or None when there is none to use.
        note: what was done to it, for the node (None when it was used as given).
    """

    array: Optional[np.ndarray]
    note: Optional[str] = None


def user_mask(mask: Optional[torch.Tensor], width: int, height: int) -> MappedMap:
    """A ComfyUI MASK ([H, W] or [B, H, W], 1 = may change) as bool [height, width].

    A mask of another size is mapped onto the image (nearest, pixel-centre aligned). An empty mask, such as the
    64x64 placeholder Load Image gives for a picture without alpha, counts as no mask.
    """
    if mask is None:
        return MappedMap(None)
    mask = mask.detach().float().cpu()
    if mask.ndim == 3:
        mask = mask[0]
    if mask.ndim != 2:
        raise InputError(f"mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    array = mask.numpy() > 0.5
    if not array.any():
        if array.shape == PLACEHOLDER_MASK_SIZE and (height, width) != PLACEHOLDER_MASK_SIZE:
            return MappedMap(None, "mask: Load Image's empty placeholder (the picture has no alpha channel), so no "
                                   "mask is used; paint one in Load Image's mask editor to keep the rest unchanged")
        return MappedMap(None, "mask: empty (nothing may change), so no mask is used, as the public codes do")
    return fit_map(array, "mask", width, height)


def fit_map(array: np.ndarray, name: str, width: int, height: int) -> MappedMap:
    """``array`` [h, w] (a mask or label map) at (width, height): as given when it fits, else resized nearest."""
    array = np.asarray(array)
    source_height, source_width = array.shape[:2]
    if (source_width, source_height) == (width, height):
        return MappedMap(array)
    note = f"{name}: {source_width}x{source_height} mapped onto the {width}x{height} image"
    if abs(source_width / source_height - width / height) > 0.01 * width / height:
        note += " (stretched: another aspect ratio)"
    return MappedMap(resize_labels(array, width, height), note)


def display_factor(width: int) -> int:
    """The whole factor that enlarges a picture shown on a node to at least :data:`DISPLAY_MIN_WIDTH` pixels."""
    return max(1, -(-DISPLAY_MIN_WIDTH // width))


def for_display(image: torch.Tensor) -> torch.Tensor:
    """An IMAGE to show on a node: a small one enlarged by a whole factor (nearest: every pixel stays sharp)."""
    factor = display_factor(image.shape[2])
    return image.repeat_interleave(factor, 1).repeat_interleave(factor, 2) if factor > 1 else image


def comfy_mask(mask: np.ndarray) -> torch.Tensor:
    """A ComfyUI MASK [1, H, W] (1.0 = may change) from bool [H, W]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32)).unsqueeze(0)
