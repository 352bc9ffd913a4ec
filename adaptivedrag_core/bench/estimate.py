"""Peak GPU memory and compute of each stage of one edit, estimated without a GPU.

The edit's stages run on PyTorch's ``meta`` device, which computes shapes and dtypes but no values, with the
models in the dtypes :class:`~adaptivedrag_core.pipeline.DragPipeline` uses on CUDA (full-size SD1.5 built from
the bundled configs: UNet and text encoder fp16, VAE fp32). One dispatch mode (:class:`CostCounter`) watches
every operator and counts:

- the bytes of every live tensor storage, so each stage's peak is what ``torch.cuda.max_memory_allocated``
  would report for it, weights and what earlier stages keep alive included, less what a GPU adds on its own
  (the allocator's rounding, cuBLAS/cuDNN workspaces: tens of MiB);
- FLOPs, with PyTorch's formulas (matrix products, convolutions, attention; 2 FLOPs per multiply-add), per step.

The stages are the pipeline's own functions (``train_identity_lora``'s loop, ``ddim_invert``,
``record_reference``, ``sample_dragged`` with CLoss, the VAE), with two exceptions:

- the LoRA runs two steps, not all of them (from the second step on, every step holds the same tensors: AdamW's
  state exists); its weights are not copied to the CPU at the end (meta tensors hold no data to copy);
- the drag runs one optimisation step through the real feature function (features of ``up_blocks[2]`` at half
  the image size, and x_{t-1} for the mask term), keeping the starting features as ``drag()`` keeps them, with
  a plain stand-in for the motion-supervision loss: ``drag()``'s point tracking needs values.

``lora_merge`` is ``identity_lora`` merging the LoRA into the projection weights, once per edit (and per
re-drag): its peak holds the merged copies beside the originals, as every later stage does.

Per-step figures are scaled to the edit's step counts (``lora_steps``, ``drag_steps``) for the totals.

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

import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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

from ..drag.common import LatentAdam, split_features
from ..errors import InputError
from ..features import make_feature_fn
from ..inversion import ddim_invert, make_schedule, unet_noise_fn
from ..lora import (
    fit_noise,
    identity_lora,
    lora_in_training,
    lora_weights,
    training_batch,
)
from ..models import SDComponents, encode_prompt, random_sd15_components
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
        lora_steps, drag_steps: step counts the per-step figures are scaled to (80 and 80).
        lora_batch_size, lora_rank, num_steps, strength: as :class:`EditSettings` (4, 16, 50, 0.7).
        dtype: "fp16" or "bf16" for the UNet and text encoder (the VAE stays fp32).
        sam2_size: SAM2 for the ``sam2_features`` stage (tiny, small, base_plus, large), or "none" to leave it out.
    """

    size: int = 512
    method: str = "adaptive"
    mask: bool = True
    lora_gradient_checkpointing: bool = False
    lora_steps: int = 80
    drag_steps: int = 80
    lora_batch_size: int = 4
    lora_rank: int = 16
    num_steps: int = 50
    strength: float = 0.7
    dtype: str = "fp16"
    sam2_size: str = "large"

    def __post_init__(self):
        if self.sam2_size not in SAM2_SIZES:
            raise InputError(f"unknown SAM2 size {self.sam2_size!r}; choose one of {', '.join(SAM2_SIZES)}")
        check_bench_edit(self, ("lora_steps", "drag_steps", "lora_batch_size", "lora_rank", "num_steps"))
        if self.dtype not in ("fp16", "bf16"):
            raise InputError(f"dtype must be fp16 or bf16, got {self.dtype!r}")

    def edit_settings(self) -> EditSettings:
        return EditSettings(method=self.method, work_size=self.size, lora_steps=self.lora_steps,
                            lora_rank=self.lora_rank, lora_batch_size=self.lora_batch_size,
                            num_steps=self.num_steps, strength=self.strength,
                            lora_gradient_checkpointing=self.lora_gradient_checkpointing)


@dataclass
class StageEstimate:
    """One stage: its peak memory (bytes, everything alive included), its compute per step (FLOPs), the steps
    the estimate ran, and the steps the edit runs."""

    peak_bytes: int
    flop_per_step: int
    steps_run: int
    edit_steps: int

    @property
    def edit_flop(self) -> int:
        return self.flop_per_step * self.edit_steps


class StageMeter:
    """Laps a :class:`CostCounter` at each stage boundary."""

    def __init__(self, counter: CostCounter):
        self.counter = counter
        self.stages: dict[str, StageEstimate] = {}
        self._flop_mark = counter.flops

    def lap(self, name: str, steps_run: int = 1, edit_steps: Optional[int] = None) -> None:
        flops = self.counter.flops - self._flop_mark
        self.stages[name] = StageEstimate(self.counter.peak, flops // steps_run, steps_run,
                                          steps_run if edit_steps is None else edit_steps)
        self._flop_mark = self.counter.flops
        self.counter.reset_peak()


