"""Loading SAM2 offline: size and version from names and weights, .pt and .safetensors files with Meta's tensor
names (written from a random-init tiny model of the sam2 package), clear errors naming the tensors, and the ``mask``
CLI running SAM2's feature path from a checkpoint in a process where the sam2 package cannot be imported."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sam2_reference import reference_model

import adaptivedrag_core
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.sam2_keys import to_transformers
from adaptivedrag_core.sam2_loader import (
    Sam2Spec,
    detect_spec,
    load_sam2,
    parse_model_name,
    parse_model_size,
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
    """Meta's names, video-tracking tensors included, as in the official SAM2.1 files."""
    return reference_model("tiny", seed=1).state_dict()


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
    expected = to_transformers(tiny_state_dict).tensors
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert not any(tensor.is_meta for tensor in loaded.values())
    assert not encoder.model.training


def test_load_fp16_safetensors(checkpoints, tiny_state_dict):
    encoder = load_sam2(checkpoints["safetensors"])
    assert encoder.spec == Sam2Spec("2.1", "tiny")
    loaded = encoder.model.state_dict()
    for key, value in to_transformers(tiny_state_dict).tensors.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.half().float()), key


def test_size_from_the_weights_when_the_name_does_not_say(checkpoints):
    unnamed = named_copy(checkpoints["pt"], checkpoints["folder"], "weights.pt")
    assert load_sam2(unnamed).spec == Sam2Spec("2.1", "tiny")


def test_mismatched_size_names_the_tensors_and_says_what_the_file_looks_like(checkpoints):
    # Small is tiny with four more blocks in its third stage: tiny's last stage sits where small's third goes on.
    misnamed = named_copy(checkpoints["pt"], checkpoints["folder"], "sam2.1_hiera_small.pt")
    with pytest.raises(InputError, match=r"does not fit SAM2\.1 small: 50 missing \(image_encoder\.trunk\.blocks\.12\."
                                         r".*\), 0 unexpected, 22 wrongly shaped \(image_encoder\.trunk\.blocks\.10\."
                                         r".*\); the file looks like SAM2\.1 tiny$"):
        load_sam2(misnamed)
    with pytest.raises(InputError, match=r"does not fit SAM2\.1 large: .*wrongly shaped \(image_encoder\.neck\.convs\.0"
                                         r"\.conv\.weight \[256, 768, 1, 1\] \(needs \[256, 1152, 1, 1\]\).*looks like "
                                         r"SAM2\.1 tiny"):
        load_sam2(checkpoints["pt"], model_size="large")


def test_unknown_missing_and_misshaped_tensors_are_named(tiny_state_dict, tmp_path):
    broken = {key: value.half() for key, value in tiny_state_dict.items() if key != "no_mem_embed"}
    broken["extra_head.weight"] = torch.zeros(3)
    broken["image_encoder.neck.convs.0.conv.bias"] = torch.zeros(255)
    path = tmp_path / "sam2.1_hiera_tiny.safetensors"
    save_file(broken, str(path))
    with pytest.raises(InputError) as error:
        load_sam2(path)
    assert str(error.value) == (
        "sam2.1_hiera_tiny.safetensors does not fit SAM2.1 tiny: 1 missing (no_mem_embed), 1 unexpected "
        "(extra_head.weight), 1 wrongly shaped (image_encoder.neck.convs.0.conv.bias [255] (needs [256]))"
    )


def test_a_file_without_the_video_tensors_loads(tiny_state_dict, tmp_path):
    path = tmp_path / "sam2_hiera_tiny.safetensors"
    save_file({key: value for key, value in tiny_state_dict.items()
               if key.startswith(("image_encoder.", "sam_", "no_mem_embed"))}, str(path))
    assert load_sam2(path).spec == Sam2Spec("2", "tiny")


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
# Makes ``import sam2`` (and its config libraries) fail, as where the optional package is not installed.
WITHOUT_SAM2 = "import sys; sys.modules.update(dict.fromkeys(['sam2', 'hydra', 'omegaconf', 'iopath']))"


def run_cli_without_sam2(argv):
    """The CLI in a fresh process where the sam2 package cannot be imported."""
    script = f"{WITHOUT_SAM2}; from adaptivedrag_core.cli import main; sys.exit(main(sys.argv[1:]))"
    package_root = Path(adaptivedrag_core.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(package_root), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", script, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=600)


def test_cli_mask_with_a_sam2_checkpoint_needs_no_sam2_package(checkpoints, tmp_path):
    image = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)).save(image)
    out, regions_out = tmp_path / "mask.png", tmp_path / "regions.png"
    done = run_cli_without_sam2(["mask", image, "--drag", "10,12:30,20", "--sam2", checkpoints["pt"], "--device", "cpu",
                                 "--n-segments", "20", "--out", out, "--regions-out", regions_out])
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr  # SAM2 features, no Lab fallback
    assert "SLIC" in done.stdout
    mask = np.asarray(Image.open(out)) == 255
    regions = np.asarray(Image.open(regions_out))
    assert mask.shape == regions.shape == (40, 56)
    assert mask[12, 10] and mask[20, 30] and not mask.all()


def test_sam_masks_variant_without_the_sam2_package_says_so(checkpoints, tmp_path, capsys, monkeypatch):
    from adaptivedrag_core import sam2_generator
    from adaptivedrag_core.cli import main

    monkeypatch.setattr(sam2_generator, "sam2_installed", lambda: False)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((40, 56, 3), dtype=np.uint8)).save(image)
    assert main(["mask", str(image), "--drag", "10,12:30,20", "--sam2", str(checkpoints["pt"]), "--variant",
                 "sam_masks", "--out", str(tmp_path / "mask.png")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {sam2_generator.MISSING_PACKAGE}\n" and "pip install sam2" in err
    assert not (tmp_path / "mask.png").exists()


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
