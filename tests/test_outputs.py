"""Writing results: in the input's mode where the format holds it, checked up front, never half-written."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.outputs import atomic_write, check_outputs, save_image


def _ramp16():
    return Image.fromarray(np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16))


@pytest.mark.parametrize("mode, suffix, written", [
    ("I;16", ".png", "I;16"), ("I;16", ".tif", "I;16"), ("P", ".png", "P"), ("1", ".png", "1"),
    ("LA", ".png", "LA"), ("CMYK", ".jpg", "CMYK"), ("CMYK", ".tif", "CMYK"), ("F", ".tif", "F"),
    # Where the format cannot hold the mode, the nearest one it can (README, "Images of any mode and size").
    ("I;16", ".jpg", "L"), ("I", ".png", "I;16"), ("F", ".png", "I;16"), ("CMYK", ".png", "RGB"),
    ("RGBA", ".jpg", "RGB"), ("LA", ".jpg", "L"), ("P", ".jpg", "RGB"), ("1", ".jpg", "L"),
])
def test_results_are_written_in_their_own_mode_where_the_format_holds_it(tmp_path, mode, suffix, written):
    levels = np.asarray(_ramp16(), dtype=np.float64) / 65535
    if mode in ("I;16", "I", "F"):
        scale = {"I;16": 65535, "I": 65535, "F": 255}[mode]
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(np.round(levels * scale).astype(dtype))
    else:
        image = Image.fromarray(np.round(levels * 255).astype(np.uint8)).convert(mode)
    assert image.mode == mode
    path = tmp_path / f"out{suffix}"
    save_image(image, path, force=False)
    with Image.open(path) as back:
        assert back.mode == written
        # Whatever the mode, the picture is the same ramp: nothing clipped to white.
        gray = np.asarray(back.convert("L") if back.mode not in ("I;16", "I", "F") else back, dtype=np.float64)
        gray = gray / (65535 if back.mode in ("I;16", "I") else 255)
        assert abs(gray.mean() - levels.mean()) < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_folder_named_like_the_output_is_refused_even_with_force(tmp_path):
    (tmp_path / "d.png").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        check_outputs({"--out": tmp_path / "d.png"}, force=True)


def test_an_output_where_nothing_can_be_written_is_refused_up_front():
    with pytest.raises(InputError, match="cannot write"):
        check_outputs({"--out": Path("/proc/adaptivedrag-test.png")}, force=False)


def test_other_files_are_checked_with_the_images(tmp_path):
    with pytest.raises(InputError, match="--lora .* folder .* does not exist"):
        check_outputs({"--out": tmp_path / "o.png"}, force=False, files={"--lora": tmp_path / "no" / "l.safetensors"})
    with pytest.raises(InputError, match="different paths"):
        check_outputs({"--out": tmp_path / "o.png"}, force=False, files={"--lora": tmp_path / "o.png"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path, failure):
    path = tmp_path / "result.png"
    path.write_bytes(b"old")

    def write(partial):
        partial.write_bytes(b"half")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(path, write)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.png"]


def test_a_failed_image_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "o.png", force=False)
    assert list(tmp_path.iterdir()) == []


def test_a_lab_result_is_written_as_rgb_not_as_rgba_from_its_a_channel(tmp_path):
    save_image(Image.new("RGB", (8, 8), (200, 30, 40)).convert("LAB"), tmp_path / "lab.png", force=False)
    assert Image.open(tmp_path / "lab.png").mode == "RGB"
