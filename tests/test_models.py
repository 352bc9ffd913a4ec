"""load_sd15 (diffusers folder, single-file LDM checkpoints, pickles), its errors, encode_prompt, and
ordinary_alias."""

import argparse
import shutil
import socket

import pytest
import torch
from ldm_checkpoint import ldm_checkpoint
from safetensors.torch import save_file

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    SD15_CONFIG_DIR,
    SDComponents,
    encode_prompt,
    load_sd15,
    ordinary_alias,
    tiny_sd_components,
)

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def tiny_configs(tiny, tmp_path_factory):
    """A config folder describing the tiny architecture, in the layout of the bundled SD1.5 configs."""
    folder = tmp_path_factory.mktemp("tiny_configs")
    tiny.unet.save_config(folder / "unet")
    tiny.vae.save_config(folder / "vae")
    tiny.text_encoder.config.save_pretrained(folder / "text_encoder")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tiny):
    return ldm_checkpoint(tiny.unet, tiny.vae, tiny.text_encoder)


@pytest.fixture(scope="module")
def single_file(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_file(_contiguous(checkpoint), str(path))
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("diffusers") / "tiny-sd"
    for part in PARTS:
        getattr(tiny, part).save_pretrained(folder / part)
    tiny.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_sd15 tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _contiguous(state):
    return {key: value.contiguous() for key, value in state.items()}


def _assert_same_weights(loaded, original):
    for part in PARTS:
        expected, found = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert found.keys() == expected.keys(), part
        for key in expected:
            assert torch.equal(found[key], expected[key]), f"{part}: {key}"


def _outputs(components, latent, image, context):
    with torch.no_grad():
        return (
            components.unet(latent, 500, encoder_hidden_states=context).sample,
            components.vae.decode(latent).sample,
            components.vae.encode(image).latent_dist.mean,
        )


def _assert_same_outputs(loaded, original):
    generator = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 4, 8, 8, generator=generator), torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1,
              torch.randn(1, 77, 32, generator=generator))
    # Equal weights, yet not bit-equal outputs: tensors read from a .safetensors file are not 64-byte aligned,
    # which makes the CPU kernels round differently (about 1e-7 relative).
    for found, expected in zip(_outputs(loaded, *inputs), _outputs(original, *inputs)):
        torch.testing.assert_close(found, expected)


def test_bundled_configs_describe_sd15():
    # SD1.5's published parameter counts: UNet 859.52M, VAE 83.65M, CLIP ViT-L/14 text encoder 123.06M.
    from adaptivedrag_core.models import _expected_shapes, _read_configs

    configs = _read_configs(SD15_CONFIG_DIR)
    counts = {part: sum(shape.numel() for shape in _expected_shapes(part, configs[part]).values()) for part in PARTS}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_diffusers_folder_loads_offline(tiny, tiny_configs, diffusers_folder, offline):
    loaded = load_sd15(diffusers_folder, config_dir=tiny_configs)

    _assert_same_weights(loaded, tiny)
    assert loaded.tokenizer is not None
    assert torch.equal(encode_prompt(loaded, "a red car"), encode_prompt(tiny, "a red car"))
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_single_file_loads_offline(tiny, tiny_configs, single_file, offline):
    loaded = load_sd15(single_file, config_dir=tiny_configs)

    _assert_same_weights(loaded, tiny)
    _assert_same_outputs(loaded, tiny)
    assert loaded.tokenizer is None
    assert loaded.latent_scale == pytest.approx(0.18215)


def test_single_file_takes_dtype_and_tokenizer_path(tiny, tiny_configs, single_file, tmp_path):
    tiny.tokenizer.save_pretrained(tmp_path / "tokenizer")

    loaded = load_sd15(single_file, dtype=torch.float16, tokenizer_path=tmp_path / "tokenizer", config_dir=tiny_configs)

    assert {p.dtype for part in PARTS for p in getattr(loaded, part).parameters()} == {torch.float16}
    assert loaded.tokenizer("a red car").input_ids == tiny.tokenizer("a red car").input_ids


