"""DragBench runner: edit every sample of a DragBench folder, measure MD and IF, resume after an interruption.

Layout read (DragDiffusion's ``drag_bench_data``)::

    DIR/<category>/<sample>/original_image.png
                           /meta_data.pkl     {"prompt": str, "points": [[x, y], ...] (handle, target, ...),
                                               "mask": uint8 [H, W] 0/1}

Layout written::

    OUT/<category>/<sample>.png    the edited image
    OUT/<category>/<sample>.json   per-sample record (settings, drag steps, timings, MD terms, IF); written last
                                   and atomically, so its presence marks the sample done
    OUT/summary.json               MD (mean over all points), IF (mean over samples), skipped samples and why

``meta_data.pkl`` files come from strangers, so they are read with :class:`SafeUnpickler`, which rebuilds numpy
arrays and plain containers and refuses every other global (a pickle could otherwise run any code).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from ..errors import InputError
from ..models import SDComponents
from ..pipeline import DragPipeline, EditSettings
from ..points import DragPoints
from .metrics import AlexLPIPS, DiftFeaturizer, image_fidelity, mean_distance_terms

logger = logging.getLogger(__name__)

IMAGE_NAME = "original_image.png"
META_NAME = "meta_data.pkl"
SUMMARY_NAME = "summary.json"
MASK_SOURCES = ("dragbench", "auto", "none")

# ------------------------------------------------------------------------------------------- safe reading


class SafeUnpickler(pickle.Unpickler):
    """Unpickler for untrusted files: only numpy array/dtype/scalar reconstruction and plain containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # protocol-2 pickles store bytes this way
        ("builtins", "list"),
        ("builtins", "tuple"),
        ("builtins", "dict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays and plain data)")
        return super().find_class(module, name)


def safe_load_pickle(path: Path):
    """Unpickle ``path`` with :class:`SafeUnpickler`; raises InputError for an unsafe or broken file."""
    try:
        return SafeUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except Exception as error:  # any failure to unpickle makes the sample unusable
        raise InputError(f"{path.name}: cannot read ({type(error).__name__}: {error})") from error


@dataclass
class Sample:
    """One DragBench sample, read and checked.

    Args:
        category, name: the folder names.
        image: the original image (RGB).
        prompt: the sample's prompt.
        points: its drag pairs (image pixels).
        mask: bool [H, W], True = may change.
    """

    category: str
    name: str
    image: Image.Image
    prompt: str
    points: DragPoints
    mask: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.category}/{self.name}"


