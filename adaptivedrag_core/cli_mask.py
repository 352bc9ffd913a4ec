"""``mask`` subcommand: the AdaptiveDrag auto mask of an image for given drags, written as PNG files.

    python -m adaptivedrag_core mask IMAGE --drag X1,Y1:X2,Y2 [...] [--sam2 CKPT] [--sam2-size S]
        --out mask.png [--regions-out regions.png] [--overlay-out overlay.png]
        [--variant features|sam_masks] [--force]

Outputs: the mask as an 8-bit grayscale PNG (255 = may change, 0 = keep); the regions as a 16-bit grayscale
PNG whose pixel values are the superpixel labels (lossless, for reloading; it looks nearly black in a viewer);
the overlay as an RGB picture for a person (mask tinted, superpixel borders, numbered arrows).
Every input is checked before any work, so bad input writes no file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from .automask import (
    DEFAULT_GRID_SIZE,
    DEFAULT_N_SEGMENTS,
    VARIANTS,
    AutoMaskWarning,
    auto_mask,
    regions_image,
    render_overlay,
)
from .errors import InputError
from .images import load_image, to_rgb
from .outputs import check_outputs, save_image
from .points import DragPoints
from .progress import TqdmProgress
from .sam2_loader import load_sam2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``mask`` subcommand on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "mask",
        help="make the auto mask (and superpixel regions) for drags on an image",
        description="AdaptiveDrag auto mask: SLIC superpixels in SAM2's feature space (or Lab colour without "
        "--sam2), then the superpixels along each drag.",
    )
    parser.add_argument("image", help="input image")
    parser.add_argument("--drag", action="append", required=True, metavar="X1,Y1:X2,Y2",
                        help="handle -> target pair in image pixels; repeat for several pairs")
    parser.add_argument("--sam2", metavar="CKPT", help="local SAM2 checkpoint (.pt or .safetensors)")
    parser.add_argument("--sam2-size", metavar="SIZE",
                        help="tiny, small, base_plus or large (default: from the file name, then the weights)")
    parser.add_argument("--variant", choices=VARIANTS, default="features",
                        help="features: the paper's (default); sam_masks: the public code's (needs --sam2 and "
                             "the optional sam2 package)")
    parser.add_argument("--n-segments", type=int, default=DEFAULT_N_SEGMENTS, help="SLIC's number of superpixels")
    parser.add_argument("--compactness", type=float, default=None, help="SLIC compactness (default: per variant)")
    parser.add_argument("--grid-size", type=int, default=DEFAULT_GRID_SIZE, help="longer side of the SLIC grid")
    parser.add_argument("--device", default=None, help="device for SAM2 (default: cuda if available, else cpu)")
    parser.add_argument("--out", required=True, help="mask PNG (255 = may change)")
    parser.add_argument("--regions-out", help="superpixel labels as a 16-bit grayscale PNG")
    parser.add_argument("--overlay-out", help="picture of mask, superpixel borders and arrows")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")
    parser.set_defaults(run=run_mask)
    return parser


def run_mask(args: argparse.Namespace) -> int:
    """Run the ``mask`` subcommand; returns the exit status (2 with a one-line error for bad input)."""
    try:
        outputs = output_paths(args)
        if args.sam2_size and not args.sam2:
            raise InputError("--sam2-size needs --sam2")
        if args.variant == "sam_masks" and not args.sam2:
            raise InputError("--variant sam_masks needs --sam2 (SAM2's automatic masks)")
        image = to_rgb(load_image(args.image))
        points = DragPoints.from_pairs(args.drag, image.width, image.height)
        result = cli_auto_mask(image, points, args.sam2, args.sam2_size, args.device or _default_device(),
                               variant=args.variant, n_segments=args.n_segments, compactness=args.compactness,
                               grid_size=args.grid_size, progress=TqdmProgress("auto mask"))
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_image(Image.fromarray(result.mask.astype("uint8") * 255, "L"), outputs["out"], args.force)
    if "regions_out" in outputs:
        save_image(regions_image(result.regions), outputs["regions_out"], args.force)
    if "overlay_out" in outputs:
        save_image(render_overlay(image, result, points), outputs["overlay_out"], args.force)
    print(
        f"mask covers {result.coverage:.1%} of the image, {int(result.regions.max()) + 1} superpixels "
        f"(features {result.timings['features']:.2f} s, SLIC {result.timings['slic']:.2f} s) -> {outputs['out']}"
    )
    return 0


def cli_auto_mask(image, points: DragPoints, sam2_path, sam2_size, device, **options):
    """``auto_mask`` with SAM2 loaded from ``sam2_path`` (if given) onto ``device``; its warnings are printed once,
    as plain lines, instead of as Python warnings. ``options`` go to ``auto_mask``."""
    encoder = load_sam2(sam2_path, sam2_size, device=device) if sam2_path else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoMaskWarning)
        result = auto_mask(image, points, encoder, **options)
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return result


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The output paths by option name, after checking they can be written (raises InputError otherwise)."""
    outputs = {name: Path(getattr(args, name)) for name in ("out", "regions_out", "overlay_out") if getattr(args, name)}
    if "regions_out" in outputs and outputs["regions_out"].suffix.lower() != ".png":
        raise InputError(f"--regions-out {outputs['regions_out']}: regions are written as a 16-bit PNG, use a .png file")
    check_outputs({"--" + name.replace("_", "-"): path for name, path in outputs.items()}, args.force)
    return outputs


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
