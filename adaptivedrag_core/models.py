"""Stable Diffusion 1.x components: the container every stage takes, and the tiny random-weight factory.

Real checkpoints are loaded offline from the user's files (see ``load_sd15``); the tiny factory builds
the same architecture family with tiny widths for tests and the demo.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import InputError

SD15_LATENT_SCALE = 0.18215

# SD1.5's DDIM schedule (method.md, "DDIM inversion").
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


@dataclass
class SDComponents:
    """What a drag edit needs from an SD1.x model.

    Args:
        unet: the diffusers UNet (the identity LoRA is injected into it as a peft adapter).
        vae: the diffusers AutoencoderKL.
        text_encoder: CLIP text model, or None when the caller supplies text embeddings itself.
        tokenizer: CLIP tokenizer, or None (an empty prompt still works without one).
        latent_scale: multiply VAE latents by this (0.18215 for SD1.x).
        scheduler_config: DDIMScheduler settings.
        native_size: the image side the model was trained at (512 for SD1.5); the edit's default working size.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: Optional[torch.nn.Module]
    tokenizer: Optional[object]
    latent_scale: float = SD15_LATENT_SCALE
    scheduler_config: Optional[dict] = None
    native_size: int = 512

    def __post_init__(self):
        if self.scheduler_config is None:
            self.scheduler_config = dict(SD15_SCHEDULER_CONFIG)

    def make_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler(**self.scheduler_config)

    def to(self, device=None, dtype=None) -> "SDComponents":
        # Only the given arguments: diffusers warns about a dtype cast whenever "dtype" is passed, even None.
        moves = {name: value for name, value in (("device", device), ("dtype", dtype)) if value is not None}
        for module in (self.unet, self.vae, self.text_encoder):
            if module is not None and moves:
                module.to(**moves)
        return self


def tiny_sd_components(seed: int = 0) -> SDComponents:
    """Random-weight SD1.x-family model with tiny widths (same block layout, 16 self-attention layers).

    The output of such a model is noise; it exists so the whole pipeline can run in seconds on a CPU.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        latent_scale=_unit_variance_scale(vae))


def _unit_variance_scale(vae) -> float:
    # SD's 0.18215 makes its latents roughly unit-variance; do the same for a random VAE, on a fixed test image.
    ramp = torch.linspace(-1, 1, 64)
    image = torch.stack([ramp[None, :].expand(64, 64), ramp[:, None].expand(64, 64), ramp.outer(ramp)])[None]
    with torch.no_grad():
        latent = vae.encode(image).latent_dist.mean
    return float(1.0 / latent.std())


def random_sd15_components(device="cpu") -> SDComponents:
    """Full-size SD1.5 (UNet, VAE, CLIP text encoder) with random weights, built directly on ``device``.

    For speed and memory measurements, which do not depend on the weights. No tokenizer: an empty prompt
    needs none.
    """
    configs = _read_configs(SD15_CONFIG_DIR)
    with torch.device(device):
        modules = {part: _build_module(part, configs[part]).eval().requires_grad_(False) for part in MODEL_PARTS}
    return SDComponents(**modules, tokenizer=None)


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer with a character-level vocabulary and no merges (any text tokenises)."""
    from transformers import CLIPTokenizer

    chars = _byte_level_alphabet()
    vocab_tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(
            json.dumps({token: i for i, token in enumerate(vocab_tokens)}), encoding="utf-8"
        )
        Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(folder, pad_token="<|endoftext|>", model_max_length=77,
                                                  local_files_only=True)
    return tokenizer


def _byte_level_alphabet() -> list[str]:
    # GPT-2/CLIP byte-level BPE: every byte maps to one printable unicode character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


# ---------------------------------------------------------------------------------------------------------
# Loading real SD1.x models, offline.

SD15_CONFIG_DIR = Path(__file__).parent / "configs" / "sd15"
MODEL_PARTS = ("unet", "vae", "text_encoder")

# CLIP's special token ids; SD1.x pads prompts with the end-of-text token.
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407

