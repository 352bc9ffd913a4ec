"""Synthetic drag benchmark: scenes with a known answer for the drag optimisers (no diffusion model).

A scene is a small latent holding a few Gaussian "objects" on a faint noise background, and a fixed random
two-layer conv net (upsampled 2x, like the UNet features the pipeline uses) as the feature function. Dragging
an object from its handle to its target should make the latent around the target look like the original
latent around the handle.

Run ``python -m adaptivedrag_core.bench.synthetic`` (``--help`` for options) to print the Markdown table
published in ``docs/synthetic_benchmark.md``. The tests reuse :func:`make_scene`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

LATENT_CHANNELS = 4
#: Feature map is this many times the latent grid (the pipeline's is 4x; 2x keeps the benchmark small).
UPSAMPLE = 2
OBJECT_SIGMA = 1.5  # latent pixels
CASES = ("short", "long", "several", "lookalike")
METHOD_RUNS = (
    ("dragdiffusion", "dragdiffusion", {}),
    ("freedrag", "freedrag", {}),
    ("adaptive (square patches)", "adaptive", {}),
    ("adaptive (semantic regions)", "adaptive", {"use_regions": True}),
)


def conv_feature_fn(seed: int, hidden: int = 16, channels: int = 24) -> Callable[[torch.Tensor], torch.Tensor]:
    """A fixed random conv net latent [1,4,h,w] -> features [1,channels,2h,2w] (3x3 conv, tanh, 3x3 conv, 2x up)."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(hidden, LATENT_CHANNELS, 3, 3, generator=generator) / (LATENT_CHANNELS * 9) ** 0.5 * 1.5
    second = torch.randn(channels, hidden, 3, 3, generator=generator) / (hidden * 9) ** 0.5 * 1.5

    def features(latent: torch.Tensor) -> torch.Tensor:
        hidden_map = torch.tanh(F.conv2d(latent, first.to(latent), padding=1))
        out = F.conv2d(hidden_map, second.to(latent), padding=1)
        return F.interpolate(out, scale_factor=UPSAMPLE, mode="bilinear", align_corners=False)

    return features


def latent_to_feature(point):
    """(x, y) latent pixel -> feature pixel, pixel-centre aligned."""
    return tuple((c + 0.5) * UPSAMPLE - 0.5 for c in point)


def feature_to_latent(point):
    """(x, y) feature pixel -> latent pixel, pixel-centre aligned."""
    return tuple((c + 0.5) / UPSAMPLE - 0.5 for c in point)


@dataclass
class SyntheticScene:
    """One benchmark/test scene.

    Args:
        latent: [1,4,h,w]. feature_fn: latent -> [1,D,2h,2w].
        handles, targets: (x, y) feature pixels. latent_handles, latent_targets: the same in latent pixels.
        mask: [H,W] bool feature-grid mask (True = may change): discs along each handle -> target segment.
        regions: [H,W] int labels (SLIC on the starting features, as AdaptiveDrag does on SAM2 features).
    """

    latent: torch.Tensor
    feature_fn: Callable
    handles: list
    targets: list
    latent_handles: list
    latent_targets: list
    mask: torch.Tensor
    regions: torch.Tensor


def _blob(size: int, centre, sigma: float = OBJECT_SIGMA) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma ** 2))


