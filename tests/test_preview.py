"""The before/after preview: readable by Pillow whatever the input's size, and faithful for any mode."""

import numpy as np
from PIL import Image

from adaptivedrag_core.points import DragPoints
from adaptivedrag_core.preview import PREVIEW_SIDE, side_by_side


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
