"""Speed and memory benchmark of one drag edit, stage by stage.

On CUDA it uses random-init full-size SD1.5 (built from the bundled configs, fp16 UNet and text encoder, fp32 VAE,
as :class:`~adaptivedrag_core.pipeline.DragPipeline` runs them) and a random-init SAM2 (large by default): timing
does not depend on the weights. On the CPU it uses the tiny random models on a small image.

What is measured, in a warm process (a whole warm-up edit runs first and is reported apart):

- the auto mask: SAM2 image features and SLIC (``auto_mask``'s own timings);
- a **first edit**: "prepare" (VAE encode and prompt), identity LoRA, DDIM inversion, the reference branch, the
  drag optimisation, sampling (with CLoss for the adaptive method) and the VAE decode, each stage through the
  pipeline's own stage methods; sampling is also run with CLoss switched the other way, reported apart;
- a **re-drag** on the same pipeline, which reuses the VAE encode, the prompt, the LoRA, the inversion, the
  reference and the drag's starting features (only the drag and the sampling run, and the decode).

With ``cuda_graphs`` (on by default on CUDA) the repeated steps replay CUDA graphs, captured in each stage's first
steps: that capture is part of the stage's time. Steps whose capture failed are listed in ``cuda_graph_failures``.

The drag runs a fixed number of steps, so runs compare: AdaptiveDrag's budget is pinned (``n_max = n_steps``)
and the drag goes from near one corner of the image to near the opposite one, farther than the handles can
travel in that many steps (a tracked handle moves at most ``tracking_radius`` feature pixels per step), so no
method can finish early. FreeDrag can still stop early (its line search may move without Adam steps), so the
steps actually run are reported.

Peak memory: ``torch.cuda.max_memory_allocated`` per stage on CUDA (weights included: it is what the GPU
must hold); on the CPU the process's peak resident set size (``getrusage``), which is process-wide and only
ever grows.
"""

from __future__ import annotations

import math
import platform
import resource
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from PIL import Image

from ..errors import InputError
from ..graphs import use_cuda_graphs
from ..images import prepare_image
from ..models import SDComponents
from ..pipeline import (
    METHODS,
    VAE_DOWNSCALE,
    DragPipeline,
    EditSettings,
    feature_grid_size,
    lora_checkpointing,
    step_budget,
)
from ..points import DragPoints

# The targets for a 512x512 edit at the paper's defaults on one H100, warm process.
TARGETS = {"first_edit_s": 8.0, "re_drag_s": 2.0, "warmup_s": 20.0, "peak_memory_gib": 6.0,
           "device": "NVIDIA H100, 512x512, paper defaults"}
# Tracked handles move at most this far (feature pixels) per step: DragDiffusion's r_p = 3.
TRACKING_RADIUS = 3
# Handle and target sit this far in from opposite corners (fraction of the image side).
CORNER_INSET = 0.1
MODEL_KINDS = ("tiny", "sd15")
SAM2_SIZES = ("tiny", "small", "base_plus", "large", "none")


@dataclass
class SpeedConfig:
    """Settings of a benchmark run (None: the device's default).

    Args:
        device: "cpu" or "cuda".
        size: image side in pixels (default 512 on CUDA, 128 on the CPU).
        method: "adaptive", "freedrag" or "dragdiffusion".
        drag_steps, lora_steps: fixed drag steps and LoRA steps (paper: 80 and 80).
        num_steps, strength: DDIM steps and inversion strength (paper: 50 and 0.7, i.e. 35 steps).
        repeat: measured edits (each a first edit then a re-drag); stage figures are the median.
        models: "sd15" (random-init full size; default on CUDA) or "tiny" (default on the CPU).
        sam2_size: SAM2 architecture (default large on CUDA, tiny on the CPU); "none" times the weight-free Lab
            fallback instead.
        seed: seeds the random models and the LoRA.
        lora_gradient_checkpointing: as :class:`EditSettings` (None: by the device).
        cuda_graphs: as :class:`EditSettings` (None: on for CUDA; never on the CPU).
    """

    device: str = "cpu"
    size: Optional[int] = None
    method: str = "adaptive"
    drag_steps: int = 80
    lora_steps: int = 80
    num_steps: int = 50
    strength: float = 0.7
    repeat: int = 1
    models: Optional[str] = None
    sam2_size: Optional[str] = None
    seed: int = 0
    lora_gradient_checkpointing: Optional[bool] = None
    cuda_graphs: Optional[bool] = None

    def __post_init__(self):
        on_cuda = self.device == "cuda"
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"unknown device {self.device!r}; use cpu or cuda")
        if on_cuda and not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA device is available")
        self.size = self.size or (512 if on_cuda else 128)
        self.models = self.models or ("sd15" if on_cuda else "tiny")
        self.sam2_size = self.sam2_size or ("large" if on_cuda else "tiny")
        if self.models not in MODEL_KINDS:
            raise InputError(f"unknown models {self.models!r}; choose one of {', '.join(MODEL_KINDS)}")
        if self.sam2_size not in SAM2_SIZES:
            raise InputError(f"unknown SAM2 size {self.sam2_size!r}; choose one of {', '.join(SAM2_SIZES)}")
        check_bench_edit(self, ("drag_steps", "lora_steps", "num_steps", "repeat"))

    def edit_settings(self) -> EditSettings:
        drag_options = step_budget(self.method, self.drag_steps)
        if self.method == "adaptive":
            drag_options["n_max"] = self.drag_steps  # a pinned budget, so every run takes the same steps
        return EditSettings(method=self.method, seed=self.seed, work_size=self.size, lora_steps=self.lora_steps,
                            num_steps=self.num_steps, strength=self.strength, drag_options=drag_options,
                            lora_gradient_checkpointing=self.lora_gradient_checkpointing,
                            cuda_graphs=self.cuda_graphs)


