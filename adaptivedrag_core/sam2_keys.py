"""Tensor names of Meta's SAM2 checkpoints and of transformers' ``Sam2Model``, both ways.

Meta's files (``sam2.1_hiera_tiny.pt`` and the ``.safetensors`` copies ComfyUI users keep) name their tensors after
the ``sam2`` package's modules (``image_encoder.trunk.blocks.0.norm1.weight``); transformers names the same tensors
after its own (``vision_encoder.backbone.blocks.0.layer_norm1.weight``). One table, :data:`NAME_PAIRS`, holds both
spellings of every tensor the image path needs, so a file can be read into transformers' model and a transformers
model written back under Meta's names.

Two entries are not one-to-one: Meta's four ``point_embeddings.{row}`` vectors are the rows of transformers'
``point_embed`` table, and Meta's one positional-encoding matrix is held twice by transformers (image and prompt
encoder). The video-tracking tensors (memory attention, memory encoder, object pointers) have no counterpart in
the image model and are left out (:data:`VIDEO_ONLY_PREFIXES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

# What each {field} of a template stands for.
_FIELDS = {
    "n": r"\d+",
    "row": r"\d+",
    "w": r"weight|bias",
    "norm": r"[1-4]",
    "attn": r"self_attn|cross_attn_token_to_image|cross_attn_image_to_token",
    "qkv": r"q_proj|k_proj|v_proj",
    "token": r"iou_token|mask_tokens|obj_score_token",
    "conv": r"conv_s0|conv_s1",
    "head": r"output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head",
}

_TRUNK, _BACKBONE = "image_encoder.trunk", "vision_encoder.backbone"
_PROMPT, _DECODER = "sam_prompt_encoder", "sam_mask_decoder"
_LAYER, _HF_LAYER = f"{_DECODER}.transformer.layers.{{n}}", "mask_decoder.transformer.layers.{n}"
_FINAL = f"{_DECODER}.transformer.final_attn_token_to_image"
_HF_FINAL = "mask_decoder.transformer.final_attn_token_to_image"

# (Meta's name, transformers' name) of every tensor of the image model.
NAME_PAIRS = (
    ("no_mem_embed", "no_memory_embedding"),
    # Image encoder: the Hiera trunk and the feature-pyramid neck.
    (f"{_TRUNK}.pos_embed", f"{_BACKBONE}.pos_embed"),
    (f"{_TRUNK}.pos_embed_window", f"{_BACKBONE}.pos_embed_window"),
    (f"{_TRUNK}.patch_embed.proj.{{w}}", f"{_BACKBONE}.patch_embed.projection.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.norm1.{{w}}", f"{_BACKBONE}.blocks.{{n}}.layer_norm1.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.norm2.{{w}}", f"{_BACKBONE}.blocks.{{n}}.layer_norm2.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.attn.qkv.{{w}}", f"{_BACKBONE}.blocks.{{n}}.attn.qkv.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.attn.proj.{{w}}", f"{_BACKBONE}.blocks.{{n}}.attn.proj.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.proj.{{w}}", f"{_BACKBONE}.blocks.{{n}}.proj.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.mlp.layers.0.{{w}}", f"{_BACKBONE}.blocks.{{n}}.mlp.proj_in.{{w}}"),
    (f"{_TRUNK}.blocks.{{n}}.mlp.layers.1.{{w}}", f"{_BACKBONE}.blocks.{{n}}.mlp.proj_out.{{w}}"),
    ("image_encoder.neck.convs.{n}.conv.{w}", "vision_encoder.neck.convs.{n}.{w}"),
    # Prompt encoder.
    (f"{_PROMPT}.pe_layer.positional_encoding_gaussian_matrix", "shared_image_embedding.positional_embedding"),
    (f"{_PROMPT}.pe_layer.positional_encoding_gaussian_matrix", "prompt_encoder.shared_embedding.positional_embedding"),
    (f"{_PROMPT}.point_embeddings.{{row}}.weight", "prompt_encoder.point_embed.weight"),
    (f"{_PROMPT}.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    (f"{_PROMPT}.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    (f"{_PROMPT}.mask_downscaling.0.{{w}}", "prompt_encoder.mask_embed.conv1.{w}"),
    (f"{_PROMPT}.mask_downscaling.1.{{w}}", "prompt_encoder.mask_embed.layer_norm1.{w}"),
    (f"{_PROMPT}.mask_downscaling.3.{{w}}", "prompt_encoder.mask_embed.conv2.{w}"),
    (f"{_PROMPT}.mask_downscaling.4.{{w}}", "prompt_encoder.mask_embed.layer_norm2.{w}"),
    (f"{_PROMPT}.mask_downscaling.6.{{w}}", "prompt_encoder.mask_embed.conv3.{w}"),
    # Mask decoder: tokens, the two-way transformer, the upscaling and the MLP heads.
    (f"{_DECODER}.{{token}}.weight", "mask_decoder.{token}.weight"),
    (f"{_DECODER}.{{conv}}.{{w}}", "mask_decoder.{conv}.{w}"),
    (f"{_LAYER}.{{attn}}.{{qkv}}.{{w}}", f"{_HF_LAYER}.{{attn}}.{{qkv}}.{{w}}"),
    (f"{_LAYER}.{{attn}}.out_proj.{{w}}", f"{_HF_LAYER}.{{attn}}.o_proj.{{w}}"),
    (f"{_LAYER}.norm{{norm}}.{{w}}", f"{_HF_LAYER}.layer_norm{{norm}}.{{w}}"),
    (f"{_LAYER}.mlp.layers.0.{{w}}", f"{_HF_LAYER}.mlp.proj_in.{{w}}"),
    (f"{_LAYER}.mlp.layers.1.{{w}}", f"{_HF_LAYER}.mlp.proj_out.{{w}}"),
    (f"{_FINAL}.{{qkv}}.{{w}}", f"{_HF_FINAL}.{{qkv}}.{{w}}"),
    (f"{_FINAL}.out_proj.{{w}}", f"{_HF_FINAL}.o_proj.{{w}}"),
    (f"{_DECODER}.transformer.norm_final_attn.{{w}}", "mask_decoder.transformer.layer_norm_final_attn.{w}"),
    (f"{_DECODER}.output_upscaling.0.{{w}}", "mask_decoder.upscale_conv1.{w}"),
    (f"{_DECODER}.output_upscaling.1.{{w}}", "mask_decoder.upscale_layer_norm.{w}"),
    (f"{_DECODER}.output_upscaling.3.{{w}}", "mask_decoder.upscale_conv2.{w}"),
    # The three-layer heads: transformers names the first and last layers apart.
    (f"{_DECODER}.{{head}}.layers.0.{{w}}", "mask_decoder.{head}.proj_in.{w}"),
    (f"{_DECODER}.{{head}}.layers.1.{{w}}", "mask_decoder.{head}.layers.0.{w}"),
    (f"{_DECODER}.{{head}}.layers.2.{{w}}", "mask_decoder.{head}.proj_out.{w}"),
)

# Meta's tensors that only video tracking uses.
VIDEO_ONLY_PREFIXES = (
    "memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial",
)


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    # re.split alternates literal text and field names.
    return re.compile("".join(re.escape(part) if index % 2 == 0 else f"(?P<{part}>{_FIELDS[part]})"
                              for index, part in enumerate(parts)))


_PAIRS = tuple((original, hf, _pattern(original), _pattern(hf)) for original, hf in NAME_PAIRS)


def is_video_only(name: str) -> bool:
    """Whether a tensor of Meta's checkpoints belongs to video tracking only."""
    return name.startswith(VIDEO_ONLY_PREFIXES)


