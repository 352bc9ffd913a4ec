import numpy as np
import pytest
from image_files import orientation_6_jpeg, ramp16
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


def test_exif_orientation_is_applied_on_read(tmp_path):
    image = load_image(orientation_6_jpeg(tmp_path / "phone.jpg"))
    # As a viewer shows it: upright, 96 wide and 128 high, the stored left half (red) on top.
    assert image.size == (96, 128)
    pixels = np.asarray(image.convert("RGB"), dtype=int)
    assert pixels[10, 48, 0] > 200 and pixels[10, 48, 2] < 60
    assert pixels[118, 48, 2] > 200 and pixels[118, 48, 0] < 60
    # The orientation is applied, not kept: writing the picture again must not turn it a second time.
    assert image.getexif().get(274) in (None, 1)


def test_16_bit_grayscale_is_read_on_its_full_range_and_restored_in_16_bits():
    image = ramp16()
    assert image.mode == "I;16"
    working = prepare_image(image, work_size=64)
    # A faithful working copy spans black to white; clipping at 255 made it almost all white.
    levels = (working.pixels[0, 0].numpy() + 1) / 2
    assert levels.min() < 0.05 and levels.max() > 0.95 and 0.4 < levels.mean() < 0.6
    restored = working.restore(working.pixels)
    assert restored.mode == "I;16" and restored.size == image.size
    error = np.abs(np.asarray(restored, float) - np.asarray(image, float)).mean()
    assert error < 0.01 * 65535


@pytest.mark.parametrize("mode, expected", [
    ("1", "1"), ("L", "L"), ("LA", "LA"), ("P", "P"), ("RGB", "RGB"), ("RGBA", "RGBA"), ("CMYK", "CMYK"),
    ("I", "I"), ("F", "F"), ("I;16", "I;16"), ("YCbCr", "YCbCr"),
])
def test_the_result_comes_back_in_the_input_mode(mode, expected):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8), "RGB").convert("L" if mode in (
        "I", "F", "I;16") else mode)
    if mode in ("I", "I;16"):
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 257 if mode == "I;16"
                                else np.asarray(image).astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(image).astype(np.float32))
    assert image.mode == mode
    working = prepare_image(image, work_size=64)
    restored = working.restore(working.pixels)
    assert restored.mode == expected and restored.size == image.size
    if mode == "P":
        assert restored.getpalette() == image.getpalette()


def test_a_palette_image_with_transparency_comes_back_as_rgba():
    image = Image.new("P", (20, 10), 1)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.paste(2, (0, 0, 10, 10))
    image.info["transparency"] = 2
    working = prepare_image(image, work_size=32)
    restored = working.restore(working.pixels)
    assert restored.mode == "RGBA"
    assert np.array_equal(np.asarray(restored.getchannel("A")), np.asarray(image.convert("RGBA").getchannel("A")))


def test_an_image_over_pillows_pixel_limit_is_a_one_line_input_error(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 100x100 is over twice the limit: Pillow refuses
    with pytest.raises(InputError, match="too large"):
        load_image(path)


def test_a_missing_mask_is_named_as_a_mask(tmp_path):
    with pytest.raises(InputError, match="mask not found"):
        load_mask(tmp_path / "nope.png", 10, 8)


def test_a_16_bit_mask_is_read_on_its_full_range(tmp_path):
    path = tmp_path / "mask16.png"
    levels = np.zeros((8, 10), np.uint16)
    levels[:, 5:] = 65535
    levels[:, :5] = 300  # dark: 0.5 % of full scale
    Image.fromarray(levels).save(path)
    assert np.array_equal(load_mask(path, 10, 8), levels == 65535)


def test_a_lab_image_has_no_alpha_channel_to_set_aside():
    image = Image.new("RGB", (16, 8), (200, 30, 40)).convert("LAB")
    working = prepare_image(image, work_size=16)
    assert working.alpha is None
    assert working.restore(working.pixels).mode == "LAB"