def check_bench_edit(config, counts: tuple) -> None:
    """Refuse a benchmark config whose ``method`` is unknown, whose ``size`` the VAE cannot take, or whose
    ``counts`` (attribute names) are below 1."""
    if config.method not in METHODS:
        raise InputError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.size < 64 or config.size % VAE_DOWNSCALE:
        raise InputError(f"size must be a multiple of {VAE_DOWNSCALE} and at least 64, got {config.size}")
    for name in counts:
        if getattr(config, name) < 1:
            raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")


@dataclass
class StageFigures:
    """One stage's figures: wall time (s), steps, time per step (s), peak memory (bytes; see module docstring)."""

    wall_s: float
    steps: Optional[int] = None
    per_step_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None


# ----------------------------------------------------------------------------------------------- measuring


class MemoryClock:
    """Wall time and peak memory, synchronising CUDA so that queued GPU work is counted where it belongs."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.started = 0.0

    def start(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.started = time.perf_counter()

    def lap(self) -> tuple[float, int]:
        """Seconds and peak memory since the last start or lap; then starts the next lap."""
        if self.on_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self.started
        peak = torch.cuda.max_memory_allocated() if self.on_cuda else process_peak_rss()
        self.start()
        return seconds, peak


def process_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class StepCounter:
    """A progress callback that remembers the last step reported."""

    def __init__(self):
        self.steps = 0

    def __call__(self, step: int, total: int) -> None:
        self.steps = step


class InversionSplitter:
    """``progress_factory`` for :meth:`DragPipeline.invert` that laps the clock whenever the pipeline starts a
    long stage, splitting the call into "prepare" (VAE encode, prompt), "lora" and "inversion"."""

    NAMES = {"identity LoRA": "lora", "DDIM inversion": "inversion"}

    def __init__(self, clock: MemoryClock):
        self.clock = clock
        self.current = "prepare"
        self.counters: dict[str, StepCounter] = {}
        self.figures: dict[str, StageFigures] = {}

    def __call__(self, label: str) -> StepCounter:
        self.finish()
        self.current = self.NAMES.get(label, label)
        self.counters[self.current] = StepCounter()
        return self.counters[self.current]

    def finish(self) -> None:
        """Close the current sub-stage (call once more after ``invert`` returns)."""
        seconds, peak = self.clock.lap()
        counter = self.counters.get(self.current)
        self.figures[self.current] = _figures(seconds, peak, counter.steps if counter and counter.steps else None)


def _figures(seconds: float, peak: int, steps: Optional[int] = None) -> StageFigures:
    return StageFigures(round(seconds, 5), steps, round(seconds / steps, 6) if steps else None, peak)


# ------------------------------------------------------------------------------------------------- models


def build_sd_components(config: SpeedConfig) -> SDComponents:
    """The config's SD model: random-init full-size SD1.5 on its device, or the tiny random model."""
    from ..models import random_sd15_components, tiny_sd_components

    return random_sd15_components(config.device) if config.models == "sd15" else tiny_sd_components(config.seed)


def benchmark_image(size: int) -> Image.Image:
    """The bundled sample photo at ``size`` x ``size`` (a real picture, so SLIC and SAM2 see real structure)."""
    from ..images import sample_image_path

    with Image.open(sample_image_path()) as image:
        return image.convert("RGB").resize((size, size), Image.LANCZOS)


def far_drag(size: int) -> DragPoints:
    """One pair from near the top-left corner to near the bottom-right one."""
    near, far = CORNER_INSET * (size - 1), (1 - CORNER_INSET) * (size - 1)
    return DragPoints(((near, near),), ((far, far),), size, size)