def test_fp16_checkpoint_loads_as_float32(tiny, tiny_configs, checkpoint, tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({key: value.half().contiguous() for key, value in checkpoint.items()}, str(path))

    loaded = load_sd15(path, config_dir=tiny_configs)

    weight = loaded.unet.conv_in.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, tiny.unet.conv_in.weight.half().float())


def test_pickle_checkpoint_loads_with_weights_only(tiny, tiny_configs, checkpoint, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": checkpoint, "global_step": 1000}, path)

    _assert_same_weights(load_sd15(path, config_dir=tiny_configs), tiny)


def test_pickle_checkpoint_with_objects_is_refused(tiny_configs, checkpoint, tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": checkpoint, "hyper_parameters": argparse.Namespace(lr=1e-4)}, path)

    with pytest.raises(InputError, match=r"refusing to load .*unsafe\.ckpt.*weights_only=True.*safetensors"):
        load_sd15(path, config_dir=tiny_configs)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model.safetensors"
    with pytest.raises(InputError, match="model not found: .*no-such-model.safetensors"):
        load_sd15(missing)


def test_unsupported_or_corrupt_files_are_named(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="unsupported model file .*model.txt"):
        load_sd15(text)
    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(InputError, match="cannot read .*model.safetensors"):
        load_sd15(corrupt)


@pytest.mark.parametrize("part", PARTS)
def test_diffusers_folder_without_a_part_names_it(tmp_path, part):
    folder = tmp_path / "model"
    for present in PARTS:
        if present != part:
            (folder / present).mkdir(parents=True)
    with pytest.raises(InputError, match=f"has no {part}/ folder"):
        load_sd15(folder)


def test_diffusers_folder_with_empty_part_names_it(tiny_configs, diffusers_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(diffusers_folder, folder)
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(InputError, match="cannot load the VAE from .*vae"):
        load_sd15(folder, config_dir=tiny_configs)


@pytest.mark.parametrize(
    "prefix, name", [("model.diffusion_model.", "UNet"), ("first_stage_model.", "VAE"),
                     ("cond_stage_model.transformer.", "CLIP text encoder")]
)
def test_single_file_without_a_part_names_it(tiny_configs, checkpoint, tmp_path, prefix, name):
    path = tmp_path / "partial.safetensors"
    save_file(_contiguous({k: v for k, v in checkpoint.items() if not k.startswith(prefix)}), str(path))

    with pytest.raises(InputError, match=f"partial.safetensors has no {name} weights .*'{prefix}'"):
        load_sd15(path, config_dir=tiny_configs)


def test_single_file_with_incomplete_part_names_it(tiny_configs, checkpoint, tmp_path):
    path = tmp_path / "incomplete.safetensors"
    dropped = "first_stage_model.decoder.conv_out.weight"
    save_file(_contiguous({k: v for k, v in checkpoint.items() if k != dropped}), str(path))

    with pytest.raises(InputError, match="incomplete.safetensors: the VAE is incomplete.*decoder.conv_out.weight"):
        load_sd15(path, config_dir=tiny_configs)


def test_tiny_checkpoint_is_not_sd15_sized(single_file):
    with pytest.raises(InputError, match="checkpoint is not SD1.x"):
        load_sd15(single_file)


def test_diffusers_folder_checked_against_sd15(diffusers_folder):
    with pytest.raises(InputError, match="checkpoint is not SD1.x"):
        load_sd15(diffusers_folder)


def test_other_context_dim_is_not_sd1x(tiny, tiny_configs, tmp_path):
    from diffusers import UNet2DConditionModel

    wide_context = UNet2DConditionModel.from_config({**tiny.unet.config, "cross_attention_dim": 48})
    path = tmp_path / "context48.safetensors"
    save_file(_contiguous(ldm_checkpoint(wide_context, tiny.vae, tiny.text_encoder)), str(path))

    with pytest.raises(InputError, match=r"checkpoint is not SD1.x.*cross-attention \(text\) dim is 48, SD1.x uses 32"):
        load_sd15(path, config_dir=tiny_configs)


@pytest.mark.parametrize(
    "extra_key, family",
    [
        ("conditioner.embedders.1.model.positional_embedding", "SDXL"),
        ("cond_stage_model.model.token_embedding.weight", "SD2"),
    ],
)
def test_other_families_are_not_sd1x(checkpoint, tiny_configs, tmp_path, extra_key, family):
    path = tmp_path / "other.safetensors"
    save_file(_contiguous({**checkpoint, extra_key: torch.zeros(2, 2)}), str(path))

    with pytest.raises(InputError, match=f"checkpoint is not SD1.x: .*looks like {family}"):
        load_sd15(path, config_dir=tiny_configs)


def test_missing_config_dir_is_named(single_file, tmp_path):
    with pytest.raises(InputError, match="model config not found"):
        load_sd15(single_file, config_dir=tmp_path)


def test_tokenizer_folder_without_vocabulary_is_named(single_file, tiny_configs, tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(InputError, match="tokenizer folder .*tok has neither vocab.json"):
        load_sd15(single_file, tokenizer_path=tmp_path / "tok", config_dir=tiny_configs)


@pytest.fixture(scope="module")
def clip_sized_vocabulary():
    """Components whose text encoder has CLIP's vocabulary size, and no tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    return SDComponents(unet=None, vae=None, text_encoder=encoder.eval(), tokenizer=None)


def test_empty_prompt_without_tokenizer_uses_clip_ids(clip_sized_vocabulary):
    embeddings = encode_prompt(clip_sized_vocabulary, "")

    ids = torch.full((1, 77), CLIP_EOS_ID)
    ids[0, 0] = CLIP_BOS_ID
    with torch.no_grad():
        expected = clip_sized_vocabulary.text_encoder(ids)[0]
    assert embeddings.shape == (1, 77, 16)
    assert torch.equal(embeddings, expected)


def test_prompt_without_tokenizer_explains_how_to_get_one(clip_sized_vocabulary):
    with pytest.raises(InputError, match="needs CLIP's tokenizer.*vocab.json and merges.txt"):
        encode_prompt(clip_sized_vocabulary, "a red car")


def test_encode_prompt_pads_to_77_tokens(tiny):
    embeddings = encode_prompt(tiny, "a red car")

    assert embeddings.shape == (1, 77, 32)
    assert not torch.equal(embeddings, encode_prompt(tiny, ""))



def _latent_gradient(unet, latent, context):
    latent = latent.clone().requires_grad_(True)
    unet(latent, 10, encoder_hidden_states=context).sample.square().sum().backward()
    return latent.grad


def test_weights_made_in_inference_mode_back_propagate_through_their_aliases_without_a_copy():
    """As the ComfyUI nodes get SD1.5's weights: autograd refuses the inference tensors themselves; their aliases
    share their memory and give exactly the gradient of ordinary weights."""
    unet = tiny_sd_components(seed=0).unet.requires_grad_(False)
    latent, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    expected = _latent_gradient(unet, latent, context)
    with torch.inference_mode():
        comfyui = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    unet.load_state_dict(comfyui, assign=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        _latent_gradient(unet, latent, context)
    aliases = {name: ordinary_alias(tensor) for name, tensor in comfyui.items()}
    assert not any(alias.is_inference() for alias in aliases.values())
    assert all(aliases[name].data_ptr() == tensor.data_ptr() for name, tensor in comfyui.items())
    unet.load_state_dict(aliases, assign=True)
    assert torch.equal(_latent_gradient(unet, latent, context), expected)
    ordinary = torch.ones(3)
    assert ordinary_alias(ordinary) is ordinary
