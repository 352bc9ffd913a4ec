"""Meta's SAM2 tensor names against transformers': the shipped configs of all four sizes build a model whose every
tensor has a counterpart in the ``sam2`` package's model, of the same shape, and back."""

import pytest
import torch

from adaptivedrag_core.sam2_generator import build_package_model, package_model
from adaptivedrag_core.sam2_keys import is_video_only, original_name, to_original, to_transformers
from adaptivedrag_core.sam2_loader import SIZES, Sam2Spec, build_sam2_model, random_sam2


def shapes(state_dict):
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


def package_blocks(model):
    """What each trunk block of the sam2 package's model does: widths, heads, window, query pooling."""
    return [(block.dim, block.dim_out, block.attn.num_heads, block.window_size, tuple(block.q_stride or ()))
            for block in model.image_encoder.trunk.blocks]


def transformers_blocks(model):
    return [(block.dim, block.dim_out, block.attn.num_attention_heads, block.window_size,
             tuple(block.query_stride or ())) for block in model.vision_encoder.backbone.blocks]


@pytest.mark.parametrize("spec", [Sam2Spec("2.1", size) for size in SIZES] + [Sam2Spec("2", "tiny")], ids=str)
def test_shipped_config_fits_the_sam2_packages_model(spec):
    package = build_package_model(spec)
    model = build_sam2_model(spec.size, empty=True)
    package_tensors = package.state_dict()
    mapped = to_transformers(package_tensors)
    assert mapped.unknown == []
    assert shapes(mapped.tensors) == shapes(model.state_dict())
    # What shapes do not show: windows, global attention, pooling, heads, the neck's top-down levels.
    assert transformers_blocks(model) == package_blocks(package)
    assert model.config.vision_config.fpn_top_down_levels == package.image_encoder.neck.fpn_top_down_levels
    # Everything the mapping drops is video tracking.
    dropped = set(package_tensors) - set(to_original(mapped.tensors))
    assert dropped and all(is_video_only(name) for name in dropped)


@pytest.fixture(scope="module")
def package_state_dict():
    torch.manual_seed(0)
    return build_package_model(Sam2Spec("2.1", "tiny")).state_dict()


def test_names_go_there_and_back(package_state_dict):
    back = to_original(to_transformers(package_state_dict).tensors)
    assert set(back) == {name for name in package_state_dict if not is_video_only(name)}
    for name, tensor in back.items():
        assert torch.equal(tensor, package_state_dict[name]), name


def test_point_embeddings_are_the_rows_of_one_table(package_state_dict):
    table = to_transformers(package_state_dict).tensors["prompt_encoder.point_embed.weight"]
    for row in range(4):
        assert torch.equal(table[row], package_state_dict[f"sam_prompt_encoder.point_embeddings.{row}.weight"][0])
    assert original_name("prompt_encoder.point_embed.weight") == "sam_prompt_encoder.point_embeddings.*.weight"


def test_unknown_names_are_reported_and_video_only_ones_dropped():
    tensor = torch.zeros(2)
    mapped = to_transformers({"memory_encoder.out_proj.weight": tensor, "no_obj_ptr": tensor,
                              "image_encoder.trunk.blocks.0.norm1.weight": tensor, "extra.weight": tensor,
                              "image_encoder.trunk.blocks.0.norm3.weight": tensor})
    assert mapped.unknown == ["extra.weight", "image_encoder.trunk.blocks.0.norm3.weight"]
    assert list(mapped.tensors) == ["vision_encoder.backbone.blocks.0.layer_norm1.weight"]


def test_the_sam2_packages_model_gets_the_transformers_weights():
    # What the sam_masks variant runs on.
    encoder = random_sam2("tiny", seed=2)
    package = package_model(encoder.model, encoder.spec).state_dict()
    for name, tensor in to_original(encoder.model.state_dict()).items():
        assert torch.equal(package[name], tensor), name