@dataclass
class TransformersWeights:
    """A checkpoint's tensors under transformers' names.

    Args:
        tensors: transformers' name -> tensor (the rows of a stacked tensor joined in row order).
        unknown: the checkpoint's names that are neither an image-model tensor nor a video-only one.
    """

    tensors: dict[str, torch.Tensor]
    unknown: list[str] = field(default_factory=list)


def to_transformers(state_dict: dict) -> TransformersWeights:
    """Rename the tensors of a state dict with Meta's names to transformers' names, dropping the video-only ones."""
    tensors, rows, unknown = {}, {}, []
    for name, tensor in state_dict.items():
        if is_video_only(name):
            continue
        matches = [(hf, match.groupdict()) for _, hf, pattern, _ in _PAIRS if (match := pattern.fullmatch(name))]
        if not matches:
            unknown.append(name)
        for hf, fields in matches:
            if "row" in fields:
                rows.setdefault(hf.format(**fields), {})[int(fields["row"])] = tensor
            else:
                tensors[hf.format(**fields)] = tensor
    for name, parts in rows.items():
        tensors[name] = torch.cat([parts[row] for row in sorted(parts)])
    return TransformersWeights(tensors, sorted(unknown))


def to_original(state_dict: dict) -> dict:
    """Rename the tensors of a transformers ``Sam2Model`` state dict to Meta's names (a stacked tensor becomes one
    tensor per row; views, not copies).

    Raises:
        KeyError: a name that is not in :data:`NAME_PAIRS`.
    """
    original = {}
    for name, tensor in state_dict.items():
        template, fields = _original_template(name)
        if "{row}" in template:
            original.update({template.format(row=row, **fields): tensor[row:row + 1] for row in range(len(tensor))})
        else:
            original[template.format(**fields)] = tensor
    return original


def original_name(name: str) -> str:
    """Meta's name of a transformers tensor, for messages; ``*`` stands for the rows of a stacked tensor."""
    template, fields = _original_template(name)
    return template.format(row="*", **fields)


def _original_template(name: str) -> tuple[str, dict]:
    for original, _, _, pattern in _PAIRS:
        if match := pattern.fullmatch(name):
            return original, match.groupdict()
    raise KeyError(f"no SAM2 checkpoint name for transformers tensor {name!r}")
