"""The transformers SAM2 path against Meta's ``sam2`` package, for tiny and base+: random weights written under
Meta's names as a ``.pt`` and as a ``.safetensors`` file, read by ``load_sam2``, give the image embedding of SAM2's
own image predictor (max abs difference at most 1e-4 in float32) and the same auto mask on a test image.

Each model runs once per size on its native 1024 x 1024 input; the ``.safetensors`` file is shown to load the very
tensors the ``.pt`` loads, so it gives the same embedding."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sam2_reference import RecordedEncoder, reference_features, reference_model

from adaptivedrag_core.automask import auto_mask
from adaptivedrag_core.points import DragPoints
from adaptivedrag_core.sam2_loader import load_sam2

TOLERANCE = 1e-4


def parity_image(height=600, width=1200, seed=5):
    """Soft colour gradients with a few discs, so SAM2's features and the superpixels have structure. Wider than
    SAM2's input and less tall, so its resize both shrinks (where antialiasing counts) and enlarges."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 / width, ys * 255 / height, np.full_like(xs, 90)], axis=-1).astype(np.float64)
    for _ in range(5):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(50, 150)
        image[(xs - cx) ** 2 + (ys - cy) ** 2 < radius**2] = rng.uniform(0, 255, size=3)
    return image.round().astype(np.uint8)


@pytest.fixture(scope="module", params=["tiny", "base_plus"])
def parity(request, tmp_path_factory):
    """Both paths on one random checkpoint of a size: the files, the image and the two embeddings."""
    size = request.param
    model = reference_model(size, seed=3)
    state_dict = model.state_dict()
    folder = tmp_path_factory.mktemp(f"sam2_{size}")
    pt, safetensors = folder / f"sam2.1_hiera_{size}.pt", folder / f"sam2.1_hiera_{size}.safetensors"
    torch.save({"model": state_dict}, pt)
    save_file({name: tensor.contiguous() for name, tensor in state_dict.items()}, str(safetensors))
    image = parity_image()
    reference = reference_features(model, image)
    del model, state_dict
    encoder = load_sam2(pt)
    return SimpleNamespace(size=size, pt=pt, safetensors=safetensors, image=image, reference=reference,
                           encoder=encoder, features=encoder.features(image))


def test_embedding_matches_the_sam2_package(parity):
    assert parity.features.shape == parity.reference.shape == (256, 64, 64)
    assert parity.reference.abs().max() > 1.0  # a real signal, not a map of zeros
    difference = (parity.features - parity.reference).abs().max().item()
    print(f"SAM2.1 {parity.size}: max abs difference {difference:.3g}")
    assert difference <= TOLERANCE


def test_safetensors_file_loads_the_same_tensors_as_the_pt_file(parity):
    from_pt = parity.encoder.model.state_dict()
    from_safetensors = load_sam2(parity.safetensors).model.state_dict()
    assert set(from_safetensors) == set(from_pt)
    for name, tensor in from_pt.items():
        assert torch.equal(from_safetensors[name], tensor), name


def test_auto_mask_is_identical(parity):
    points = DragPoints.from_pairs(["300,250:560,320", "1000,120:960,380"], 1200, 600)
    reference = auto_mask(parity.image, points, RecordedEncoder(parity.reference))
    new = auto_mask(parity.image, points, RecordedEncoder(parity.features))
    np.testing.assert_array_equal(new.regions, reference.regions)
    np.testing.assert_array_equal(new.mask, reference.mask)
    assert new.regions.max() > 20 and 0 < new.coverage < 0.8
