"""The whole edit, stage by stage, with per-stage caching.

Each stage is a method with explicit inputs and outputs, and its result is cached under a key made from those
inputs, so a second drag on the same image reuses the identity LoRA, the inversion and the reference recording.
LoRA weights and inverted latents can also be kept on disk (``cache_dir``), so the CLI reuses them across runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .automask import auto_mask
from .cache import DiskCache
from .drag import METHODS as DRAG_OPTIONS
from .drag.closs import CLOSS_KINDS, DEFAULT_CLOSS_KIND
from .drag.common import DragStart, is_finite_number, parse_options, usable_mask
from .errors import InputError
from .features import UNetFeatures, compact_drag_start, drag_start_from, make_feature_fn
from .graphs import GraphedFeatures, NoiseStep, StepGraphs
from .images import WorkingImage, prepare_image, resize_labels
from .inversion import DDIMSchedule, ddim_invert, make_schedule, unet_noise_fn
from .models import SD15_SCHEDULER_CONFIG, SDComponents, encode_prompt
from .points import DragPoints, map_point
from .progress import ProgressFn
from .sampling import CLossSettings, ReferenceBranch, record_reference, sample_dragged

METHODS = ("adaptive", "freedrag", "dragdiffusion")
VAE_DOWNSCALE = 8
#: The largest working size accepted: 8 times SD1.5's native side, far beyond what its memory allows in practice.
MAX_WORK_SIZE = 4096

# Numeric settings: (name, whole number?, lowest, highest, lowest itself excluded?). None = unbounded.
_SETTING_BOUNDS = (
    ("seed", True, 0, 2**64 - 1, False),
    ("work_size", True, 8, MAX_WORK_SIZE, False),
    ("lora_steps", True, 0, None, False),
    ("lora_rank", True, 1, None, False),
    ("lora_lr", False, 0, None, True),
    ("lora_batch_size", True, 1, None, False),
    ("num_steps", True, 1, SD15_SCHEDULER_CONFIG["num_train_timesteps"], False),
    ("strength", False, 0, 1, True),
    ("feature_block", True, 0, 3, False),  # the UNet's four up-blocks
    ("feature_scale", False, 0, 1, True),
    ("closs_weight", False, 0, None, False),
    ("reference_start_layer", True, 0, None, False),
    ("reference_start_step", True, 0, None, False),
    ("guidance_scale", False, 0, None, False),
)


@dataclass
class EditSettings:
    """Every setting of an edit; the defaults are the papers' (see docs/method notes in each stage).

    Args:
        method: "adaptive", "freedrag" or "dragdiffusion".
        prompt: text prompt ("" is fine: DragBench-style prompts help a little).
        seed: seeds the LoRA training (the only random stage).
        work_size: longer side of the working copy (512, SD1.5's native size).
        lora_steps, lora_rank, lora_lr, lora_batch_size: identity LoRA (80, 16, 5e-4, 4); 0 steps skips it.
        lora_gradient_checkpointing: train the LoRA with gradient checkpointing (same weights, far less memory,
            slower); None decides by the device (:func:`lora_checkpointing`).
        num_steps, strength: DDIM schedule (50) and inversion strength (0.7 -> invert 35 steps).
        feature_block: UNet up-block whose output is the drag feature map (2).
        feature_scale: feature map size relative to the image (0.5 -> 256x256 for 512x512).
        drag_options: method hyper-parameters passed to ``drag()`` (paper defaults when absent).
        auto_mask: when an edit is given no regions, make the AdaptiveDrag auto mask and its superpixel regions
            (:func:`automask.auto_mask`); the auto mask is used only when no mask is given either. None means
            "on for adaptive" (the paper's method is mask-free), off otherwise.
        closs: correspondence loss while sampling; None means "on for adaptive, off otherwise".
        closs_weight, closs_kind: CLoss weight and "mse" (public code, the default) or "contrastive" (paper); see
            :mod:`.drag.closs` for why.
        reference_start_layer, reference_start_step: reference-latent control (10, 0).
        guidance_scale: classifier-free guidance while sampling; 1 = off (both papers). The inversion never
            uses guidance.
        cuda_graphs: replay the repeated steps (LoRA, inversion, drag, sampling) from CUDA graphs; None (auto) means
            on for CUDA devices. Never on the CPU. It changes the speed, not the result (:mod:`graphs`).
    """

    method: str = "adaptive"
    prompt: str = ""
    seed: int = 0
    work_size: int = 512
    lora_steps: int = 80
    lora_rank: int = 16
    lora_lr: float = 5e-4
    lora_batch_size: int = 4
    lora_gradient_checkpointing: Optional[bool] = None
    num_steps: int = 50
    strength: float = 0.7
    feature_block: int = 2
    feature_scale: float = 0.5
    drag_options: dict = field(default_factory=dict)
    auto_mask: Optional[bool] = None
    closs: Optional[bool] = None
    closs_weight: float = 1.0
    closs_kind: str = DEFAULT_CLOSS_KIND
    reference_start_layer: int = 10
    reference_start_step: int = 0
    guidance_scale: float = 1.0
    cuda_graphs: Optional[bool] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")

    def validate(self) -> "EditSettings":
        """Check every setting, the method's drag options included, and raise InputError naming the first bad one.

        Numbers must be finite and in range, counts whole. It costs nothing, so the CLI, the pipeline and the nodes
        call it before any model is loaded or trained. Returns the settings.
        """
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, whole, low, high, low_excluded in _SETTING_BOUNDS:
            _check_number(name, getattr(self, name), whole, low, high, low_excluded)
        if self.closs_kind not in CLOSS_KINDS:
            raise InputError(f"unknown CLoss kind {self.closs_kind!r}; choose one of {', '.join(CLOSS_KINDS)}")
        for name in ("auto_mask", "closs", "lora_gradient_checkpointing", "cuda_graphs"):
            if getattr(self, name) not in (None, True, False):
                raise InputError(f"{name} must be on, off or auto (None), got {getattr(self, name)!r}")
        if not isinstance(self.prompt, str):
            raise InputError(f"prompt must be text, got {type(self.prompt).__name__}")
        parse_options(DRAG_OPTIONS[self.method][0], self.drag_options, self.method)
        return self

    @property
    def use_auto_mask(self) -> bool:
        return self.method == "adaptive" if self.auto_mask is None else self.auto_mask

    @property
    def use_closs(self) -> bool:
        return self.method == "adaptive" if self.closs is None else self.closs

    def closs_settings(self) -> Optional[CLossSettings]:
        return CLossSettings(weight=self.closs_weight, kind=self.closs_kind) if self.use_closs else None


def _check_number(name: str, value, whole: bool, low, high, low_excluded: bool) -> None:
    """Raise InputError unless ``value`` is a finite (whole, if ``whole``) number within the bounds."""
    valid = is_finite_number(value) and (isinstance(value, int) or not whole)
    valid = valid and (value > low if low_excluded else value >= low) and (high is None or value <= high)
    if not valid:
        kind = "a whole number" if whole else "a finite number"
        bounds = f"{'>' if low_excluded else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise InputError(f"{name} must be {kind} {bounds}, got {value!r}")


def drag_on_features(unet, text_embeddings, schedule: DDIMSchedule, inverted_latent: torch.Tensor, handles, targets,
                     feature_size: tuple[int, int], method: str, mask: Optional[np.ndarray] = None,
                     regions: Optional[np.ndarray] = None, feature_block: int = 2, progress: ProgressFn = None,
                     start_for: Optional[Callable[[UNetFeatures], DragStart]] = None,
                     graphs: Optional[StepGraphs] = None, **options):
    """``drag()`` on the UNet's decoder features at the inverted timestep (the pipeline's and the node's drag).

    Args:
        unet, text_embeddings, schedule: the model (identity LoRA active), prompt and DDIM schedule.
        inverted_latent: z_t to optimise.
        handles, targets: feature-grid pixels.
        feature_size: (width, height) of the feature grid.
        method: "adaptive", "freedrag" or "dragdiffusion".
        mask, regions: optional bool / int arrays at image resolution; mapped onto the feature grid with
            :func:`images.resize_labels`, so both land on the same cells. A mask adds the x_{t-1} mask term; an
            empty one counts as none (``EmptyMaskWarning``).
        feature_block: the UNet up-block whose output is the feature map.
        progress: ``progress(step, total)``.
        start_for: ``start_for(feature_fn)`` gives the drag's starting features (e.g. from a cache:
            :meth:`DragPipeline.drag_start`); None computes them.
        graphs: a :class:`~adaptivedrag_core.graphs.StepGraphs`: with CUDA graphs enabled, the feature function's
            forward and backward passes are replayed from graphs.
        **options: the method's hyper-parameters.

    The backward passes are loss-scaled when the UNet is float16 (``drag()``'s ``compute_dtype``).
    """
    from .drag import drag

    mask = usable_mask(mask)
    feature_mask = None if mask is None else torch.from_numpy(resize_labels(mask, *feature_size)).bool()
    feature_regions = None if regions is None else torch.from_numpy(
        resize_labels(regions, *feature_size).astype(np.int64))
    feature_fn = make_feature_fn(unet, text_embeddings, schedule, feature_size, feature_block,
                                 with_prediction=mask is not None)
    start = None if start_for is None else start_for(feature_fn)
    return drag(inverted_latent.float(), feature_fn if graphs is None else GraphedFeatures(feature_fn, graphs),
                handles, targets, method=method, mask=feature_mask, regions=feature_regions, progress=progress,
                compute_dtype=next(unet.parameters()).dtype, start=start, **options)


#: GPUs with less memory than this (cards of 10 GB and less) train the identity LoRA with gradient checkpointing
#: unless told otherwise: without it the LoRA step at 512 px is the edit's peak, about 5.3 GiB, and ComfyUI keeps
#: its own models beside it (docs/performance.md, "Memory and compute without a GPU").
CHECKPOINTING_BELOW_BYTES = 11 * 2**30
#: The user-facing choices (CLI, node) of the on/off/auto settings (``lora_gradient_checkpointing``,
#: ``cuda_graphs``, ...): None means "decide by the device".
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}


def lora_checkpointing(setting: Optional[bool], device) -> bool:
    """Whether the identity LoRA trains with gradient checkpointing: ``setting``, or when it is None (auto), on
    for CUDA devices with less than 11 GiB, where memory is what limits, and off elsewhere, where speed is."""
    if setting is not None:
        return setting
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_properties(device).total_memory < CHECKPOINTING_BELOW_BYTES


def feature_grid_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of the drag feature map for an image (DragDiffusion: half the image size)."""
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def step_budget(method: str, steps: int) -> dict:
    """``drag()`` options that give ``method`` a budget of about ``steps`` optimisation steps.

    DragDiffusion and FreeDrag take ``max_steps``; AdaptiveDrag takes the user step count n, and its budget may
    still grow (by one per step that falls short) up to ``n_max`` = 2n here.
    """
    if method == "adaptive":
        return {"n_steps": steps, "n_max": 2 * steps}
    return {"max_steps": steps}


@dataclass
class Inversion:
    """The un-dragged state of one image: clean latent, inverted latent and the schedule between them."""

    clean_latent: torch.Tensor
    inverted_latent: torch.Tensor
    schedule: DDIMSchedule
    text_embeddings: torch.Tensor
    lora: Optional[dict]
    key: str


@dataclass
class EditResult:
    """What :meth:`DragPipeline.edit` returns.

    Args:
        image: the edited image, same size and mode as the input.
        points: the requested points, input pixels.
        final_handles: where the optimiser left each handle, input pixels.
        drag_steps: optimisation steps used.
        timings: seconds per stage (a reused stage shows as 0 and is listed in ``reused``).
        reused: stages taken from the cache.
        lora: the identity-LoRA weights used (None when LoRA was off), e.g. to save them.
    """

    image: Image.Image
    points: DragPoints
    final_handles: list
    drag_steps: int
    timings: dict
    reused: list
    lora: Optional[dict] = None


class DragPipeline:
    """Drag editing with one SD1.x model.

    Args:
        components: the model (see :mod:`models`).
        device: "cpu" or "cuda".
        dtype: UNet/text-encoder dtype; default fp16 on CUDA, fp32 on CPU. The VAE stays fp32.
        model_id: identifies the weights in cache keys; with ``cache_dir``, derive it from the weights' content
            (:meth:`cache.DiskCache.fingerprint` of :func:`models.model_files`), so other weights never share
            entries. The dtype and the device are part of every key too.
        cache_dir: folder for LoRA weights and inverted latents kept across runs, or None. It is checked here:
            InputError if files cannot be written there.
    """

    def __init__(self, components: SDComponents, device="cpu", dtype=None, model_id="model", cache_dir=None):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.components = components
        for module, dtype in ((components.unet, self.dtype), (components.text_encoder, self.dtype),
                              (components.vae, torch.float32)):
            if module is not None:
                place_module(module, self.device, dtype)
        self.model_id = model_id
        self.cache = DiskCache(cache_dir) if cache_dir else None
        if self.cache is not None:
            self.cache.check()
        self._memory: dict = {}
        self._hits: set = set()  # stages served from a cache during the current edit
        self._graph_failures: dict = {}  # kinds of step whose CUDA-graph capture failed: eager from then on

    # ----------------------------------------------------------------- stages
    def encode_image(self, working: WorkingImage) -> torch.Tensor:
        """Scaled VAE latent (the distribution's mean, so it is deterministic)."""
        with torch.no_grad():
            pixels = working.pixels.to(self.device, torch.float32)
            latent = self.components.vae.encode(pixels).latent_dist.mean
        return latent * self.components.latent_scale

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.components.vae.decode(latent.float() / self.components.latent_scale).sample

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        with torch.no_grad():
            return encode_prompt(self.components, prompt, device=self.device).to(self.dtype)

    def image_latent(self, working: WorkingImage, image_key: str) -> torch.Tensor:
        """:meth:`encode_image`, computed once per image (``image_key``: :meth:`image_key`) and kept in memory."""
        return self._remember("vae_encode", self._key("vae-encode", image_key), lambda: self.encode_image(working))

    def prompt_embeddings(self, prompt: str) -> torch.Tensor:
        """:meth:`encode_prompt`, computed once per prompt and kept in memory."""
        return self._remember("prompt", self._key("prompt", prompt), lambda: self.encode_prompt(prompt))

    def image_key(self, working: WorkingImage) -> str:
        """The hash of the working image's pixels (with the model's): every cache key of the image derives from it,
        so the pixels are hashed once per edit."""
        return self._key("image", working.pixels)

    def train_lora(self, latent, text_embeddings, settings: EditSettings, key: str, progress: ProgressFn = None):
        """Identity LoRA for this image (cached in memory and, with ``cache_dir``, on disk)."""
        from .lora import load_lora, train_identity_lora, write_lora

        if settings.lora_steps <= 0:
            return None
        cached = self._cached("lora", key)
        if cached is not None:
            return cached
        name = f"lora-{key}.safetensors"
        state = self.cache.load(name, load_lora) if self.cache else None
        if state is not None:
            self._hits.add("lora")
        else:
            state = train_identity_lora(
                self.components.unet, latent, text_embeddings, steps=settings.lora_steps, rank=settings.lora_rank,
                lr=settings.lora_lr, batch_size=settings.lora_batch_size, seed=settings.seed, progress=progress,
                gradient_checkpointing=lora_checkpointing(settings.lora_gradient_checkpointing, self.device),
                graphs=self.graphs(settings),
            )
            if self.cache is not None:
                self.cache.save(name, lambda partial: write_lora(state, partial))
        return self._store("lora", key, state)

    def invert(self, working: WorkingImage, settings: EditSettings, progress_factory=None,
               lora: Optional[dict] = None) -> Inversion:
        """Encode (or reuse), train (or reuse) the identity LoRA, and DDIM-invert (or reuse) the image.

        Everything here depends only on the image, the prompt and the settings named in the keys, so a re-drag of
        the same image computes none of it: the pixels are hashed, and the rest comes from the cache.

        Args:
            working: the prepared image.
            settings: the edit's settings.
            progress_factory: ``factory(stage_name) -> progress``.
            lora: identity-LoRA weights to use instead of training (e.g. loaded from a file).
        """
        progress_factory = progress_factory or (lambda name: None)
        image = self.image_key(working)
        clean = self.image_latent(working, image)
        text_embeddings = self.prompt_embeddings(settings.prompt)
        if lora is not None:
            lora_key = self._key("given-lora", *sorted(lora), *(lora[name] for name in sorted(lora)))
        else:
            lora_key = self._key("lora", image, settings.prompt, settings.seed, settings.lora_steps,
                                 settings.lora_rank, settings.lora_lr, settings.lora_batch_size)
            lora = self.train_lora(clean, text_embeddings, settings, lora_key, progress_factory("identity LoRA"))
        # The image and the prompt are part of the key whichever LoRA is used (a given one fits any image).
        key = self._key("inversion", image, settings.prompt, lora_key if lora is not None else None,
                        settings.num_steps, settings.strength)
        schedule = make_schedule(self.components.make_scheduler(), settings.num_steps, settings.strength)
        inverted = self._cached("inversion", key)
        if inverted is None:
            inverted = self._load_latent(key, clean.shape)
        if inverted is None:
            with self._lora(lora):
                noise_fn = NoiseStep(unet_noise_fn(self.components.unet, text_embeddings), self.graphs(settings),
                                     "inversion")
                inverted = ddim_invert(noise_fn, clean, schedule, progress_factory("DDIM inversion"))
            self._save_latent(key, inverted)
            self._store("inversion", key, inverted)
        return Inversion(clean, inverted, schedule, text_embeddings, lora, key)

    def reference(self, inversion: Inversion, settings: EditSettings, progress: ProgressFn = None) -> ReferenceBranch:
        """Record (or reuse) the reference branch's attention keys/values."""
        key = self._key("reference", inversion.key, settings.reference_start_layer, settings.reference_start_step,
                        settings.guidance_scale, settings.prompt)

        def record() -> ReferenceBranch:
            with self._lora(inversion.lora):
                return record_reference(self.components.unet, inversion.text_embeddings, inversion.schedule,
                                        inversion.inverted_latent, settings.reference_start_layer,
                                        settings.reference_start_step, progress, *self._guidance(settings))

        return self._remember("reference", key, record)

    def drag(self, inversion: Inversion, handles, targets, feature_size, settings: EditSettings,
             mask: Optional[np.ndarray] = None, regions: Optional[np.ndarray] = None, progress: ProgressFn = None):
        """Optimise the inverted latent so content moves from handles to targets (feature-grid pixels)."""
        with self._lora(inversion.lora):
            return drag_on_features(self.components.unet, inversion.text_embeddings, inversion.schedule,
                                    inversion.inverted_latent, handles, targets, feature_size, settings.method,
                                    mask, regions, settings.feature_block, progress,
                                    start_for=lambda feature_fn: self.drag_start(inversion, feature_fn),
                                    graphs=self.graphs(settings), **settings.drag_options)

    def drag_start(self, inversion: Inversion, feature_fn: UNetFeatures) -> DragStart:
        """The drag's starting features and prediction, computed once per inversion and feature block and kept
        compact (:func:`~adaptivedrag_core.features.compact_drag_start`). Call it with the identity LoRA active,
        as the drag does."""
        latent = inversion.inverted_latent.float()
        key = self._key("drag-start", inversion.key, feature_fn.block_index, feature_fn.with_prediction)
        compact = self._remember("drag_start", key, lambda: compact_drag_start(feature_fn, latent))
        return drag_start_from(feature_fn, compact, latent)

    def sample(self, inversion: Inversion, dragged_latent, reference: ReferenceBranch, settings: EditSettings,
               latent_handles=(), latent_targets=(), progress: ProgressFn = None,
               latent_mask: Optional[np.ndarray] = None) -> torch.Tensor:
        """Sample the dragged latent (CLoss per ``settings``; it changes nothing outside ``latent_mask``, a bool
        array on the latent grid, when given)."""
        mask = None if latent_mask is None else torch.from_numpy(np.asarray(latent_mask, dtype=bool))
        with self._lora(inversion.lora):
            return sample_dragged(
                self.components.unet, inversion.text_embeddings, inversion.schedule, dragged_latent, reference,
                settings.reference_start_layer, settings.reference_start_step, closs=settings.closs_settings(),
                original_latent=inversion.clean_latent, handles=latent_handles, targets=latent_targets,
                progress=progress, uncond_embeddings=self._guidance(settings)[0],
                guidance_scale=settings.guidance_scale, mask=mask, graphs=self.graphs(settings),
            )

    # ------------------------------------------------------------ whole edit
    def edit(
        self,
        image: Image.Image,
        points: DragPoints,
        settings: Optional[EditSettings] = None,
        mask: Optional[np.ndarray] = None,
        regions: Optional[np.ndarray] = None,
        progress_factory: Optional[Callable[[str], ProgressFn]] = None,
        lora: Optional[dict] = None,
        mask_encoder=None,
    ) -> EditResult:
        """Drag-edit ``image``.

        Args:
            image: any PIL image (any mode, any size).
            points: pairs in ``image`` pixels (their size must match the image).
            settings: :class:`EditSettings` (paper defaults).
            mask: optional bool [H, W] at image size, True = may change; an empty one counts as none
                (``EmptyMaskWarning``).
            regions: optional int [H, W] superpixel labels at image size (for the adaptive method).
            progress_factory: ``factory(stage_name) -> progress`` callback for each long stage.
            lora: identity-LoRA weights to use instead of training one.
            mask_encoder: the auto mask's encoder (a ``Sam2Encoder`` on its device, or any ``FeatureEncoder``);
                None uses the Lab-colour fallback, with its ``AutoMaskWarning``. Used when
                ``settings.use_auto_mask`` and no regions are given (the adaptive default).
        """
        settings = (settings or EditSettings()).validate()
        progress_factory = progress_factory or (lambda name: None)
        points.check_image_size(image.width, image.height)
        for name, array in (("mask", mask), ("regions", regions)):
            if array is not None and np.asarray(array).shape != (image.height, image.width):
                raise InputError(f"{name} is {np.asarray(array).shape[1]}x{np.asarray(array).shape[0]} "
                                 f"but the image is {image.width}x{image.height}")
        timings = {}
        stage = _StageRunner(progress_factory, timings)
        mask = usable_mask(mask)
        if settings.use_auto_mask and regions is None:
            with stage("auto_mask", None):
                automatic = auto_mask(image, points, mask_encoder)
            regions = automatic.regions
            mask = automatic.mask if mask is None else mask
        working = prepare_image(image, settings.work_size)
        work_w, work_h = working.size
        feature_size = feature_grid_size(work_w, work_h, settings.feature_scale)
        handles, targets = points.to_grid(*feature_size)
        latent_size = (work_w // VAE_DOWNSCALE, work_h // VAE_DOWNSCALE)
        latent_handles, latent_targets = points.to_grid(*latent_size)
        latent_mask = None if mask is None else resize_labels(mask, *latent_size)

        self._hits.clear()
        with stage("inversion", None):
            inversion = self.invert(working, settings, progress_factory, lora)
        with stage("reference", "reference branch") as progress:
            reference = self.reference(inversion, settings, progress)
        with stage("drag", f"drag ({settings.method})") as progress:
            result = self.drag(inversion, handles, targets, feature_size, settings, mask, regions, progress)
        reused = sorted(self._hits)
        with stage("sampling", "sampling" + (" + CLoss" if settings.use_closs else "")) as progress:
            latent = self.sample(inversion, result.latent, reference, settings, latent_handles, latent_targets,
                                 progress, latent_mask=latent_mask)
        with stage("decode", None):
            edited = working.restore(self.decode_latent(latent))
        final = [map_point(p, *feature_size, *image.size) for p in result.handles]
        return EditResult(edited, points, final, int(result.steps), timings, reused, inversion.lora)

    # ---------------------------------------------------------------- helpers
    def clear_cache(self) -> None:
        """Forget what is kept in memory: image latents, prompt embeddings, LoRA weights, inversions, the drag's
        starting features and reference recordings (the disk cache stays)."""
        self._memory.clear()

    @property
    def graph_failures(self) -> dict:
        """Kind of step -> why its CUDA-graph capture failed (those steps run eagerly); empty when none did."""
        return dict(self._graph_failures)

    def _cached(self, stage: str, key: str):
        value = self._memory.get((stage, key))
        if value is not None:
            self._hits.add(stage)
        return value

    def _store(self, stage: str, key: str, value):
        self._memory[(stage, key)] = value
        return value

    def _remember(self, stage: str, key: str, compute: Callable[[], object]):
        """The value kept under ``(stage, key)``, or ``compute()``'s, kept."""
        cached = self._cached(stage, key)
        return cached if cached is not None else self._store(stage, key, compute())

    def graphs(self, settings: EditSettings) -> StepGraphs:
        """The edit's :class:`~adaptivedrag_core.graphs.StepGraphs` (captures that failed before stay eager)."""
        return StepGraphs(self.device, settings.cuda_graphs, self._graph_failures)

    def _key(self, *parts) -> str:
        """A cache key from the model, its dtype and device, and ``parts`` (tensors by shape and values)."""
        digest = hashlib.sha256(json.dumps([self.model_id, str(self.dtype), self.device.type]).encode())
        for part in parts:
            if isinstance(part, torch.Tensor):
                digest.update(json.dumps(list(part.shape)).encode())
                digest.update(part.detach().float().cpu().numpy().tobytes())
            else:
                digest.update(json.dumps(part, default=str).encode())
        return digest.hexdigest()[:24]

    def _guidance(self, settings: EditSettings):
        """(unconditional embeddings, scale) for classifier-free guidance; (None, 1) when it is off."""
        if settings.guidance_scale == 1.0:
            return None, 1.0
        return self.prompt_embeddings(""), settings.guidance_scale

    def _lora(self, state):
        if state is None:
            return nullcontext()
        from .lora import identity_lora

        return identity_lora(self.components.unet, state)

    def _load_latent(self, key: str, shape):
        """The inverted latent kept on disk under ``key`` (it must have ``shape`` and finite values), or None."""
        if self.cache is None:
            return None
        latent = self.cache.load(f"inversion-{key}.safetensors", lambda path: _read_latent(path, shape))
        if latent is None:
            return None
        self._hits.add("inversion")
        return self._store("inversion", key, latent.to(self.device))

    def _save_latent(self, key: str, latent: torch.Tensor) -> None:
        if self.cache is None:
            return
        from safetensors.torch import save_file

        self.cache.save(f"inversion-{key}.safetensors",
                        lambda partial: save_file({"latent": latent.detach().cpu().contiguous()}, str(partial)))


def _read_latent(path: Path, shape) -> torch.Tensor:
    from safetensors.torch import load_file

    latent = load_file(str(path))["latent"]
    if tuple(latent.shape) != tuple(shape) or not torch.isfinite(latent).all():
        raise ValueError(f"it holds no finite latent of shape {tuple(shape)}")
    return latent


class _StageRunner:
    """Times each stage and gives it a progress callback, closed when the stage ends (even if it ends early)."""

    def __init__(self, progress_factory, timings: dict):
        self.progress_factory = progress_factory
        self.timings = timings

    @contextmanager
    def __call__(self, name: str, label: Optional[str]):
        progress = self.progress_factory(label) if label else None
        start = time.perf_counter()
        try:
            yield progress
        finally:
            self.timings[name] = round(time.perf_counter() - start, 4)
            close = getattr(progress, "close", None)
            if close is not None:
                close()


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device`` and ``dtype``.

    ``torch.nn.Module.to`` is called directly: diffusers' override logs a warning about modules "to keep in
    float32" on every cast, even for SD1.5, which has none.
    """
    torch.nn.Module.to(module, device=device, dtype=dtype)
