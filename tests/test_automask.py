"""Auto mask: superpixels in a feature space, the mask along the drags, the public-code variant, the overlay,
and the ``mask`` CLI's error paths. Feature maps with known regions stand in for SAM2."""

import argparse
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.segmentation import find_boundaries

from adaptivedrag_core.automask import (
    BORDER_ALPHA,
    BORDER_COLOUR,
    MASK_TINT,
    MASK_TINT_ALPHA,
    OUTSIDE_BRIGHTNESS,
    AutoMaskWarning,
    auto_mask,
    features_on_grid,
    render_overlay,
    superpixels,
)
from adaptivedrag_core.cli_mask import add_parser
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.points import DragPoints
from adaptivedrag_core.preview import HANDLE_COLOUR, TARGET_COLOUR
from adaptivedrag_core.sam2_loader import random_sam2


# ------------------------------------------------------------------ constructed inputs
def known_regions(height, width, scale=1.0):
    """Three regions (0 background, 1 disc, 2 diagonal band) sampled at pixel centres of an image of
    ``height`` x ``width``; ``scale`` maps these pixels to the coordinates of a larger image."""
    ys, xs = np.mgrid[0:height, 0:width]
    x, y = (xs + 0.5) * scale, (ys + 0.5) * scale
    regions = np.zeros((height, width), dtype=np.int64)
    regions[np.abs(x - y * 0.6 - 60) < 14] = 2
    regions[(x - 40) ** 2 + (y - 40) ** 2 < 24**2] = 1
    return regions


def region_features(regions, seed=0, channels=12, noise=0.05):
    """A feature map [C, h, w]: one random vector per region plus a little noise."""
    rng = np.random.default_rng(seed)
    codes = rng.normal(size=(regions.max() + 1, channels))
    features = codes[regions] + noise * rng.normal(size=regions.shape + (channels,))
    return torch.from_numpy(features.astype(np.float32)).permute(2, 0, 1)


class FixedEncoder:
    """An encoder that returns a given feature map (and, optionally, given SAM-style automatic masks)."""

    def __init__(self, feature_map, masks=None):
        self.feature_map = feature_map
        self.masks = masks

    def features(self, image):
        return self.feature_map

    def automatic_masks(self, image):
        return self.masks


