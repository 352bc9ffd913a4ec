"""Peak GPU memory and compute of each stage of one edit, estimated without a GPU.

The edit's stages run on PyTorch's ``meta`` device, which computes shapes and dtypes but no values, with the
models in the dtypes :class:`~adaptivedrag_core.pipeline.DragPipeline` uses on CUDA (full-size SD1.5 built from
the bundled configs: UNet and text encoder fp16, VAE fp32). One dispatch mode (:class:`CostCounter`) watches
every operator and counts:

- the bytes of every live tensor storage, so each stage's peak is what ``torch.cuda.max_memory_allocated``
  would report for it, weights and what earlier stages keep alive included, less what a GPU adds on its own
  (the allocator's rounding, cuBLAS/cuDNN workspaces: tens of MiB);
- FLOPs, with PyTorch's formulas (matrix products, convolutions, attention; 2 FLOPs per multiply-add), per step;
- kernel launches: the operators that run a kernel (:func:`launches_kernel`: all but views and allocations), per
  step. Eager execution of SD1.5 is bound by launching them; a CUDA graph launches a step's kernels at once.

The stages are the pipeline's own functions (the identity LoRA's capture-ready training step, ``ddim_invert``
through the capture-ready noise step, ``record_reference``, ``sample_dragged`` with CLoss, the VAE), with two
exceptions:

- the LoRA runs two steps, not all of them (from the second step on, every step holds the same tensors: AdamW's
  state exists); its weights are not copied to the CPU at the end (meta tensors hold no data to copy);
- the drag runs one optimisation step through the real feature function (features of ``up_blocks[2]`` at half
  the image size, and x_{t-1} for the mask term), keeping the starting features as ``drag()`` keeps them, with
  a plain stand-in for the motion-supervision loss (``drag()``'s point tracking needs values), then one
  evaluation that ends a drag (``drag_end``: the features alone, no autograd, the UNet stopped after the feature
  block).

``lora_merge`` is ``identity_lora`` merging the LoRA into the projection weights: its peak holds the merged copies
beside the originals, as every later stage does. The pipeline's stages each merge for themselves: four merges in a
first edit (inversion, reference, drag, sampling), two in a re-drag (``LORA_MERGES``).

Per-step figures are scaled to the edit's step counts for the totals: ``lora_steps``; the drag's budget
(``drag_steps``: the method's default, 80 for DragDiffusion and AdaptiveDrag's n, 300 for FreeDrag) and, for the
``_most`` totals, the most it can take (AdaptiveDrag's budget grows up to n_max, 300); ``drag_end`` once for the
point-tracking methods (the last tracking), and for FreeDrag once per drag of at most 5 steps (budget / 5), up to
once per step when drags end early (those early ends run with autograd and, with a mask, the whole UNet: the
``_most`` figure prices them as ``drag_end``, so it is low by that difference). A re-drag runs ``lora_merge``
(twice), ``drag``, ``drag_end``, ``sampling`` and ``vae_decode``: the rest, the drag's starting features included,
is cached.

Before the edit, ``sam2_features`` is the auto mask's SAM2 image encoder (random-init SAM2 of ``sam2_size``, float32,
on a 1024x1024 input: ``Sam2Encoder.embeddings``, the bulk of ``Sam2Encoder.features``) with the SD1.5 weights
already on the device, as in the speed benchmark; SAM2 then leaves the device (``sam2_loader.sam2_on``), so the
edit's stages are counted without it.

Attention runs as the fused (flash) kernel a CUDA GPU uses for SD1.5 in half precision: on ``meta``, PyTorch
would pick the unfused path, which keeps every attention matrix (4096 x 4096 per head at 512 px).

Nothing here depends on the device: the LoRA step runs without autocast on every device (see
``train_identity_lora``), so on CUDA it keeps the same tensors as here.
"""

from __future__ import annotations

import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop,
    sdpa_flop,
)