def estimate_edit(config: EstimateConfig, components: Optional[SDComponents] = None, device=META) -> dict:
    """Estimated peak GPU memory and compute of each stage of one edit (see the module docstring).

    Args:
        config: the edit to estimate.
        components: the model to estimate with (default: full-size SD1.5, built on ``device``); moved to ``device``.
        device: ``meta``; or ``cpu`` to run the same stages with real arithmetic, which gives the same counts
            (the tests check this on the tiny model) and takes far longer on a large model.

    Returns:
        A JSON-ready report: ``stages`` (stage -> peak bytes, FLOPs per step, steps), ``weights_bytes``,
        ``reference_recording_bytes``, ``peak_bytes`` / ``peak_gib`` / ``peak_stage`` (over every stage, the
        auto mask's included), ``meets_target`` (the issue's 6 GiB), and ``first_edit_tflop`` /
        ``re_drag_tflop`` at the configured step counts (the auto mask left out).
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
        recording_bytes = _edit_stages(components, config, settings, meter, device)
    stages = meter.stages
    peak_stage = max(stages, key=lambda name: stages[name].peak_bytes)
    peak = stages[peak_stage].peak_bytes
    re_drag = ("lora_merge", "drag_start", "drag", "sampling", "vae_decode")
    return {
        "estimate": f"{device.type}-device run with live-tensor bytes and FLOP counts (no GPU): see bench/estimate.py",
        "settings": {**asdict(config), "closs": settings.use_closs},
        "unet_parameters": sum(p.numel() for p in components.unet.parameters()),
        "weights_bytes": weights,
        "reference_recording_bytes": recording_bytes,
        "stages": {name: {**asdict(stage), "edit_tflop": round(stage.edit_flop / 1e12, 3)}
                   for name, stage in stages.items()},
        "peak_bytes": peak,
        "peak_gib": round(peak / GIB, 3),
        "peak_stage": peak_stage,
        "target_gib": TARGETS["peak_memory_gib"],
        "meets_target": peak <= TARGETS["peak_memory_gib"] * GIB,
        # The auto mask is its own node, before the edit: not part of the edit's compute.
        "first_edit_tflop": round(sum(stage.edit_flop for name, stage in stages.items() if name != "sam2_features")
                                  / 1e12, 3),
        "re_drag_tflop": round(sum(stages[name].edit_flop for name in re_drag) / 1e12, 3),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _sam2_features(sam2: Sam2Encoder, meter: StageMeter) -> None:
    """SAM2's image encoder on its 1024x1024 input, the weights counted while they are on the device."""
    meter.counter.track_module(sam2.model)
    sam2.embeddings(torch.zeros(1, 3, *sam2.input_size, device=next(sam2.model.parameters()).device))
    meter.lap("sam2_features")


def _edit_stages(components: SDComponents, config: EstimateConfig, settings: EditSettings, meter: StageMeter,
                 device: torch.device) -> int:
    """Run the stages in the pipeline's order, keeping alive what the pipeline keeps; returns the size of the
    reference recording."""
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
            fit_noise(components.unet, latents, context, parameters, LORA_STEPS_RUN, settings.lora_lr, settings.seed)
            lora = lora_weights(layers, device)
        del latents, context, layers, parameters
    meter.lap("lora", LORA_STEPS_RUN, settings.lora_steps)

    schedule = make_schedule(components.make_scheduler(), settings.num_steps, settings.strength)
    steps = len(schedule.timesteps)
    with identity_lora(components.unet, lora):
        meter.lap("lora_merge")  # once per edit; the merged weights stay alive through sampling
        inverted = ddim_invert(unet_noise_fn(components.unet, text_embeddings), clean, schedule)
        meter.lap("inversion", steps, steps)
        reference = record_reference(components.unet, text_embeddings, schedule, inverted,
                                     settings.reference_start_layer, settings.reference_start_step)
        meter.lap("reference", steps, steps)
        dragged = _one_drag_step(components.unet, text_embeddings, schedule, inverted, config, settings, meter)
        middle = (config.size / VAE_DOWNSCALE / 2,) * 2
        edited = sample_dragged(components.unet, text_embeddings, schedule, dragged, reference,
                                settings.reference_start_layer, settings.reference_start_step,
                                closs=settings.closs_settings(), original_latent=clean,
                                handles=[middle], targets=[(middle[0] + 1, middle[1])])
        meter.lap("sampling", steps, steps)
    components.vae.decode(edited.float() / components.latent_scale)
    meter.lap("vae_decode")
    return reference.recording.nbytes()


def _one_drag_step(unet, text_embeddings, schedule, inverted, config: EstimateConfig, settings: EditSettings,
                   meter: StageMeter) -> torch.Tensor:
    """The drag's starting features, then one optimisation step (see the module docstring)."""
    feature_size = feature_grid_size(config.size, config.size, settings.feature_scale)
    feature_fn = make_feature_fn(unet, text_embeddings, schedule, feature_size, settings.feature_block,
                                 with_prediction=config.mask)
    with torch.no_grad():  # drag() keeps the starting features (and x_{t-1}) for the whole drag
        start_features, start_prediction = split_features(feature_fn(inverted), inverted)
    meter.lap("drag_start")
    optimizer = LatentAdam(inverted, lr=0.01, compute_dtype=next(unet.parameters()).dtype)  # as drag_on_features
    with torch.enable_grad():
        features, prediction = split_features(feature_fn(optimizer.latent), optimizer.latent)
        loss = (features - start_features).abs().mean()
        if config.mask:
            loss = loss + (prediction - start_prediction).abs().sum()
        optimizer.step(loss)
        del features, prediction, loss  # as the drag loops do: the graph kept for a loss-scaling retry goes
    meter.lap("drag", 1, config.drag_steps)
    return optimizer.latent.detach()
