"""Test helper: write diffusers SD1.x modules as a single-file checkpoint in the original LDM/CompVis layout.

The renaming is the inverse of what ``load_sd15`` does for single files, written independently so that the
round trip (diffusers -> LDM -> loader) checks the loader rather than itself.
"""

from __future__ import annotations

import re

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_checkpoint(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """All three modules' weights under LDM names (``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.transformer.text_model.``), as an SD1.x ``.safetensors`` file holds them."""
    checkpoint = {}
    checkpoint.update(ldm_unet_weights(unet))
    checkpoint.update(ldm_vae_weights(vae))
    checkpoint.update(ldm_clip_weights(text_encoder))
    return checkpoint


def ldm_unet_weights(unet) -> dict[str, torch.Tensor]:
    per_level = unet.config.layers_per_block + 1  # resnets (+ attentions), then one down/up-sampler
    up_levels_with_attention = {int(key.split(".")[1]) for key in unet.state_dict() if ".attentions." in key
                                and key.startswith("up_blocks.")}
    renamed = {}
    for key, value in unet.state_dict().items():
        renamed[UNET_PREFIX + _ldm_unet_name(key, per_level, up_levels_with_attention)] = value.clone()
    return renamed


def _ldm_unet_name(key: str, per_level: int, up_levels_with_attention: set) -> str:
    for old, new in _UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = f"input_blocks.{per_level * level + index + 1}"
        return f"{block}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    match = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)
    if match:
        return f"input_blocks.{per_level * (int(match[1]) + 1)}.0.op.{match[2]}"
    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        block = f"output_blocks.{per_level * level + index}"
        return f"{block}.0.{_resnet_rest(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)
    if match:
        # The upsampler ends the level's last block, after its resnet (and attention, if any).
        level = int(match[1])
        layer = 2 if level in up_levels_with_attention else 1
        return f"output_blocks.{per_level * level + per_level - 1}.{layer}.conv.{match[2]}"
    match = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)
    if match:
        return f"middle_block.{2 * int(match[1])}.{_resnet_rest(match[2])}"
    match = re.match(r"mid_block\.attentions\.0\.(.*)", key)
    if match:
        return f"middle_block.1.{match[1]}"
    raise KeyError(f"no LDM name for UNet weight {key}")


def _resnet_rest(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_UNET_RESNET[layer]}.{param}"


def ldm_vae_weights(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    renamed = {}
    for key, value in vae.state_dict().items():
        name = _ldm_vae_name(key, levels)
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        renamed[VAE_PREFIX + name] = value.clone()
    return renamed


def _ldm_vae_name(key: str, levels: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    match = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if match:
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3]}"
    match = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key)
    if match:
        return f"encoder.down.{match[1]}.downsample.{match[2]}"
    match = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key)
    if match:
        return f"decoder.up.{levels - 1 - int(match[1])}.block.{match[2]}.{match[3]}"
    match = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key)
    if match:
        return f"decoder.up.{levels - 1 - int(match[1])}.upsample.{match[2]}"
    match = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key)
    if match:
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    match = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key)
    if match:
        return f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[match[2]]}.{match[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def ldm_clip_weights(text_encoder) -> dict[str, torch.Tensor]:
    # SD1.x files store transformers' CLIPTextModel with its "text_model." level (transformers >= 5.6 drops it).
    return {
        CLIP_PREFIX + "text_model." + key.removeprefix("text_model."): value.clone()
        for key, value in text_encoder.state_dict().items()
    }