from ..drag.adaptive import AdaptiveOptions
from ..drag.common import LatentAdam, split_features
from ..drag.dragdiffusion import DragDiffusionOptions
from ..drag.freedrag import FreeDragOptions
from ..errors import InputError
from ..features import compact_drag_start, drag_start_from, make_feature_fn
from ..inversion import ddim_invert, make_schedule, unet_noise_fn
from ..graphs import NoiseStep, StepGraphs
from ..lora import (
    NoiseFitting,
    identity_lora,
    lora_in_training,
    lora_weights,
    training_batch,
)
from ..models import SDComponents, encode_prompt, ordinary_alias, random_sd15_components
from ..pipeline import (
    VAE_DOWNSCALE,
    EditSettings,
    feature_grid_size,
    place_module,
)
from ..sam2_loader import Sam2Encoder, random_sam2
from ..sampling import record_reference, sample_dragged
from .speed import SAM2_SIZES, TARGETS, check_bench_edit

GIB = 2**30
LORA_STEPS_RUN = 2
META = torch.device("meta")
FUSED_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# The FLOP counter knows the CUDA attention kernels, not the CPU one the estimate runs in their place.
@register_flop_formula(FUSED_ATTENTION, get_raw=True)
def _fused_attention_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop(query.shape, key.shape, value.shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
def _fused_attention_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop(grad_out.shape, query.shape, key.shape, value.shape)


# Operators that run no kernel on a GPU: views and other changes of metadata, allocations without a fill.
_NO_KERNEL = {torch.ops.aten.detach.default, torch.ops.aten.alias.default, torch.ops.aten.lift_fresh.default,
              torch.ops.aten._unsafe_view.default, torch.ops.aten.empty.memory_format,
              torch.ops.aten.empty_strided.default, torch.ops.aten.empty_like.default,
              torch.ops.aten.new_empty.default, torch.ops.aten.new_empty_strided.default,
              torch.ops.aten._local_scalar_dense.default}


def launches_kernel(func) -> bool:
    """Whether the operator ``func`` runs a kernel (about one launch each on a GPU; a few, such as group norm or a
    fused optimiser over many tensors, launch more than one)."""
    return not func.is_view and func not in _NO_KERNEL


class CostCounter(TorchDispatchMode):
    """Counts the bytes of tensor storages alive (and their peak since the last :meth:`reset_peak`), and the
    FLOPs of the operators run.

    Every tensor an operator returns while the mode is active is counted once per storage (views share theirs)
    until the storage is freed. Tensors made before the mode (weights, inputs) are counted with :meth:`track`.
    FLOPs come from PyTorch's FLOP formulas (``torch.utils.flop_counter``), without its ``FlopCounterMode``,
    whose module tracking keeps tensors alive under gradient checkpointing and would distort the byte count.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.flops = 0
        self.launches = 0
        self._storages: dict[int, weakref.ref] = {}

    def track(self, *tensors) -> None:
        """Count these tensors' storages (once each) until they are freed."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage())

    def track_module(self, module: torch.nn.Module) -> None:
        self.track(*module.parameters(), *module.buffers())

    def reset_peak(self) -> None:
        self.peak = self.live

    def _count(self, storage) -> None:
        key = id(storage)
        known = self._storages.get(key)
        if known is not None and known() is not None:
            return
        size = storage.nbytes()

        def freed(_ref, key=key, size=size):
            self.live -= size
            self._storages.pop(key, None)

        self._storages[key] = weakref.ref(storage, freed)
        self.live += size
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.track(*tree_leaves(result))
        self.launches += launches_kernel(func)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=result)
        return result