def _path_mask(size: int, pairs, radius: float) -> torch.Tensor:
    """Feature-grid mask: every pixel within ``radius`` of a handle -> target segment."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for (hx, hy), (tx, ty) in pairs:
        dx, dy = tx - hx, ty - hy
        t = ((xs - hx) * dx + (ys - hy) * dy) / max(dx * dx + dy * dy, 1e-8)
        t = t.clamp(0, 1)
        mask |= ((xs - hx - t * dx) ** 2 + (ys - hy - t * dy) ** 2) <= radius ** 2
    return mask


def _regions(features: torch.Tensor, segments: int) -> torch.Tensor:
    from skimage.segmentation import slic

    array = features[0].permute(1, 2, 0).numpy().astype(np.float64)
    array = (array - array.mean(axis=(0, 1))) / (array.std(axis=(0, 1)) + 1e-8)
    labels = slic(array, n_segments=segments, compactness=0.1, channel_axis=-1, start_label=0)
    return torch.from_numpy(labels.astype(np.int64))


def make_scene(case: str, seed: int = 0, latent_size: int = 16) -> SyntheticScene:
    """Build one scene.

    Cases (latent pixels, drag lengths x2 in feature pixels):
        "short": one object dragged 3 px right. "long": one object dragged 7 px. "several": three objects,
        three pairs in different directions. "lookalike": one object dragged 6 px with an identical object
        2.5 px beside the path's midpoint.
    """
    generator = torch.Generator().manual_seed(seed)
    size = latent_size
    latent = 0.2 * torch.randn(1, LATENT_CHANNELS, size, size, generator=generator)
    colours = torch.tensor([[1.5, -1.0, 1.0, 0.5], [-1.0, 1.2, 0.5, -1.2], [0.6, 0.8, -1.4, 1.0]])
    centre = size / 2 - 0.5
    if case == "short":
        objects = [(0, (centre - 3, centre))]
        pairs = [((centre - 3, centre), (centre, centre))]
    elif case == "long":
        objects = [(0, (centre - 4, centre))]
        pairs = [((centre - 4, centre), (centre + 3, centre))]
    elif case == "several":
        objects = [(0, (centre - 4, centre - 3)), (1, (centre + 3, centre - 3)), (2, (centre, centre + 4))]
        pairs = [((centre - 4, centre - 3), (centre - 4, centre + 0)),
                 ((centre + 3, centre - 3), (centre + 3, centre + 0.5)),
                 ((centre, centre + 4), (centre - 3, centre + 4))]
    elif case == "lookalike":
        objects = [(0, (centre - 3, centre)), (0, (centre, centre - 2.5))]
        pairs = [((centre - 3, centre), (centre + 3, centre))]
    else:
        raise ValueError(f"unknown case {case!r}; choose one of {', '.join(CASES)}")
    for colour_index, position in objects:
        latent += _blob(size, position)[None, None] * colours[colour_index].view(1, -1, 1, 1)
    feature_fn = conv_feature_fn(seed)
    handles = [latent_to_feature(h) for h, _ in pairs]
    targets = [latent_to_feature(t) for _, t in pairs]
    with torch.no_grad():
        features = feature_fn(latent)
    feature_size = features.shape[-1]
    return SyntheticScene(
        latent=latent,
        feature_fn=feature_fn,
        handles=handles,
        targets=targets,
        latent_handles=[h for h, _ in pairs],
        latent_targets=[t for _, t in pairs],
        mask=_path_mask(feature_size, list(zip(handles, targets)), radius=3 * OBJECT_SIGMA * UPSAMPLE),
        regions=_regions(features, segments=(feature_size // 6) ** 2),
    )


# ----------------------------------------------------------------------------------------------- metrics


def _latent_patch(latent: torch.Tensor, point, radius: int = 2) -> torch.Tensor:
    from ..drag.common import sample_features, window_offsets

    offsets = window_offsets(radius)
    return sample_features(latent.float(), torch.tensor(point, dtype=torch.float32)[None] + offsets)


def arrival(scene: SyntheticScene, latent: torch.Tensor) -> float:
    """Share of the object that arrived: 1 - |z'(t) - z0(p)|_1 / |z0(t) - z0(p)|_1 on 5x5 latent patches,
    averaged over pairs (1: the target patch now equals the original handle patch; 0: unchanged)."""
    shares = []
    for handle, target in zip(scene.latent_handles, scene.latent_targets):
        wanted = _latent_patch(scene.latent, handle)
        before = (_latent_patch(scene.latent, target) - wanted).abs().sum()
        after = (_latent_patch(latent, target) - wanted).abs().sum()
        shares.append(float(1 - after / before))
    return float(np.mean(shares))


def change_ratio(scene: SyntheticScene, latent: torch.Tensor) -> float:
    """Mean |z' - z0| outside the mask divided by the same inside (latent grid)."""
    from ..drag.common import resize_nearest

    inside = resize_nearest(scene.mask, scene.latent.shape[-2:])
    change = (latent.float() - scene.latent).abs().mean(dim=(0, 1))
    return float(change[~inside].mean() / change[inside].mean().clamp_min(1e-12))


def handle_error(scene: SyntheticScene, handles) -> float:
    """Mean distance (feature pixels) between final handles and targets."""
    return float(np.mean([np.hypot(h[0] - t[0], h[1] - t[1]) for h, t in zip(handles, scene.targets)]))


# ----------------------------------------------------------------------------------------------- benchmark


def run_case(case: str, seed: int, method: str, use_regions: bool = False, mask: bool = True, **options) -> dict:
    """Run one method on one scene; returns the metrics row."""
    from ..drag import drag

    scene = make_scene(case, seed)
    started = time.perf_counter()
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method,
                  mask=scene.mask if mask else None, regions=scene.regions if use_regions else None, **options)
    return {
        "arrival": arrival(scene, result.latent),
        "handle_error": handle_error(scene, result.handles),
        "change_ratio": change_ratio(scene, result.latent),
        "steps": result.steps,
        "converged": result.converged,
        "seconds": time.perf_counter() - started,
    }


def benchmark(seeds: int = 3) -> list[dict]:
    """Every method on every case, ``seeds`` scenes each; rows averaged over seeds."""
    rows = []
    for case in CASES:
        for label, method, extra in METHOD_RUNS:
            runs = [run_case(case, seed, method, **extra) for seed in range(seeds)]
            rows.append({"case": case, "method": label,
                         **{key: float(np.mean([run[key] for run in runs])) for key in runs[0]}})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| case | method | arrival | handle error (px) | change outside / inside | steps | converged | s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['case']} | {row['method']} | {row['arrival']:.2f} | {row['handle_error']:.2f} | "
                     f"{row['change_ratio']:.3f} | {row['steps']:.0f} | {row['converged']:.2f} | "
                     f"{row['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="scenes per case (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(markdown_table(benchmark(args.seeds)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