# --------------------------------------------------------------------------------------------------- run


def run_speed_benchmark(config: SpeedConfig, components: Optional[SDComponents] = None, encoder=None,
                        log=lambda line: None) -> dict:
    """Run the benchmark and return its report (a JSON-ready dict).

    Args:
        config: :class:`SpeedConfig`.
        components, encoder: models to time instead of the ones ``config`` would build (no encoder is used when
            ``config.sam2_size`` is "none").
        log: receives a line as each phase ends.
    """
    from ..sam2_loader import random_sam2

    device = torch.device(config.device)
    start = time.perf_counter()
    components = components or build_sd_components(config)
    if config.sam2_size == "none":
        encoder = None
    elif encoder is None:
        encoder = random_sam2(config.sam2_size, seed=config.seed)
    settings = config.edit_settings()
    image, points = benchmark_image(config.size), far_drag(config.size)
    setup_s = time.perf_counter() - start
    log(f"models ready in {setup_s:.1f} s")

    warmup = timed_edit(components, encoder, image, points, settings, device)
    log(f"warm-up edit: {warmup['first_edit_s']:.2f} s")
    runs = []
    for index in range(config.repeat):
        runs.append(timed_edit(components, encoder, image, points, settings, device))
        log(f"edit {index + 1}/{config.repeat}: first {runs[-1]['first_edit_s']:.2f} s, "
            f"re-drag {runs[-1]['re_drag_s']:.2f} s")
    return {
        "config": asdict(config),
        "environment": environment(device, components),
        "setup_s": round(setup_s, 3),
        "warmup": {key: _plain(value) for key, value in warmup.items()},
        "stages": {name: asdict(_median_figures([run["stages"][name] for run in runs])) for name in runs[0]["stages"]},
        "re_drag_stages": {name: asdict(_median_figures([run["re_drag_stages"][name] for run in runs]))
                           for name in runs[0]["re_drag_stages"]},
        "first_edit_s": statistics.median(run["first_edit_s"] for run in runs),
        "re_drag_s": statistics.median(run["re_drag_s"] for run in runs),
        "warmup_overhead_s": round(warmup["first_edit_s"] - statistics.median(run["first_edit_s"] for run in runs), 4),
        "first_edit_peak_memory_bytes": max(run["first_edit_peak_memory_bytes"] for run in runs),
        "lora_gradient_checkpointing": lora_checkpointing(settings.lora_gradient_checkpointing, device),
        "cuda_graphs": use_cuda_graphs(settings.cuda_graphs, device),
        "cuda_graph_failures": {name: reason for run in (warmup, *runs)
                                for name, reason in run["cuda_graph_failures"].items()},
        "drag_steps_requested": config.drag_steps,
        "drag_steps_run": min(run["stages"]["drag"].steps for run in runs),
        "notes": notes(config, device),
        "targets": TARGETS,
    }


def timed_edit(components, encoder, image, points: DragPoints, settings: EditSettings, device) -> dict:
    """One first edit and one re-drag on a fresh pipeline, stage by stage (see the module docstring)."""
    clock = MemoryClock(device)
    stages, automask = mask_stages(image, points, encoder, clock, device)
    pipeline = DragPipeline(components, device=device, model_id="speed-benchmark")
    working = prepare_image(image, settings.work_size)
    clock.start()
    pipeline.encode_image(working)
    stages["vae_encode"] = _figures(*clock.lap())

    edit = EditStages(pipeline, working, points, settings, clock, automask)
    first_edit = edit.run()
    stages.update(first_edit)
    stages[_sampling_name(settings.use_closs)] = stages["sampling"]
    stages[_sampling_name(not settings.use_closs)] = edit.sample(closs=not settings.use_closs)
    re_drag = edit.run()
    return {
        "stages": stages,
        "re_drag_stages": re_drag,
        "first_edit_s": round(sum(stage.wall_s for stage in first_edit.values()), 4),
        "re_drag_s": round(sum(stage.wall_s for stage in re_drag.values()), 4),
        "first_edit_peak_memory_bytes": max(stage.peak_memory_bytes for stage in first_edit.values()),
        "cuda_graph_failures": pipeline.graph_failures,
    }


def _sampling_name(closs: bool) -> str:
    return "sampling_closs" if closs else "sampling_no_closs"