def find_samples(data_dir: Path) -> list[tuple[str, str]]:
    """(category, sample) folder names under ``data_dir``, sorted, hidden entries skipped."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"DragBench folder not found: {data_dir}")
    found = [(category.name, sample.name) for category in sorted(data_dir.iterdir())
             if category.is_dir() and not category.name.startswith(".")
             for sample in sorted(category.iterdir()) if sample.is_dir() and not sample.name.startswith(".")]
    if not found:
        raise InputError(f"{data_dir} has no <category>/<sample>/ folders: is it a DragBench folder?")
    return found


def read_sample(data_dir: Path, category: str, name: str) -> Sample:
    """Read and check one sample; raises InputError saying what is wrong with it."""
    folder = Path(data_dir) / category / name
    try:
        with Image.open(folder / IMAGE_NAME) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as error:
        raise InputError(f"{IMAGE_NAME}: cannot read ({error})") from error
    meta = safe_load_pickle(folder / META_NAME)
    if not isinstance(meta, dict) or not {"prompt", "points", "mask"} <= set(meta):
        raise InputError(f"{META_NAME}: expected a dict with prompt, points and mask")
    try:
        coords = np.asarray(meta["points"], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise InputError(f"{META_NAME}: points are not numbers ({error})") from error
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) % 2:
        raise InputError(f"{META_NAME}: points must be [x, y] pairs, handle and target alternating "
                         f"(got shape {coords.shape})")
    points = DragPoints.from_flat(coords.reshape(-1).tolist(), image.width, image.height)
    mask = np.asarray(meta["mask"])
    if mask.shape != (image.height, image.width):
        raise InputError(f"{META_NAME}: mask is {mask.shape[::-1]} but the image is {image.width}x{image.height}")
    return Sample(category, name, image, str(meta["prompt"]), points, mask.astype(bool))


# ------------------------------------------------------------------------------------------------- runner


@dataclass
class Metrics:
    """The metric models; a missing one skips its metric (noted in the summary).

    Args:
        dift: feature extractor for MD (:class:`DiftFeaturizer` over SD2.1, or any model for tests).
        lpips: :class:`AlexLPIPS` for IF.
    """

    dift: Optional[DiftFeaturizer] = None
    lpips: Optional[AlexLPIPS] = None

    def available(self) -> list[str]:
        return [name for name, model in (("md", self.dift), ("if", self.lpips)) if model is not None]

    def measure(self, sample: Sample, edited: Image.Image, wanted: list[str]) -> dict:
        """The ``wanted`` metrics of one edited sample: MD terms (one per pair) and IF."""
        results = {}
        if "md" in wanted:
            results["md_terms"] = mean_distance_terms(self.dift, sample.image, edited, sample.prompt,
                                                      sample.points.handles, sample.points.targets)
            results["md"] = float(np.mean(results["md_terms"]))
        if "if" in wanted:
            results["if"] = image_fidelity(self.lpips, sample.image, edited)
        return results


@dataclass
class RunConfig:
    """What identifies a run's results; a resumed run must use the same.

    Args:
        model_id: the editing model (path, or "tiny-random-0").
        settings: the edit settings (as a dict).
        mask_source: "dragbench" (the benchmark's masks), "auto" (the AdaptiveDrag auto mask) or "none".
        regions: where the adaptive method's superpixels come from ("sam2 ..." or "lab-fallback").
    """

    model_id: str
    settings: dict
    mask_source: str = "dragbench"
    regions: str = "lab-fallback"


@dataclass
class RunReport:
    """What one call of :func:`run_dragbench` did (the summary covers every run in the folder)."""

    edited: list = field(default_factory=list)
    rescored: list = field(default_factory=list)
    already_done: list = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def run_dragbench(
    data_dir,
    out_dir,
    components: SDComponents,
    settings: EditSettings,
    metrics: Optional[Metrics] = None,
    model_id: str = "model",
    device="cpu",
    limit: Optional[int] = None,
    mask_source: Optional[str] = None,
    region_encoder=None,
    log: Callable[[str], None] = print,
) -> RunReport:
    """Edit and score every DragBench sample in ``data_dir``, writing results under ``out_dir``.

    Finished samples (their JSON exists with the same settings) are not edited again; when a metric model is
    given now that was missing for a finished sample, only that metric is computed, from the saved image.
    Samples that cannot be read (image, pickle, points, mask) are skipped and listed in the summary with the reason.

    Args:
        data_dir: the DragBench folder.
        out_dir: where results go (created).
        components: the editing model (SD1.5, or the tiny model in tests).
        settings: edit settings; ``settings.prompt`` is replaced by each sample's prompt.
        metrics: :class:`Metrics` (each model optional; None: no metrics).
        model_id: identifies the editing model in the results (and in cache keys).
        device: "cpu" or "cuda".
        limit: only the first ``limit`` samples (sorted by category, then name).
        mask_source: "dragbench" uses the sample's mask; "auto" the AdaptiveDrag auto mask; "none" no mask. None:
            "auto" for the adaptive method (the paper's is mask-free), "dragbench" otherwise. Except with "none",
            the adaptive method takes its superpixel regions from the auto mask.
        region_encoder: a SAM2 :class:`~adaptivedrag_core.sam2_loader.Sam2Encoder` for the superpixels of the
            adaptive method (and the auto mask); None uses the weight-free Lab fallback.
        log: receives one line per sample.
    """
    if mask_source is None:
        mask_source = "auto" if settings.method == "adaptive" else "dragbench"
    if mask_source not in MASK_SOURCES:
        raise InputError(f"unknown mask source {mask_source!r}; choose one of {', '.join(MASK_SOURCES)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    metrics = metrics or Metrics()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = RunConfig(model_id, _settings_dict(settings), mask_source,
                       f"sam2 {region_encoder.spec}" if region_encoder is not None else "lab-fallback")
    wanted = metrics.available()
    names = find_samples(data_dir)[:limit]
    report = RunReport()
    for index, (category, name) in enumerate(names, start=1):
        key = f"{category}/{name}"
        record_path, image_path = out_dir / category / f"{name}.json", out_dir / category / f"{name}.png"
        record = _finished_record(record_path, image_path, config)
        missing = [metric for metric in wanted if record is not None and metric not in record["metrics"]]
        if record is not None and not missing:
            report.already_done.append(key)
            continue
        progress = f"[{index}/{len(names)}] {key}"
        try:
            sample = read_sample(data_dir, category, name)
        except InputError as error:
            _skip(report, key, error, log, progress)
            continue
        if record is not None:
            with Image.open(image_path) as saved:
                record["metrics"].update(metrics.measure(sample, saved.convert("RGB"), missing))
            report.rescored.append(key)
        else:
            try:
                record = _edit_sample(sample, components, settings, config, device, model_id, mask_source,
                                      region_encoder, image_path)
            except InputError as error:
                _skip(report, key, error, log, progress)
                continue
            with Image.open(image_path) as saved:
                record["metrics"] = metrics.measure(sample, saved.convert("RGB"), wanted)
            report.edited.append(key)
        _write_json_atomically(record_path, record)
        log(f"{progress}: " + ", ".join(f"{k}={v:.4g}" for k, v in _scalars(record).items()))
    report.summary = summarise(out_dir, config, wanted, report.skipped, len(names))
    _write_json_atomically(out_dir / SUMMARY_NAME, report.summary)
    return report


def _skip(report: RunReport, key: str, error: InputError, log, progress: str) -> None:
    """Record, log and print why a sample is skipped."""
    report.skipped[key] = str(error)
    logger.warning("skipping %s: %s", key, error)
    log(f"{progress}: skipped ({error})")


def uses_auto_mask(mask_source: str, method: str) -> bool:
    """Whether a sample's edit needs the auto mask: as its mask, or for the adaptive method's regions."""
    return mask_source == "auto" or (mask_source == "dragbench" and method == "adaptive")


def _edit_sample(sample: Sample, components, settings: EditSettings, config: RunConfig, device, model_id,
                 mask_source, region_encoder, image_path: Path) -> dict:
    """Edit one sample, save the image atomically, and return its record (without metrics)."""
    from ..automask import AutoMaskWarning, auto_mask
    from ..sam2_loader import sam2_on

    start = time.perf_counter()
    mask = sample.mask if mask_source == "dragbench" else None
    regions = None
    if uses_auto_mask(mask_source, settings.method):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AutoMaskWarning)  # the fallback is recorded in the summary instead
            with sam2_on(region_encoder, device):
                automatic = auto_mask(sample.image, sample.points, encoder=region_encoder)
        regions = automatic.regions if settings.method == "adaptive" else None
        mask = automatic.mask if mask_source == "auto" else mask
    # auto_mask off: the mask and regions are decided here, and "none" must stay mask-free.
    sample_settings = EditSettings(**{**asdict(settings), "prompt": sample.prompt, "auto_mask": False})
    # A fresh pipeline per sample: its caches only help a second drag on the same image.
    pipeline = DragPipeline(components, device=device, model_id=model_id)
    result = pipeline.edit(sample.image, sample.points, sample_settings, mask=mask, regions=regions)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    partial = image_path.with_name(image_path.name + ".partial")
    result.image.save(partial, format="PNG")
    os.replace(partial, image_path)
    return {
        "sample": sample.key,
        "config": asdict(config),
        "prompt": sample.prompt,
        "points": sample.points.to_dict(),
        "final_handles": result.final_handles,
        "drag_steps": result.drag_steps,
        "timings": {**result.timings, "total": round(time.perf_counter() - start, 4)},
        "metrics": {},
    }


def _settings_dict(settings: EditSettings) -> dict:
    values = asdict(settings)
    values.pop("prompt")  # each sample brings its own
    return values


def _finished_record(record_path: Path, image_path: Path, config: RunConfig) -> Optional[dict]:
    """The sample's record if it was finished with the same configuration; InputError if with another one."""
    if not (record_path.is_file() and image_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # an unreadable record: the sample is simply done again
    if record.get("config") != json.loads(json.dumps(asdict(config))):
        raise InputError(
            f"{record_path} was made with other settings ({record.get('config')}); use another --out folder "
            "or the same settings to resume"
        )
    return record


def _scalars(record: dict) -> dict:
    values = {"drag_steps": record["drag_steps"], "seconds": record["timings"]["total"]}
    values.update({k: v for k, v in record["metrics"].items() if k in ("md", "if")})
    return values


def summarise(out_dir: Path, config: RunConfig, wanted: list[str], skipped: dict, sample_count: int) -> dict:
    """The summary over every finished sample in ``out_dir`` (this run's and earlier runs')."""
    records = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(Path(out_dir).glob("*/*.json"))]
    terms = [term for record in records for term in record["metrics"].get("md_terms", [])]
    fidelities = [record["metrics"]["if"] for record in records if "if" in record["metrics"]]
    notes = []
    if "md" not in wanted:
        notes.append("MD not computed: give --dift-model (a local diffusers SD2.1 folder)")
    if "if" not in wanted:
        notes.append("IF not computed: give --lpips-weights (a local LPIPS AlexNet weights file)")
    if config.regions == "lab-fallback" and uses_auto_mask(config.mask_source, config.settings["method"]):
        notes.append("superpixels from Lab colour (no --sam2): not the paper's SAM2 feature space")
    return {
        "config": asdict(config),
        "samples_considered": sample_count,
        "samples_done": len(records),
        "points_scored": len(terms),
        "md": float(np.mean(terms)) if terms else None,
        "if": float(np.mean(fidelities)) if fidelities else None,
        "mean_seconds_per_sample": float(np.mean([r["timings"]["total"] for r in records])) if records else None,
        "skipped": skipped,
        "notes": notes,
    }


def _write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(partial, path)