def textured_image(height, width, seed=0):
    """A smooth image with a few shapes, so colour superpixels have something to follow."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs * 255 / width, ys * 255 / height, np.full_like(xs, 128)], axis=-1).astype(np.float64)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(height, width)
        image[(xs - cx) ** 2 + (ys - cy) ** 2 < r**2] = rng.uniform(0, 255, size=3)
    return image.round().astype(np.uint8)


def on_segments(points):
    """Pixels on each handle -> target segment, sampled finely (independently of the module's own sampling)."""
    pixels = []
    for (hx, hy), (tx, ty) in zip(points.handles, points.targets):
        for s in np.linspace(0.0, 1.0, 2000):
            pixels.append((int(round(hx + s * (tx - hx))), int(round(hy + s * (ty - hy)))))
    return pixels


def quiet_auto_mask(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoMaskWarning)
        return auto_mask(*args, **kwargs)


# ------------------------------------------------------------------ superpixels
def test_superpixels_do_not_cross_feature_region_boundaries():
    regions = known_regions(96, 128)
    labels = superpixels(features_on_grid(region_features(regions), regions.shape), 60, 0.3)
    assert labels.shape == regions.shape
    for label in np.unique(labels):
        assert len(np.unique(regions[labels == label])) == 1, f"superpixel {label} spans two regions"
    # Not trivially pure: every region is split into several superpixels.
    for region in range(3):
        assert len(np.unique(labels[regions == region])) >= 2


def test_auto_mask_regions_follow_a_coarse_feature_map():
    # Features at a quarter of the image resolution, like SAM2's 64x64 map of a 256x256 image.
    image_regions = known_regions(128, 128)
    feature_regions = known_regions(32, 32, scale=4.0)
    points = DragPoints.from_pairs(["40,40:50,30"], 128, 128)
    result = auto_mask(np.zeros((128, 128, 3), np.uint8), points, FixedEncoder(region_features(feature_regions)),
                       n_segments=40)
    # Away from the true boundaries (one feature cell), each superpixel lies in one region.
    near_boundary = binary_dilation(find_boundaries(image_regions), iterations=4)
    for label in np.unique(result.regions):
        inside = (result.regions == label) & ~near_boundary
        assert len(np.unique(image_regions[inside])) <= 1, f"superpixel {label} spans two regions"


# ------------------------------------------------------------------ the mask
@pytest.mark.parametrize("use_encoder", [False, True])
def test_mask_holds_handles_targets_and_the_segments_between(use_encoder):
    height, width = 96, 128
    points = DragPoints.from_pairs(["10,10:100,80", "127,0:90,40", "60,90:61,95", "5,50:5,20"], width, height)
    encoder = FixedEncoder(region_features(known_regions(height, width))) if use_encoder else None
    result = quiet_auto_mask(textured_image(height, width), points, encoder)
    assert result.mask.shape == (height, width) and result.mask.dtype == bool
    for x, y in on_segments(points):
        assert result.mask[y, x], f"pixel ({x}, {y}) on a drag is outside the mask"


def test_mask_is_a_union_of_whole_regions_at_image_resolution():
    points = DragPoints.from_pairs(["30,20:70,60"], 100, 80)
    result = quiet_auto_mask(textured_image(80, 100), points)
    assert result.regions.shape == (80, 100) and result.regions.dtype == np.int32
    labels = np.unique(result.regions)
    assert labels[0] == 0 and labels[-1] == len(labels) - 1
    for label in labels:
        assert len(np.unique(result.mask[result.regions == label])) == 1


def test_small_drag_in_a_large_image_gives_a_small_mask():
    image = textured_image(512, 512, seed=3)
    small = quiet_auto_mask(image, DragPoints.from_pairs(["256,256:260,259"], 512, 512))
    long = quiet_auto_mask(image, DragPoints.from_pairs(["40,256:470,256"], 512, 512))
    assert small.coverage < 0.03
    assert long.coverage > 2 * small.coverage


def test_a_mask_covering_almost_everything_warns():
    points = DragPoints.from_pairs(["5,32:90,32"], 96, 64)
    with pytest.warns(AutoMaskWarning, match="covers"):
        result = auto_mask(np.full((64, 96, 3), 120, np.uint8), points, FixedEncoder(torch.zeros(4, 8, 8)),
                           n_segments=2)
    assert result.coverage >= 0.8
    assert any("covers" in message for message in result.warnings)


def test_fallback_without_encoder_warns_and_encoder_does_not():
    image = textured_image(64, 64)
    points = DragPoints.from_pairs(["10,10:20,20"], 64, 64)
    with pytest.warns(AutoMaskWarning, match="Lab"):
        result = auto_mask(image, points)
    assert any("Lab" in message for message in result.warnings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AutoMaskWarning)
        result = auto_mask(image, points, FixedEncoder(region_features(known_regions(16, 16, scale=4.0))))
    assert result.warnings == []
    assert set(result.timings) == {"features", "slic"}


def test_pil_input_of_any_mode_gives_the_same_mask_as_the_array():
    image = textured_image(48, 64)
    points = DragPoints.from_pairs(["10,10:30,20"], 64, 48)
    from_array = quiet_auto_mask(image, points)
    from_pil = quiet_auto_mask(Image.fromarray(image).convert("RGBA"), points)
    np.testing.assert_array_equal(from_array.mask, from_pil.mask)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"points": DragPoints.from_pairs(["1,1:5,5"], 32, 32)}, "points were placed on 32x32"),
        ({"variant": "rgb"}, "unknown auto-mask variant"),
        ({"variant": "sam_masks"}, "needs a SAM2"),
        ({"n_segments": 0}, "positive integer"),
        ({"compactness": -1.0}, "compactness"),
        ({"image": np.zeros((48, 64), np.uint8)}, "RGB uint8"),
    ],
)
def test_bad_input_raises_input_error(kwargs, message):
    arguments = {"image": np.zeros((48, 64, 3), np.uint8), "points": DragPoints.from_pairs(["1,1:5,5"], 64, 48)}
    arguments.update(kwargs)
    with pytest.raises(InputError, match=message):
        quiet_auto_mask(arguments.pop("image"), arguments.pop("points"), **arguments)