def mask_stages(image, points, encoder, clock: MemoryClock, device):
    """SAM2 features and SLIC through ``auto_mask``: (their figures, the AutoMaskResult).

    SAM2 sits on the device only for this stage, so the edit's peak memory is measured without it.
    """
    from ..automask import AutoMaskWarning, auto_mask
    from ..sam2_loader import sam2_on

    with sam2_on(encoder, device), warnings.catch_warnings():
        clock.start()
        warnings.simplefilter("ignore", AutoMaskWarning)
        result = auto_mask(image, points, encoder=encoder)
        _, peak = clock.lap()
    if encoder is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    figures = {"sam2_features": _figures(result.timings["features"], peak),
               "slic": _figures(result.timings["slic"], peak)}
    return figures, result


class EditStages:
    """The stages of :meth:`DragPipeline.edit`, called one by one on one pipeline so each can be timed.

    The auto mask's mask is used (so the drag runs the full UNet for its mask term, as in a real edit) and, for
    the adaptive method, its superpixel regions.
    """

    def __init__(self, pipeline: DragPipeline, working, points: DragPoints, settings: EditSettings,
                 clock: MemoryClock, automask):
        self.pipeline, self.working, self.settings, self.clock = pipeline, working, settings, clock
        width, height = working.size
        self.feature_size = feature_grid_size(width, height, settings.feature_scale)
        self.handles, self.targets = points.to_grid(*self.feature_size)
        self.latent_handles, self.latent_targets = points.to_grid(width // VAE_DOWNSCALE, height // VAE_DOWNSCALE)
        self.mask = automask.mask
        self.regions = automask.regions if settings.method == "adaptive" else None
        self.inversion = self.reference = self.dragged = self.sampled = None

    def run(self) -> dict:
        """prepare / lora / inversion, reference, drag, sampling, decode: a first edit, or a re-drag once cached."""
        pipeline, settings = self.pipeline, self.settings
        splitter = InversionSplitter(self.clock)
        self.clock.start()
        self.inversion = pipeline.invert(self.working, settings, splitter)
        splitter.finish()
        stages = dict(splitter.figures)
        self.reference, stages["reference"] = self._timed(
            lambda progress: pipeline.reference(self.inversion, settings, progress))
        self.dragged, stages["drag"] = self._timed(lambda progress: pipeline.drag(
            self.inversion, self.handles, self.targets, self.feature_size, settings, self.mask, self.regions,
            progress))
        stages["sampling"] = self.sample(settings.use_closs)
        _, stages["vae_decode"] = self._timed(
            lambda progress: self.working.restore(pipeline.decode_latent(self.sampled)))
        return stages

    def sample(self, closs: bool) -> StageFigures:
        """Sample the dragged latent with CLoss on or off (keeps the result for the decode)."""
        settings = EditSettings(**{**asdict(self.settings), "closs": closs})
        self.sampled, figures = self._timed(lambda progress: self.pipeline.sample(
            self.inversion, self.dragged.latent, self.reference, settings, self.latent_handles,
            self.latent_targets, progress))
        return figures

    def _timed(self, stage):
        """Run ``stage(progress)``; returns (its result, its figures with the steps it reported)."""
        counter = StepCounter()
        self.clock.start()
        value = stage(counter)
        seconds, peak = self.clock.lap()
        return value, _figures(seconds, peak, counter.steps or None)


def _plain(value):
    """StageFigures (also inside dicts) as plain dicts, for JSON."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return asdict(value) if isinstance(value, StageFigures) else value


def _median_figures(figures: list[StageFigures]) -> StageFigures:
    middle = sorted(figures, key=lambda f: f.wall_s)[len(figures) // 2]
    return StageFigures(middle.wall_s, middle.steps, middle.per_step_s,
                        max((f.peak_memory_bytes for f in figures if f.peak_memory_bytes is not None), default=None))


def environment(device: torch.device, components: SDComponents) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "unet_parameters": sum(p.numel() for p in components.unet.parameters())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["memory_measure"] = "torch.cuda.max_memory_allocated per stage (weights included)"
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
        info["memory_measure"] = "process peak RSS (getrusage), process-wide and cumulative, not per stage"
    return info


def notes(config: SpeedConfig, device: torch.device) -> list[str]:
    result = []
    feature_side = config.size * EditSettings.feature_scale
    reach = math.dist((CORNER_INSET * feature_side,) * 2, ((1 - CORNER_INSET) * feature_side,) * 2)
    if reach <= TRACKING_RADIUS * config.drag_steps + 2:
        result.append(f"the drag ({reach:.0f} feature px) is short enough to finish before {config.drag_steps} "
                      "steps: compare drag_steps_run")
    if config.method == "freedrag":
        result.append("FreeDrag may stop before the requested steps: compare drag_steps_run")
    if device.type == "cpu":
        models = "tiny random models" if config.models == "tiny" else "random-init full-size SD1.5"
        result.append(f"CPU run with the {models}: figures show the benchmark works, not GPU speed")
    return result