# Key prefixes of the original LDM single-file layout.
LDM_PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.",
}
_PART_NAMES = {"unet": "UNet", "vae": "VAE", "text_encoder": "CLIP text encoder"}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_sd15(
    path,
    device=None,
    dtype: Optional[torch.dtype] = None,
    tokenizer_path=None,
    config_dir=None,
) -> SDComponents:
    """Load an SD1.x model from local files only; nothing is downloaded.

    Args:
        path: a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, optional ``tokenizer/``), or a
            single-file checkpoint in the original LDM layout (``.safetensors``; ``.ckpt``/``.pt`` pickles only
            when ``torch.load(weights_only=True)`` can read them).
        device: where to put the modules (default: stay on the CPU).
        dtype: parameter dtype of all three modules (default float32). fp16/bf16 is the caller's choice on a
            GPU; the SD1.5 VAE usually decodes fine in fp16, but use float32 for it if decodes come out black/NaN.
        tokenizer_path: a CLIP tokenizer folder (``vocab.json`` and ``merges.txt``, or ``tokenizer.json``); when
            given it is used instead of the diffusers folder's ``tokenizer/``. CLIP's vocabulary is not bundled:
            without any tokenizer only the empty prompt can be encoded.
        config_dir: folder with ``unet/``, ``vae/``, ``text_encoder/`` ``config.json`` describing the expected
            architecture (default: SD1.5's, bundled). Single-file checkpoints are built from these configs, and
            every model's weights must have exactly their shapes, otherwise it is "not SD1.x".

    Raises:
        InputError: missing path, a missing or incomplete part, an unreadable or unsafe file, or a model that
            is not SD1.x.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model not found: {path}")
    configs = _read_configs(Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR)
    dtype = dtype or torch.float32
    if path.is_dir():
        modules = _load_diffusers_folder(path, configs, dtype)
        tokenizer_folder = path / "tokenizer" if (path / "tokenizer").is_dir() else None
    else:
        modules = _load_single_file(path, configs, dtype)
        tokenizer_folder = None
    if tokenizer_path is not None:
        tokenizer_folder = Path(tokenizer_path)
    for module in modules.values():
        module.eval().requires_grad_(False)
    components = SDComponents(
        **modules,
        tokenizer=_load_tokenizer(tokenizer_folder) if tokenizer_folder is not None else None,
        latent_scale=float(modules["vae"].config.get("scaling_factor", SD15_LATENT_SCALE)),
    )
    return components.to(device=device)


def model_files(path, tokenizer_path=None) -> list[tuple[str, Path]]:
    """The files whose content makes up a model as :func:`load_sd15` loads it, as (name, path) pairs.

    A single file is itself; a diffusers folder is every file in its ``unet/``, ``vae/``, ``text_encoder/`` and
    ``tokenizer/`` folders, named by their path inside it; a ``tokenizer_path`` adds its files. For cache keys
    (``cache.DiskCache.fingerprint``): other weights, or another tokenizer, give other keys.
    """
    path = Path(path)
    files = [(path.name, path)] if path.is_file() else [
        (entry.relative_to(path).as_posix(), entry)
        for part in (*MODEL_PARTS, "tokenizer") if (path / part).is_dir()
        for entry in sorted((path / part).rglob("*")) if entry.is_file()
    ]
    if tokenizer_path is not None:
        folder = Path(tokenizer_path)
        files += [(f"--tokenizer/{entry.relative_to(folder).as_posix()}", entry)
                  for entry in sorted(folder.rglob("*")) if entry.is_file()]
    return files


def ordinary_alias(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s memory, without a copy, as an ordinary tensor that autograd may save for a backward pass.

    A tensor made under ``torch.inference_mode()`` (ComfyUI makes its model weights there) cannot be saved by
    autograd, so back-propagating through a layer that uses it fails; copying every weight costs the model's size
    again (1.6 GiB for SD1.5's UNet in fp16). The alias is a second tensor on the same storage, made outside
    inference mode. An ordinary tensor is returned as it is. The caller must not change ``tensor`` in place while
    a backward pass may still read the alias: the two do not share a version counter.
    """
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def encode_prompt(components: SDComponents, prompt: str, device=None) -> torch.Tensor:
    """CLIP text embeddings of ``prompt``, [1, 77, D] (the text encoder's last hidden state, as SD1.x uses).

    Args:
        components: the model; its tokenizer may be None, then only an empty prompt works.
        prompt: the text ("" for none).
        device: where to run the text encoder's input (default: the text encoder's device).
    """
    encoder = components.text_encoder
    if encoder is None:
        raise InputError("this model has no text encoder, so a prompt cannot be encoded")
    max_length = encoder.config.max_position_embeddings
    token_ids = _prompt_token_ids(components.tokenizer, prompt, max_length)
    device = device if device is not None else next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(token_ids.to(device))[0]