# ------------------------------------------------------------------ the public code's variant
def rectangle(height, width, x0, x1, y0, y1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_sam_masks_variant_cuts_the_handles_mask_to_the_side_facing_the_target():
    height, width = 96, 96
    everything = np.ones((height, width), dtype=bool)
    box = rectangle(height, width, 10, 81, 30, 61)
    encoder = FixedEncoder(torch.zeros(3, 8, 8), masks=[box, everything])
    # Handle near the box's left end, dragged left: the half facing the target is a small part, so it is cut.
    cut = quiet_auto_mask(np.zeros((height, width, 3), np.uint8), DragPoints.from_pairs(["20,45:12,45"], width,
                          height), encoder, variant="sam_masks")
    assert cut.mask[box & (np.arange(width) <= 20)[None, :]].all()
    assert not cut.mask[:, 60:].any()
    # Handle in the middle, dragged right: the facing half is at least half of the box, so the box is kept whole.
    whole = quiet_auto_mask(np.zeros((height, width, 3), np.uint8), DragPoints.from_pairs(["45,45:70,45"], width,
                            height), encoder, variant="sam_masks")
    assert whole.mask[box].all()
    assert whole.coverage < 0.5  # the smallest mask holding the handle is used, not "everything"


def test_sam_masks_superpixels_follow_the_rendered_masks():
    height, width = 96, 96
    box = rectangle(height, width, 10, 81, 30, 61)
    encoder = FixedEncoder(torch.zeros(3, 8, 8), masks=[box])
    result = quiet_auto_mask(np.zeros((height, width, 3), np.uint8), DragPoints.from_pairs(["20,45:12,45"], width,
                             height), encoder, variant="sam_masks")
    near_edge = binary_dilation(find_boundaries(box), iterations=1)
    for label in np.unique(result.regions):
        assert len(np.unique(box[(result.regions == label) & ~near_edge])) <= 1


# ------------------------------------------------------------------ random-init SAM2 through the whole path
@pytest.fixture(scope="module")
def tiny_sam2():
    encoder = random_sam2("tiny", seed=0)
    # A coarse point grid and no quality filter, so the random model's automatic masks are few but present.
    encoder.mask_generator_options = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    return encoder


def test_random_tiny_sam2_runs_the_sam_masks_path(tiny_sam2):
    # The paper's "features" path with SAM2 runs in test_sam2_loader.py, through the CLI and a checkpoint file.
    points = DragPoints.from_pairs(["20,20:30,28"], 64, 48)
    result = quiet_auto_mask(textured_image(48, 64), points, tiny_sam2, variant="sam_masks", n_segments=30)
    assert result.mask.shape == (48, 64) and result.regions.shape == (48, 64)
    assert result.mask[20, 20] and result.mask[28, 30]
    assert result.timings["features"] > 0 and result.timings["slic"] > 0


# ------------------------------------------------------------------ overlay
def test_overlay_tints_and_outlines_the_mask_dims_the_rest_and_keeps_borders_faint():
    image = textured_image(96, 128)
    points = DragPoints.from_pairs(["30,40:90,60"], 128, 96)
    result = quiet_auto_mask(image, points, n_segments=12)
    overlay = np.asarray(render_overlay(image, result, points)).astype(int)
    assert overlay.shape == image.shape
    assert np.abs(overlay[40, 30] - HANDLE_COLOUR).sum() < 30
    assert np.abs(overlay[60, 90] - TARGET_COLOUR).sum() < 30
    borders = find_boundaries(result.regions, mode="inner")
    ys, xs = np.mgrid[0:96, 0:128]
    # Away from the drawn arrow (a band along its line) and from the pair number (a box by the handle).
    far_from_arrow = (np.abs((xs - 30) * 20 - (ys - 40) * 60) / np.hypot(60, 20) > 12) | (xs < 15) | (xs > 105)
    far_from_arrow &= (np.abs(xs - 30) > 20) | (np.abs(ys - 40) > 20)
    outline = find_boundaries(result.mask, mode="thick")
    inside = result.mask & ~borders & ~outline & far_from_arrow
    outside = ~result.mask & ~borders & ~outline & far_from_arrow
    tinted = (1 - MASK_TINT_ALPHA) * image + MASK_TINT_ALPHA * np.array(MASK_TINT)
    assert inside.any() and np.abs(overlay[inside] - tinted[inside]).max() <= 1
    assert outside.any() and np.abs(overlay[outside] - OUTSIDE_BRIGHTNESS * image[outside]).max() <= 1
    assert outline.any() and (overlay[outline & far_from_arrow] == MASK_TINT).all()
    faint = borders & ~outline & far_from_arrow & ~result.mask
    blended = (1 - BORDER_ALPHA) * OUTSIDE_BRIGHTNESS * image + BORDER_ALPHA * np.array(BORDER_COLOUR)
    assert faint.any() and np.abs(overlay[faint] - blended[faint]).max() <= 1


# ------------------------------------------------------------------ CLI
def main(argv):
    """What the lead's cli.py does: a parser with subcommands, then the chosen subcommand's run function."""
    parser = argparse.ArgumentParser(prog="adaptivedrag")
    subparsers = parser.add_subparsers(dest="command")
    add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(textured_image(48, 64)).save(path)
    return path


def test_cli_writes_mask_regions_and_overlay(image_file, tmp_path, capsys):
    out, regions_out, overlay_out = tmp_path / "mask.png", tmp_path / "regions.png", tmp_path / "overlay.png"
    status = main(["mask", str(image_file), "--drag", "10,10:30,20", "--drag", "50,40:40,40", "--out", str(out),
                   "--regions-out", str(regions_out), "--overlay-out", str(overlay_out)])
    assert status == 0
    assert "warning:" in capsys.readouterr().err  # no --sam2: the Lab fallback is announced
    mask = np.asarray(Image.open(out))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    assert mask[10, 10] == 255 and mask[20, 30] == 255 and mask[40, 50] == 255 and mask[40, 40] == 255
    regions = np.asarray(Image.open(regions_out)).astype(np.int64)
    assert regions.shape == (48, 64) and regions.max() > 1
    for label in np.unique(regions):  # the written mask is a union of the written regions
        assert len(np.unique(mask[regions == label])) == 1
    assert Image.open(overlay_out).size == (64, 48)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--drag", "10,10:64,20"], "outside"),
        (["--drag", "10,10:30"], "4 numbers"),
        (["--drag", "10,10:30,20", "--sam2", "missing_sam2.pt"], "not found"),
        (["--drag", "10,10:30,20", "--variant", "sam_masks"], "needs --sam2"),
        (["--drag", "10,10:30,20", "--regions-out", "regions.jpg"], ".png"),
        (["--drag", "10,10:30,20", "--overlay-out", "overlay.unknown"], "cannot write"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(image_file, tmp_path, capsys, monkeypatch, extra,
                                                                  message):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    assert main(["mask", str(image_file), "--out", "mask.png", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert set(tmp_path.iterdir()) == before


def test_cli_unreadable_image_exits_2(tmp_path, capsys):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert main(["mask", str(bad), "--drag", "1,1:2,2", "--out", str(tmp_path / "mask.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert not (tmp_path / "mask.png").exists()


def test_cli_keeps_existing_output_unless_forced(image_file, tmp_path, capsys):
    out = tmp_path / "mask.png"
    out.write_bytes(b"keep me")
    argv = ["mask", str(image_file), "--drag", "10,10:30,20", "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(argv + ["--force"]) == 0
    assert Image.open(out).size == (64, 48)