@contextmanager
def fused_attention():
    """Run ``F.scaled_dot_product_attention`` (without a mask) as the fused kernel, which keeps no attention
    matrix; PyTorch's own choice on ``meta`` would be the unfused one."""
    unfused = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **options):
        if attn_mask is not None or options:  # CLIP's causal text attention: 77 tokens, left as it is
            return unfused(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, **options)
        return FUSED_ATTENTION(query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = unfused


@dataclass
class EstimateConfig:
    """What to estimate.

    Args:
        size: image side in pixels (512).
        method: "adaptive", "freedrag" or "dragdiffusion" (CLoss sampling for adaptive).
        mask: the drag uses a mask (the mask term needs the whole UNet), as an edit with the auto mask does.
        lora_gradient_checkpointing: train the LoRA with gradient checkpointing.
        lora_steps: LoRA steps the per-step figures are scaled to (80).
        drag_steps: the drag's step budget: ``max_steps`` of DragDiffusion (80) and FreeDrag (300), AdaptiveDrag's
            n (80); None takes the method's default.
        drag_max_steps: AdaptiveDrag's n_max, the most its budget can grow to (300); None takes the default. The
            other methods' budgets do not grow.
        lora_batch_size, lora_rank, num_steps, strength: as :class:`EditSettings` (4, 16, 50, 0.7).
        dtype: "fp16" or "bf16" for the UNet and text encoder (the VAE stays fp32).
        sam2_size: SAM2 for the ``sam2_features`` stage (tiny, small, base_plus, large), or "none" to leave it out.
        node_weights: whose UNet weights the stages run on: "own" (the pipeline's, the default); "shared" (the
            ComfyUI nodes': made under inference mode, as ComfyUI makes them, and handed to the core as ordinary
            aliases of the same memory, as the bridge does); "copied" (as the bridge did before: a copy beside
            ComfyUI's, for the nodes that back-propagate; held here through every stage).
    """

    size: int = 512
    method: str = "adaptive"
    mask: bool = True
    lora_gradient_checkpointing: bool = False
    lora_steps: int = 80
    drag_steps: Optional[int] = None
    drag_max_steps: Optional[int] = None
    lora_batch_size: int = 4
    lora_rank: int = 16
    num_steps: int = 50
    strength: float = 0.7
    dtype: str = "fp16"
    sam2_size: str = "large"
    node_weights: str = "own"

    def __post_init__(self):
        if self.sam2_size not in SAM2_SIZES:
            raise InputError(f"unknown SAM2 size {self.sam2_size!r}; choose one of {', '.join(SAM2_SIZES)}")
        check_bench_edit(self, ("lora_steps", "lora_batch_size", "lora_rank", "num_steps"))
        budget, cap = default_drag_budget(self.method)
        self.drag_steps = budget if self.drag_steps is None else self.drag_steps
        self.drag_max_steps = (cap if self.method == "adaptive" else self.drag_steps) \
            if self.drag_max_steps is None else self.drag_max_steps
        check_bench_edit(self, ("drag_steps", "drag_max_steps"))
        if self.drag_max_steps < self.drag_steps:
            raise InputError(f"drag-max-steps ({self.drag_max_steps}) must be at least drag-steps ({self.drag_steps})")
        if self.method != "adaptive" and self.drag_max_steps != self.drag_steps:
            raise InputError(f"only AdaptiveDrag's budget grows: drag-max-steps is for --method adaptive")
        if self.node_weights not in NODE_WEIGHTS:
            raise InputError(f"node weights must be one of {', '.join(NODE_WEIGHTS)}, got {self.node_weights!r}")
        if self.dtype not in ("fp16", "bf16"):
            raise InputError(f"dtype must be fp16 or bf16, got {self.dtype!r}")

    def edit_settings(self) -> EditSettings:
        return EditSettings(method=self.method, work_size=self.size, lora_steps=self.lora_steps,
                            lora_rank=self.lora_rank, lora_batch_size=self.lora_batch_size,
                            num_steps=self.num_steps, strength=self.strength,
                            lora_gradient_checkpointing=self.lora_gradient_checkpointing)

    def drag_evaluations(self) -> tuple[int, int]:
        """Evaluations that end a drag without a step after them (the ``drag_end`` stage): (fewest, most).

        DragDiffusion and AdaptiveDrag evaluate once more after their last step, for the last tracking. FreeDrag
        evaluates once more after every drag of at most ``max_drag_steps`` (5) steps: at least budget / 5 times;
        at most once per step, when every drag ends early after one step.
        """
        if self.method != "freedrag":
            return 1, 1
        return math.ceil(self.drag_steps / FreeDragOptions().max_drag_steps), self.drag_steps


def default_drag_budget(method: str) -> tuple[int, int]:
    """The method's default drag budget and the most it can grow to, from its options' defaults."""
    if method == "adaptive":
        return AdaptiveOptions().n_steps, AdaptiveOptions().n_max
    steps = (FreeDragOptions if method == "freedrag" else DragDiffusionOptions)().max_steps
    return steps, steps


#: The choices of :attr:`EstimateConfig.node_weights`.
NODE_WEIGHTS = ("own", "shared", "copied")


def as_node_weights(unet: torch.nn.Module, node_weights: str) -> list:
    """Give ``unet`` its weights as the ComfyUI nodes would (see :attr:`EstimateConfig.node_weights`).

    Returns:
        ComfyUI's own weight tensors that stay alive beside the UNet's ("copied"); empty otherwise (the UNet's
        weights are ComfyUI's, or its own).
    """
    if node_weights == "own":
        return []
    with torch.inference_mode():  # as ComfyUI loads a model
        comfyui = {name: tensor.detach().clone() for name, tensor in unet.state_dict().items()}
    if node_weights == "shared":
        handed = {name: ordinary_alias(tensor) for name, tensor in comfyui.items()}
    else:
        handed = {name: tensor.clone() for name, tensor in comfyui.items()}
    unet.load_state_dict(handed, strict=True, assign=True)
    return list(comfyui.values()) if node_weights == "copied" else []


@dataclass
class StageEstimate:
    """One stage: its peak memory (bytes, everything alive included), its compute (FLOPs) and kernel-running
    operators (:func:`launches_kernel`) per step, the steps the estimate ran, and the steps the edit runs: at its
    budget, and at most (AdaptiveDrag's grown budget, FreeDrag's early-ending drags)."""

    peak_bytes: int
    flop_per_step: int
    launches_per_step: int
    steps_run: int
    edit_steps: int
    edit_steps_most: int

    @property
    def edit_flop(self) -> int:
        return self.flop_per_step * self.edit_steps

    @property
    def edit_flop_most(self) -> int:
        return self.flop_per_step * self.edit_steps_most


class StageMeter:
    """Laps a :class:`CostCounter` at each stage boundary."""

    def __init__(self, counter: CostCounter):
        self.counter = counter
        self.stages: dict[str, StageEstimate] = {}
        self._flop_mark = counter.flops
        self._launch_mark = counter.launches

    def lap(self, name: str, steps_run: int = 1, edit_steps: Optional[int] = None,
            edit_steps_most: Optional[int] = None) -> None:
        flops = self.counter.flops - self._flop_mark
        launches = self.counter.launches - self._launch_mark
        edit_steps = steps_run if edit_steps is None else edit_steps
        self.stages[name] = StageEstimate(self.counter.peak, flops // steps_run, launches // steps_run, steps_run,
                                          edit_steps, edit_steps if edit_steps_most is None else edit_steps_most)
        self._flop_mark = self.counter.flops
        self._launch_mark = self.counter.launches
        self.counter.reset_peak()


#: What a re-drag runs: the inversion, the reference and the drag's starting features come from the cache.
RE_DRAG_STAGES = ("lora_merge", "drag", "drag_end", "sampling", "vae_decode")
#: ``identity_lora`` merges per edit: each of the pipeline's stages that runs the UNet merges the LoRA for itself
#: (the inversion, the reference, the drag and the sampling; a re-drag the last two).
LORA_MERGES = {"first_edit": 4, "re_drag": 2}


def estimate_edit(config: EstimateConfig, components: Optional[SDComponents] = None, device=META) -> dict:
    """Estimated peak GPU memory and compute of each stage of one edit (see the module docstring).

    Args:
        config: the edit to estimate.
        components: the model to estimate with (default: full-size SD1.5, built on ``device``); moved to ``device``.
        device: ``meta``; or ``cpu`` to run the same stages with real arithmetic, which gives the same counts
            (the tests check this on the tiny model) and takes far longer on a large model.

    Returns:
        A JSON-ready report: ``stages`` (stage -> peak bytes, FLOPs and kernel launches per step, steps),
        ``weights_bytes``, ``reference_recording_bytes``, ``peak_bytes`` / ``peak_gib`` / ``peak_stage`` (over every
        stage, the auto mask's included), ``meets_target`` (the issue's 6 GiB), ``first_edit_tflop`` /
        ``re_drag_tflop`` and the launches of both at the drag's budget, the same ``_most`` at its largest
        (the auto mask left out), and ``unet_forward_launches``: one UNet forward pass plain, with the identity
        LoRA merged (as every pass but the LoRA's training runs), and with peft's unmerged layers (as it trains).
    """
    started = time.perf_counter()
    device = torch.device(device)
    components = components or random_sd15_components(device=device)
    dtype = torch.float16 if config.dtype == "fp16" else torch.bfloat16
    for module, module_dtype in ((components.unet, dtype), (components.text_encoder, dtype),
                                 (components.vae, torch.float32)):
        place_module(module, device, module_dtype)
    settings = config.edit_settings()
    counter = CostCounter()
    comfyui_weights = as_node_weights(components.unet, config.node_weights)
    counter.track(*comfyui_weights)
    for module in (components.unet, components.text_encoder, components.vae):
        counter.track_module(module)
    weights = counter.live
    meter = StageMeter(counter)
    sam2 = None if config.sam2_size == "none" else random_sam2(config.sam2_size)
    if sam2 is not None:
        sam2.model.to(device)
    with fused_attention(), counter:
        if sam2 is not None:
            _sam2_features(sam2, meter)
            del sam2
        recording_bytes, lora = _edit_stages(components, config, settings, meter, device)
    with fused_attention():
        forward_launches = unet_forward_launches(components, config, settings, lora, device)
    stages = meter.stages
    peak_stage = max(stages, key=lambda name: stages[name].peak_bytes)
    peak = stages[peak_stage].peak_bytes
    edit = [stage for name, stage in stages.items() if name != "sam2_features"]  # its own node, before the edit
    re_drag = [replace(stages[name], edit_steps=LORA_MERGES["re_drag"], edit_steps_most=LORA_MERGES["re_drag"])
               if name == "lora_merge" else stages[name] for name in RE_DRAG_STAGES]
    return {
        "estimate": f"{device.type}-device run with live-tensor bytes and FLOP counts (no GPU): see bench/estimate.py",
        "settings": {**asdict(config), "closs": settings.use_closs},
        "unet_parameters": sum(p.numel() for p in components.unet.parameters()),
        "weights_bytes": weights,
        "reference_recording_bytes": recording_bytes,
        "stages": {name: {**asdict(stage), "edit_tflop": round(stage.edit_flop / 1e12, 3),
                          "edit_tflop_most": round(stage.edit_flop_most / 1e12, 3)}
                   for name, stage in stages.items()},
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 3),
        "peak_stage": peak_stage,
        "target_gib": TARGETS["peak_memory_gib"],
        "meets_target": peak <= TARGETS["peak_memory_gib"] * GIB,
        "first_edit_tflop": _tflop(stage.edit_flop for stage in edit),
        "first_edit_tflop_most": _tflop(stage.edit_flop_most for stage in edit),
        "re_drag_tflop": _tflop(stage.edit_flop for stage in re_drag),
        "re_drag_tflop_most": _tflop(stage.edit_flop_most for stage in re_drag),
        "first_edit_launches": sum(stage.launches_per_step * stage.edit_steps for stage in edit),
        "first_edit_launches_most": sum(stage.launches_per_step * stage.edit_steps_most for stage in edit),
        "re_drag_launches": sum(stage.launches_per_step * stage.edit_steps for stage in re_drag),
        "re_drag_launches_most": sum(stage.launches_per_step * stage.edit_steps_most for stage in re_drag),
        "unet_forward_launches": forward_launches,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _tflop(flops) -> float:
    return round(sum(flops) / 1e12, 3)


def _sam2_features(sam2: Sam2Encoder, meter: StageMeter) -> None:
    """SAM2's image encoder on its 1024x1024 input, the weights counted while they are on the device."""
    meter.counter.track_module(sam2.model)
    sam2.embeddings(torch.zeros(1, 3, *sam2.input_size, device=next(sam2.model.parameters()).device))
    meter.lap("sam2_features")


def _edit_stages(components: SDComponents, config: EstimateConfig, settings: EditSettings, meter: StageMeter,
                 device: torch.device) -> tuple[int, dict]:
    """Run the stages in the pipeline's order, keeping alive what the pipeline keeps; returns the size of the
    reference recording and the LoRA."""
    meter.counter.reset_peak()
    pixels = torch.zeros(1, 3, config.size, config.size, device=device)
    clean = components.vae.encode(pixels).latent_dist.mean * components.latent_scale
    del pixels
    text_embeddings = encode_prompt(components, "", device=device).to(next(components.unet.parameters()).dtype)
    meter.lap("prepare")

    with torch.enable_grad():
        latents, context = training_batch(components.unet, clean, text_embeddings, settings.lora_batch_size)
        with lora_in_training(components.unet, settings.lora_rank, settings.seed,
                              settings.lora_gradient_checkpointing) as (layers, parameters):
            # The noise of every step is drawn up front, as the pipeline does; two steps run.
            fitting = NoiseFitting(components.unet, latents, context, parameters, settings.lora_steps,
                                   settings.lora_lr, settings.seed)
            for index in range(LORA_STEPS_RUN):
                fitting.load(index)
                fitting.step()
            lora = lora_weights(layers, device)
        del latents, context, layers, parameters, fitting
    meter.lap("lora", LORA_STEPS_RUN, settings.lora_steps)

    schedule = make_schedule(components.make_scheduler(), settings.num_steps, settings.strength)
    steps = len(schedule.timesteps)
    graphs = StepGraphs(device)  # the steps as the pipeline runs them; nothing is captured off CUDA
    with identity_lora(components.unet, lora):
        # The estimate merges once and keeps the merged weights alive through sampling; the pipeline's stages each
        # merge for themselves, which the totals count.
        meter.lap("lora_merge", 1, LORA_MERGES["first_edit"])
        inverted = ddim_invert(NoiseStep(unet_noise_fn(components.unet, text_embeddings), graphs, "inversion"),
                               clean, schedule)
        meter.lap("inversion", steps, steps)
        reference = record_reference(components.unet, text_embeddings, schedule, inverted,
                                     settings.reference_start_layer, settings.reference_start_step)
        meter.lap("reference", steps, steps)
        dragged = _drag_stages(components.unet, text_embeddings, schedule, inverted, config, settings, meter)
        middle = (config.size / VAE_DOWNSCALE / 2,) * 2
        edited = sample_dragged(components.unet, text_embeddings, schedule, dragged, reference,
                                settings.reference_start_layer, settings.reference_start_step,
                                closs=settings.closs_settings(), original_latent=clean,
                                handles=[middle], targets=[(middle[0] + 1, middle[1])], graphs=graphs)
        meter.lap("sampling", steps, steps)
    components.vae.decode(edited.float() / components.latent_scale)
    meter.lap("vae_decode")
    return reference.recording.nbytes(), lora


def _drag_stages(unet, text_embeddings, schedule, inverted, config: EstimateConfig, settings: EditSettings,
                 meter: StageMeter) -> torch.Tensor:
    """The drag's starting features, one optimisation step, and one evaluation that ends a drag (see the module
    docstring)."""
    feature_size = feature_grid_size(config.size, config.size, settings.feature_scale)
    feature_fn = make_feature_fn(unet, text_embeddings, schedule, feature_size, settings.feature_block,
                                 with_prediction=config.mask)
    compact = compact_drag_start(feature_fn, inverted)  # the pipeline keeps it, for re-drags
    start = drag_start_from(feature_fn, compact, inverted)  # drag() keeps the resized features and x_{t-1}
    meter.lap("drag_start")
    optimizer = LatentAdam(inverted, lr=0.01, compute_dtype=next(unet.parameters()).dtype)  # as drag_on_features
    with torch.enable_grad():
        features, prediction = split_features(feature_fn(optimizer.latent), optimizer.latent)
        loss = (features - start.features).abs().mean()
        if config.mask:
            loss = loss + (prediction - start.prediction).abs().sum()
        optimizer.step(loss)
        del features, prediction, loss  # as the drag loops do: the graph kept for a loss-scaling retry goes
    meter.lap("drag", 1, config.drag_steps, config.drag_max_steps)
    with torch.no_grad():
        feature_fn.features_only(optimizer.latent)
    fewest, most = config.drag_evaluations()
    meter.lap("drag_end", 1, fewest, most)
    return optimizer.latent.detach()


def unet_forward_launches(components: SDComponents, config: EstimateConfig, settings: EditSettings, lora: dict,
                          device: torch.device) -> dict:
    """Kernel-running operators of one UNet forward pass (batch 1, no gradient): plain, with the identity LoRA
    merged into the weights (:func:`identity_lora`), and with peft's unmerged LoRA layers (as while training)."""
    unet = components.unet
    dtype = next(unet.parameters()).dtype
    latent = torch.zeros(1, 4, config.size // VAE_DOWNSCALE, config.size // VAE_DOWNSCALE, device=device, dtype=dtype)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timestep = torch.zeros(1, dtype=torch.int64, device=device)

    def count() -> int:
        with torch.no_grad(), CostCounter() as counter:
            unet(latent, timestep, encoder_hidden_states=context)
        return counter.launches

    plain = count()
    with identity_lora(unet, lora):
        merged = count()
    with torch.inference_mode(False), lora_in_training(unet, settings.lora_rank, settings.seed):
        unmerged = count()
    return {"plain": plain, "merged_identity_lora": merged, "unmerged_peft_lora": unmerged}
