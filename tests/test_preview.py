"""The preview pictures: input with arrows beside the result (readable by Pillow whatever the input's size,
faithful for any mode), and where each handle ended."""

import numpy as np
from PIL import Image

from adaptivedrag_core.points import DragPoints
from adaptivedrag_core.preview import FINAL_COLOUR, PREVIEW_SIDE, TARGET_COLOUR, draw_final_handles, side_by_side


def grey(width, height):
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_final_handles_are_marked_at_their_place_on_a_result_of_another_size():
    points = DragPoints.from_pairs(["20,30:100,60"], 160, 120)
    marked = np.asarray(draw_final_handles(grey(80, 60), points, [(60.0, 40.0)])).astype(int)
    assert np.abs(marked[20, 30] - FINAL_COLOUR).sum() < 40  # (60, 40) on 160x120 is (30, 20) on 80x60
    ring = marked[30 - 3: 30 + 4, 50 - 3: 50 + 4].reshape(-1, 3)  # the target (100, 60) -> (50, 30)
    assert (np.abs(ring - TARGET_COLOUR).sum(axis=1) < 40).any()


def test_side_by_side_shows_the_final_handles_only_when_given():
    points = DragPoints.from_pairs(["20,30:100,60"], 160, 120)
    plain = np.asarray(side_by_side(grey(160, 120), grey(160, 120), points))
    marked = np.asarray(side_by_side(grey(160, 120), grey(160, 120), points, [(90.0, 55.0)]))
    right = slice(plain.shape[1] - 160, None)
    assert (plain[:, right] == 128).all()
    assert np.abs(marked[55, plain.shape[1] - 160 + 90].astype(int) - FINAL_COLOUR).sum() < 40
    assert np.array_equal(plain[:, :160], marked[:, :160])  # the input side is the same


def test_the_preview_of_a_huge_image_stays_small_enough_to_open():
    wide = Image.new("RGB", (3 * PREVIEW_SIDE, 40), (10, 200, 30))
    points = DragPoints.from_pairs(["10,10:3000,20"], *wide.size)
    sheet = side_by_side(wide, wide, points)
    assert sheet.height <= PREVIEW_SIDE and sheet.width <= 2 * PREVIEW_SIDE + PREVIEW_SIDE // 64
    # A 10000x10000 input made a sheet of over 200 megapixels, which Pillow then refused to open.
    assert 2 * PREVIEW_SIDE * PREVIEW_SIDE * 1.1 < Image.MAX_IMAGE_PIXELS


def test_a_16_bit_original_is_shown_on_its_full_range():
    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16))
    sheet = side_by_side(ramp, ramp, DragPoints.from_pairs(["5,5:20,20"], 64, 48))
    left = np.asarray(sheet.convert("L"))[:, :64]
    assert (left == 255).mean() < 0.2
