"""Figures for SAM2 through transformers against Meta's sam2 package (the path before): load time, the auto mask's
CPU time (SAM2 features and SLIC), the embedding difference and whether the masks agree; with ``--plan``, pip's
plan for requirement files in an environment that holds only torch and torchvision.

Needs the development environment (the sam2 package, and the test helpers in ``tests/``). Run from the repository
root, e.g. ``OMP_NUM_THREADS=1 python scripts/sam2_figures.py --size tiny --plan requirements.txt``.
"""

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# This checkout's package and its test helpers.
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sam2_reference import reference_features, reference_model  # noqa: E402

from adaptivedrag_core.automask import auto_mask  # noqa: E402
from adaptivedrag_core.images import sample_image_path  # noqa: E402
from adaptivedrag_core.points import DragPoints  # noqa: E402
from adaptivedrag_core.sam2_generator import build_package_model  # noqa: E402
from adaptivedrag_core.sam2_loader import Sam2Spec, load_sam2  # noqa: E402

class PackageEncoder:
    """The path before: Meta's model from the sam2 package, features from SAM2's image predictor."""

    def __init__(self, model):
        self.model = model

    def features(self, image):
        return reference_features(self.model, image)


def load_package_model(path: Path, spec: Sam2Spec):
    model = build_package_model(spec)
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True)["model"], strict=True)
    return model.eval()


def timed(function):
    """(result, CPU seconds, wall seconds) of ``function()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = function()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def mask_figures(encoder, image, points, repeat: int) -> tuple[dict, object]:
    """Median CPU and wall seconds of ``auto_mask`` over ``repeat`` runs, its stage timings, and the last result."""
    runs = [timed(lambda: auto_mask(image, points, encoder)) for _ in range(repeat)]
    result = runs[-1][0]
    return {
        "auto_mask_cpu_s": round(statistics.median(run[1] for run in runs), 2),
        "auto_mask_wall_s": round(statistics.median(run[2] for run in runs), 2),
        "features_wall_s": round(statistics.median(run[0].timings["features"] for run in runs), 2),
        "slic_wall_s": round(statistics.median(run[0].timings["slic"] for run in runs), 3),
    }, result


def import_modules(names) -> None:
    for name in names:
        importlib.import_module(name)


def compare_paths(size: str, repeat: int) -> dict:
    # Imports first, timed apart: each path pays them once per process.
    _, package_import_cpu, _ = timed(lambda: import_modules(["hydra.utils", "sam2.sam2_image_predictor"]))
    _, transformers_import_cpu, _ = timed(lambda: import_modules(["transformers.models.sam2.modeling_sam2"]))
    spec = Sam2Spec("2.1", size)
    image = np.asarray(Image.open(sample_image_path()).convert("RGB"))
    points = DragPoints.from_pairs(["150,152:190,140"], image.shape[1], image.shape[0])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"sam2.1_hiera_{size}.pt"
        torch.save({"model": reference_model(size, seed=0).state_dict()}, path)
        package, package_load_cpu, _ = timed(lambda: load_package_model(path, spec))
        encoder, load_cpu, _ = timed(lambda: load_sam2(path))
    before, before_result = mask_figures(PackageEncoder(package), image, points, repeat)
    after, after_result = mask_figures(encoder, image, points, repeat)
    difference = (encoder.features(image) - PackageEncoder(package).features(image)).abs().max().item()
    return {
        "model": str(spec),
        "image": f"{sample_image_path().name} {image.shape[1]}x{image.shape[0]}",
        "torch_threads": torch.get_num_threads(),
        "before_sam2_package": {"import_cpu_s": round(package_import_cpu, 2), "load_cpu_s": round(package_load_cpu, 2),
                                **before},
        "after_transformers": {"import_cpu_s": round(transformers_import_cpu, 2), "load_cpu_s": round(load_cpu, 2),
                               **after},
        "embedding_max_abs_difference": difference,
        "masks_identical": bool(np.array_equal(before_result.mask, after_result.mask)
                                and np.array_equal(before_result.regions, after_result.regions)),
    }


def plan_figures(requirements: Path) -> dict:
    from test_requirements_plan import OWNED_BY_COMFYUI, environment_with_torch, normalised, pip_plan

    with tempfile.TemporaryDirectory() as folder:
        plan = pip_plan(environment_with_torch(Path(folder) / "env"), requirements)
    planned = {normalised(item["metadata"]["name"]): item for item in plan["install"]}
    return {
        "requirements": str(requirements),
        "packages_planned": len(planned),
        "torch_or_torchvision_planned": sorted(set(planned) & set(OWNED_BY_COMFYUI)),
        "built_from_source": sorted(name for name, item in planned.items()
                                    if not item["download_info"]["url"].endswith(".whl")),
        "plan": sorted(f"{name}=={item['metadata']['version']}" for name, item in planned.items()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument("--repeat", type=int, default=2, help="auto-mask runs per path (the median is printed)")
    parser.add_argument("--plan", nargs="*", type=Path, default=[], help="requirement files to plan with pip")
    args = parser.parse_args()
    print(json.dumps(compare_paths(args.size, args.repeat), indent=2))
    for requirements in args.plan:
        print(json.dumps(plan_figures(requirements), indent=2))


if __name__ == "__main__":
    main()
