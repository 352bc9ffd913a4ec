import numpy as np
import pytest
from PIL import Image

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.images import load_image, load_mask, prepare_image, resize_labels, working_size


@pytest.mark.parametrize("size, expected", [((512, 512), (512, 512)), ((100, 70), (512, 360)), ((70, 1000), (32, 512))])
def test_working_size_keeps_aspect_in_multiples_of_8(size, expected):
    assert working_size(*size, 512) == expected


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P"])
def test_any_mode_and_odd_size_comes_back_at_input_size_and_mode(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 4), dtype=np.uint8), "RGBA").convert(mode)
    working = prepare_image(image, work_size=64)
    assert working.size == (64, 48)
    assert working.pixels.shape == (1, 3, 48, 64)
    assert float(working.pixels.min()) >= -1 and float(working.pixels.max()) <= 1
    restored = working.restore(working.pixels)
    assert restored.size == image.size
    assert ("A" in restored.getbands()) == ("A" in image.getbands())
    if mode in ("RGBA", "LA"):
        assert np.array_equal(np.asarray(restored.getchannel("A")), np.asarray(image.getchannel("A")))
    # The round trip through the working copy keeps the picture (up to resampling blur).
    error = np.abs(np.asarray(restored.convert("RGB"), float) - np.asarray(image.convert("RGB"), float)).mean()
    assert error < 60


def test_unreadable_and_missing_images_raise(tmp_path):
    with pytest.raises(InputError, match="image not found"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(bad)


def test_mask_must_match_image_size(tmp_path):
    path = tmp_path / "mask.png"
    Image.new("L", (10, 8), 255).save(path)
    assert load_mask(path, 10, 8).all()
    with pytest.raises(InputError, match="mask .* is 10x8 but the image is 12x8"):
        load_mask(path, 12, 8)


def test_resize_labels_keeps_labels_and_alignment():
    labels = np.repeat(np.repeat(np.arange(4).reshape(2, 2), 8, axis=0), 8, axis=1)  # 16x16, four quadrants
    small = resize_labels(labels, 4, 4)
    assert np.array_equal(small, np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]))
    assert set(np.unique(resize_labels(labels, 7, 5))) == {0, 1, 2, 3}
    mask = labels == 3
    assert np.array_equal(resize_labels(mask, 4, 4), small == 3)
