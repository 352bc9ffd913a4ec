"""The project's own small SD1.x-architecture model, trained on procedural scenes (:mod:`scenes`).

It has SD1.5's block layout and module names (a 4-block ``AutoencoderKL``; a ``UNet2DConditionModel`` with three
cross-attention down blocks and a plain one, ``layers_per_block`` 2, so 16 self-attention layers and the drag
features at ``up_blocks[2]``; a CLIP text encoder), only narrower, and a native size of 128 px (16x16 latents).
So every stage of the pipeline (identity LoRA, DDIM inversion, drag features, reference control, CLoss) runs on it
unchanged, and its edits can be scored against a known answer (``bench scenes``).

The weights ship in the package as a diffusers folder (``scene_model/``: ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/`` and ``scene_model.json``) and load offline like any model, through :func:`models.load_sd15`.
``python -m adaptivedrag_core train-scenes`` reproduces them (:mod:`scene_training`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import InputError
from .models import MODEL_PARTS, SDComponents, load_sd15, tiny_clip_tokenizer

#: The shipped model (a diffusers folder inside the package).
SCENE_MODEL_DIR = Path(__file__).parent / "scene_model"
#: The file beside the parts that says what the model is (native size, how it was trained).
SCENE_MODEL_INFO = "scene_model.json"


@dataclass(frozen=True)
class SceneModelSpec:
    """The scene model's widths and size; the defaults are the shipped model's.

    Args:
        native_size: image side the model is trained at (pixels); latents are a 1/8 of it.
        unet_channels: ``block_out_channels`` of the UNet's four blocks.
        unet_heads: attention heads per layer (diffusers' ``attention_head_dim`` in SD1.x configs).
        vae_channels: ``block_out_channels`` of the VAE's four blocks.
        text_width, text_layers, text_length: the CLIP text encoder's width, depth and token count.
        norm_groups: GroupNorm groups in the UNet and the VAE.
    """

    native_size: int = 128
    unet_channels: tuple[int, ...] = (32, 64, 96, 96)
    unet_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    text_width: int = 64
    text_layers: int = 2
    text_length: int = 32
    norm_groups: int = 16

    def configs(self, vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> dict[str, dict]:
        """diffusers / transformers configs of the three parts (the layout of ``configs/sd15``)."""
        unet = {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.native_size // 8,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": list(self.unet_channels),
            "layers_per_block": 2,
            "cross_attention_dim": self.text_width,
            "attention_head_dim": self.unet_heads,
            "norm_num_groups": self.norm_groups,
        }
        vae = {
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": list(self.vae_channels),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": self.norm_groups,
            "sample_size": self.native_size,
            "scaling_factor": 1.0,
        }
        text_encoder = {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": self.text_width,
            "intermediate_size": 2 * self.text_width,
            "num_hidden_layers": self.text_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": self.text_length,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        }
        return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_scene_components(spec: SceneModelSpec, seed: int = 0) -> SDComponents:
    """Freshly initialised scene-model parts (the starting point of training), in float32 on the CPU."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    tokenizer.model_max_length = spec.text_length
    configs = spec.configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return SDComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, latent_scale=1.0,
                        native_size=spec.native_size)


def save_scene_model(components: SDComponents, folder: Path, info: dict) -> None:
    """Write a diffusers folder: the three parts (safetensors), the tokenizer, and ``scene_model.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    components.vae.register_to_config(scaling_factor=float(components.latent_scale))
    for part in MODEL_PARTS:
        getattr(components, part).save_pretrained(folder / part, safe_serialization=True)
    components.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / SCENE_MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def scene_model_info(folder: Optional[Path] = None) -> dict:
    """What ``scene_model.json`` says of a scene model (its native size, how it was trained)."""
    folder = Path(folder) if folder is not None else SCENE_MODEL_DIR
    info_file = folder / SCENE_MODEL_INFO
    if not info_file.is_file():
        raise InputError(f"no scene model in {folder} (no {SCENE_MODEL_INFO}); train one with "
                         "'python -m adaptivedrag_core train-scenes'")
    return json.loads(info_file.read_text(encoding="utf-8"))


def load_scene_model(folder: Optional[Path] = None, device=None) -> SDComponents:
    """Load the scene model (default: the one shipped in the package), offline, as :class:`SDComponents`."""
    folder = Path(folder) if folder is not None else SCENE_MODEL_DIR
    info = scene_model_info(folder)
    components = load_sd15(folder, device=device, config_dir=folder)
    components.native_size = int(info["native_size"])
    return components


def spec_info(spec: SceneModelSpec) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(spec).items()}
