"""Loading SAM2 offline: size and version from names and weights, .pt and .safetensors files written from a
random-init tiny model, clear errors, and the ``mask`` CLI running SAM2's feature path from a checkpoint."""

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adaptivedrag_core.cli_mask import add_parser
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.sam2_loader import (
    Sam2Spec,
    detect_spec,
    load_sam2,
    parse_model_name,
    parse_model_size,
    random_sam2,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sam2.1_hiera_tiny.pt", ("2.1", "tiny")),
        ("sam2_hiera_small.pt", ("2", "small")),
        ("sam2_hiera_b+.safetensors", ("2", "base_plus")),
        ("sam2.1_hiera_base_plus.pt", ("2.1", "base_plus")),
        ("sam2.1_hiera_large-fp16.safetensors", ("2.1", "large")),
        ("sam2.1_hiera_t.safetensors", ("2.1", "tiny")),
        ("sam2_hiera_l.pt", ("2", "large")),
        ("weights.pt", (None, None)),
        ("my_tiny_model.safetensors", (None, "tiny")),
    ],
)
def test_size_and_version_from_file_name(name, expected):
    assert parse_model_name(name) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("tiny", (None, "tiny")), ("b+", (None, "base_plus")), ("base_plus", (None, "base_plus")),
     ("sam2.1_large", ("2.1", "large")), ("SAM2_small", ("2", "small"))],
)
def test_explicit_model_size(text, expected):
    assert parse_model_size(text) == expected


def test_unknown_explicit_size_is_an_input_error():
    with pytest.raises(InputError, match="unknown SAM2 model size 'huge'"):
        parse_model_size("huge")


# ------------------------------------------------------------------ files written from a random tiny model
@pytest.fixture(scope="module")
def tiny_state_dict():
    return random_sam2("tiny", seed=1).model.state_dict()


@pytest.fixture(scope="module")
def checkpoints(tiny_state_dict, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sam2")
    pt = folder / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny_state_dict}, pt)  # the official files' layout
    safetensors = folder / "sam2.1_hiera_t-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in tiny_state_dict.items()}, str(safetensors))
    return {"pt": pt, "safetensors": safetensors, "folder": folder}


def named_copy(source, folder, name):
    """The same file under another name (a hard link, so the 150 MB are not written again)."""
    path = folder / name
    if not path.exists():
        os.link(source, path)
    return path


def test_detect_spec_from_weights(tiny_state_dict):
    assert detect_spec(tiny_state_dict) == Sam2Spec("2.1", "tiny")
    assert detect_spec({"some.weight": torch.zeros(1)}) is None


def test_load_pt(checkpoints, tiny_state_dict):
    encoder = load_sam2(checkpoints["pt"])
    assert encoder.spec == Sam2Spec("2.1", "tiny")
    loaded = encoder.model.state_dict()
    assert set(loaded) == set(tiny_state_dict)
    for key, value in tiny_state_dict.items():
        assert torch.equal(loaded[key], value), key
    assert not encoder.model.training


def test_load_fp16_safetensors(checkpoints, tiny_state_dict):
    encoder = load_sam2(checkpoints["safetensors"])
    assert encoder.spec == Sam2Spec("2.1", "tiny")
    loaded = encoder.model.state_dict()
    for key, value in tiny_state_dict.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value.half().to(value.dtype)), key


def test_size_from_the_weights_when_the_name_does_not_say(checkpoints):
    unnamed = named_copy(checkpoints["pt"], checkpoints["folder"], "weights.pt")
    assert load_sam2(unnamed).spec == Sam2Spec("2.1", "tiny")


def test_mismatched_size_says_what_the_file_looks_like(checkpoints):
    misnamed = named_copy(checkpoints["pt"], checkpoints["folder"], "sam2.1_hiera_small.pt")
    with pytest.raises(InputError, match=r"does not fit SAM2\.1 small .*looks like SAM2\.1 tiny"):
        load_sam2(misnamed)
    with pytest.raises(InputError, match=r"does not fit SAM2 tiny .*looks like SAM2\.1 tiny"):
        load_sam2(checkpoints["pt"], model_size="sam2_tiny")


def test_missing_or_foreign_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_sam2(tmp_path / "sam2.1_hiera_tiny.pt")
    garbage = tmp_path / "sam2.1_hiera_tiny.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read SAM2 checkpoint"):
        load_sam2(garbage)
    pickled = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": argparse.Namespace(a=1)}, pickled)  # not loadable with weights_only=True
    with pytest.raises(InputError, match="cannot read SAM2 checkpoint"):
        load_sam2(pickled)
    foreign = tmp_path / "model.pt"
    torch.save({"model": {"layer.weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(InputError, match="cannot tell the SAM2 model size"):
        load_sam2(foreign)
    with pytest.raises(InputError, match="does not fit SAM2.1 tiny"):
        load_sam2(foreign, model_size="tiny")


# ------------------------------------------------------------------ CLI, SAM2 features path
def test_cli_mask_with_a_sam2_checkpoint(checkpoints, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    image = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(image)
    out, regions_out = tmp_path / "mask.png", tmp_path / "regions.png"
    args = parser.parse_args(["mask", str(image), "--drag", "10,12:30,20", "--sam2", str(checkpoints["pt"]),
                              "--device", "cpu", "--n-segments", "20", "--out", str(out),
                              "--regions-out", str(regions_out)])
    assert args.run(args) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # SAM2 features, no Lab fallback
    assert "SLIC" in captured.out
    mask = np.asarray(Image.open(out)) == 255
    regions = np.asarray(Image.open(regions_out))
    assert mask.shape == regions.shape == (40, 56)
    assert mask[12, 10] and mask[20, 30] and not mask.all()


class _MovingModel(torch.nn.Linear):
    """Records where it is asked to go (and goes: every move here is CPU to CPU)."""

    def __init__(self):
        super().__init__(1, 1)
        self.moves = []

    def to(self, device, *args, **kwargs):
        self.moves.append(str(device))
        return super().to("cpu")


def test_sam2_on_moves_the_model_for_the_block_and_back_even_on_error():
    from types import SimpleNamespace

    from adaptivedrag_core.sam2_loader import sam2_on

    encoder = SimpleNamespace(model=_MovingModel())
    with sam2_on(encoder, "cuda") as inside:
        assert inside is encoder and encoder.model.moves == ["cuda"]
    assert encoder.model.moves == ["cuda", "cpu"]
    with pytest.raises(RuntimeError, match="boom"):
        with sam2_on(encoder, "cuda"):
            raise RuntimeError("boom")
    assert encoder.model.moves[-1] == "cpu"
    with sam2_on(None, "cuda") as nothing:
        assert nothing is None