def _prompt_token_ids(tokenizer, prompt: str, max_length: int) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(
            prompt, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
    if prompt.strip():
        raise InputError(
            "a non-empty prompt needs CLIP's tokenizer, which this model does not include: load a diffusers "
            "folder with a tokenizer/ folder, or pass a tokenizer folder holding vocab.json and merges.txt "
            "(e.g. the tokenizer/ folder of any SD1.5 diffusers model); or use an empty prompt"
        )
    # What CLIP's tokenizer gives for "": start, end, then end-of-text padding (SD1.x pads with EOS).
    return torch.tensor([[CLIP_BOS_ID] + [CLIP_EOS_ID] * (max_length - 1)])


def _read_configs(config_dir: Path) -> dict[str, dict]:
    configs = {}
    for part in MODEL_PARTS:
        config_file = config_dir / part / "config.json"
        if not config_file.is_file():
            raise InputError(f"model config not found: {config_file}")
        configs[part] = json.loads(config_file.read_text(encoding="utf-8"))
    return configs


def _build_module(part: str, config: dict) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if part == "unet":
        return UNet2DConditionModel.from_config(config)
    if part == "vae":
        return AutoencoderKL.from_config(config)
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


def _expected_shapes(part: str, config: dict) -> dict[str, torch.Size]:
    # Built on the meta device: shapes only, no memory, no initialisation cost.
    with torch.device("meta"):
        module = _build_module(part, config)
    return {key: value.shape for key, value in module.state_dict().items()}


def _check_weights(part: str, weights: dict, expected: dict, source: Path) -> None:
    """Raise InputError unless ``weights`` has every expected key with the expected shape."""
    name = _PART_NAMES[part]
    wrong = [(key, tuple(weights[key].shape), tuple(shape)) for key, shape in expected.items()
             if key in weights and weights[key].shape != shape]
    if wrong:
        # A different text-conditioning width is the usual sign of another model family: name it if present.
        key, found, wanted = next((w for w in wrong if w[0].endswith("attn2.to_k.weight")), wrong[0])
        detail = f"{name} weight '{key}' has shape {found}, SD1.x has {wanted}"
        if key.endswith("attn2.to_k.weight"):
            detail = f"its cross-attention (text) dim is {found[1]}, SD1.x uses {wanted[1]}"
        raise InputError(f"checkpoint is not SD1.x: {source} ({detail}; {len(wrong)} weights differ in shape)")
    missing = [key for key in expected if key not in weights]
    if missing:
        raise InputError(
            f"{source}: the {name} is incomplete, {len(missing)} of {len(expected)} weights are missing "
            f"(e.g. '{missing[0]}')"
        )


def _load_diffusers_folder(folder: Path, configs: dict, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for part in MODEL_PARTS:
        if not (folder / part).is_dir():
            raise InputError(f"diffusers model folder {folder} has no {part}/ folder ({_PART_NAMES[part]})")
    modules = {}
    for part in MODEL_PARTS:
        subfolder = folder / part
        try:
            with _quiet_loading():
                module = classes[part].from_pretrained(
                    subfolder, local_files_only=True, variant=weights_variant(subfolder), torch_dtype=dtype
                )
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"cannot load the {_PART_NAMES[part]} from {subfolder}: {error}") from error
        _check_weights(part, module.state_dict(), _expected_shapes(part, configs[part]), subfolder)
        modules[part] = module
    return modules


@contextmanager
def _quiet_loading():
    """No "Loading weights" progress bars from transformers or diffusers: a load takes a fraction of a second,
    and the bars would land in the CLI's one-line messages."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    shown = (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled())
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown[0]:
            transformers_logging.enable_progress_bar()
        if shown[1]:
            diffusers_logging.enable_progress_bar()


def weights_variant(subfolder: Path) -> Optional[str]:
    # Some SD1.5 folders ship only "*.fp16.safetensors" weights.
    weights = [p.name for p in subfolder.iterdir() if p.suffix in (".safetensors", ".bin")]
    if weights and all(".fp16." in name for name in weights):
        return "fp16"
    return None


def _load_single_file(path: Path, configs: dict, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    checkpoint = _read_checkpoint(path)
    _check_sd1x_family(checkpoint, path)
    modules = {}
    for part in MODEL_PARTS:
        prefix = LDM_PREFIXES[part]
        if not any(key.startswith(prefix) for key in checkpoint):
            raise InputError(f"{path} has no {_PART_NAMES[part]} weights (no keys starting with '{prefix}')")
        weights = _convert_ldm_part(part, checkpoint, configs[part], path)
        expected = _expected_shapes(part, configs[part])
        _check_weights(part, weights, expected, path)
        weights = {key: weights[key] for key in expected}  # only what the module has
        modules[part] = _module_with_weights(part, configs[part], weights, dtype)
    return modules


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"cannot read {path}: not a valid .safetensors file ({error})") from error
    if suffix in _PICKLE_SUFFIXES:
        try:
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # any failure here means the pickle is not plain tensors
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(
                f"refusing to load {path}: this pickle checkpoint cannot be read safely "
                f"(torch.load(weights_only=True) failed: {reason}). Convert it to .safetensors with a tool "
                "you trust and load that instead"
            ) from error
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise InputError(f"{path} does not hold a state dict")
        return {key: value for key, value in loaded.items() if isinstance(value, torch.Tensor)}
    raise InputError(
        f"unsupported model file {path}: expected a diffusers folder, a .safetensors file, or a .ckpt/.pt file"
    )


def _check_sd1x_family(checkpoint: dict, path: Path) -> None:
    if any(key.startswith("conditioner.embedders.") for key in checkpoint):
        raise InputError(f"checkpoint is not SD1.x: {path} looks like SDXL (it has 'conditioner.embedders.' keys)")
    if any(key.startswith("cond_stage_model.model.") for key in checkpoint):
        raise InputError(f"checkpoint is not SD1.x: {path} looks like SD2.x (its text encoder is OpenCLIP)")
    unet_prefix = LDM_PREFIXES["unet"]
    has_unet_keys = any(key.startswith(unet_prefix) for key in checkpoint)
    if has_unet_keys and f"{unet_prefix}input_blocks.0.0.weight" not in checkpoint:
        raise InputError(f"checkpoint is not SD1.x: {path} has no SD UNet ('{unet_prefix}input_blocks...')")


def _convert_ldm_part(part: str, checkpoint: dict, config: dict, path: Path) -> dict[str, torch.Tensor]:
    """One part's weights, renamed from the LDM layout to the diffusers/transformers layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    try:
        if part == "unet":
            return convert_ldm_unet_checkpoint(checkpoint, config)
        if part == "vae":
            vae_weights = {key: value for key, value in checkpoint.items() if key.startswith(LDM_PREFIXES["vae"])}
            return convert_ldm_vae_checkpoint(vae_weights, config)
    except (KeyError, IndexError) as error:  # the converters index keys a partial checkpoint lacks
        raise InputError(f"{path}: the {_PART_NAMES[part]} is incomplete (missing {error})") from error
    return _convert_ldm_clip(checkpoint, config)


def _convert_ldm_clip(checkpoint: dict, config: dict) -> dict[str, torch.Tensor]:
    # The single-file layout is transformers' CLIPTextModel under a prefix; very old files lack "text_model.".
    # Newer transformers (>= 5.6) dropped the "text_model." level from CLIPTextModel, older ones have it.
    prefix = LDM_PREFIXES["text_encoder"]
    wanted = set(_expected_shapes("text_encoder", config))
    with_level = any(key.startswith("text_model.") for key in wanted)
    weights = {}
    for key, value in checkpoint.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].removeprefix("text_model.")
        name = f"text_model.{name}" if with_level else name
        if name in wanted:  # drops buffers such as position_ids
            weights[name] = value
    return weights


def _module_with_weights(part: str, config: dict, weights: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Build a module and take ``weights`` as its parameters, without first initialising random ones."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # accelerate is optional: then the module is initialised before being overwritten
        from contextlib import nullcontext as init_empty_weights
    with init_empty_weights():
        module = _build_module(part, config)
    module.load_state_dict(
        {key: value.to(dtype).contiguous() for key, value in weights.items()}, strict=True, assign=True
    )
    return module


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    has_bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not (has_bpe_files or (folder / "tokenizer.json").is_file()):
        raise InputError(f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json")
    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot load the CLIP tokenizer from {folder}: {error}") from error
