"""Identity LoRA (DragDiffusion): a LoRA on the UNet's attention projections, fine-tuned on the one image being
edited so that inversion and sampling reproduce it faithfully.

The LoRA layers are peft's. Its weights travel as a plain state dict with peft's key names,
``"<module path>.lora_A.weight"`` [rank, in] and ``"<module path>.lora_B.weight"`` [out, rank], applied with
scale 1 (lora_alpha = rank). The UNet itself is never left modified: training puts peft's layers in place of the
attention projections and puts the original modules back afterwards (each layer's down projection is a
:class:`Float32Down`, which keeps less for the backward pass than peft's own); ``identity_lora`` merges W + BA
into the projection weights and puts the original weight tensors back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .errors import InputError
from .graphs import ReplayedStep
from .models import SD15_SCHEDULER_CONFIG
from .outputs import atomic_write
from .progress import ProgressFn, report

# DragDiffusion puts the LoRA on every attention projection of the UNet (self- and cross-attention).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_NAME = "identity"
LORA_FORMAT = "adaptivedrag-identity-lora"


def train_identity_lora(
    unet: torch.nn.Module,
    latent: torch.Tensor,
    text_embeddings: torch.Tensor,
    steps: int = 80,
    rank: int = 16,
    lr: float = 5e-4,
    batch_size: int = 4,
    seed: int = 0,
    progress: ProgressFn = None,
    gradient_checkpointing: bool = False,
    graphs=None,
) -> dict[str, torch.Tensor]:
    """Fine-tune an identity LoRA on one image with the ordinary noise-prediction (epsilon) loss.

    Each step noises the image latent at ``batch_size`` random timesteps of SD1.5's DDPM schedule and fits the
    noise with AdamW. The UNet runs in its own dtype, as in every other stage, with no autocast; the LoRA weights,
    the LoRA branch of each projection and the optimiser stay float32 (as DragDiffusion's public code trains), and
    an fp16 UNet on CUDA trains with loss scaling. Without autocast, norms and activations stay in the UNet's dtype,
    which keeps the step's memory down (``bench estimate``). Works inside ``torch.inference_mode()``. The UNet is
    returned unchanged, with no adapter on it.

    Args:
        unet: the diffusers UNet; its weights must not be inference tensors (they need to take part in autograd).
        latent: the *scaled* VAE latent of the image, [1, 4, h, w].
        text_embeddings: the prompt's embeddings, [1, 77, D].
        steps, rank, lr, batch_size: DragDiffusion's defaults (80, 16, 5e-4, 4).
        seed: seeds the LoRA initialisation, timesteps and noise (deterministic on CPU).
        progress: ``progress(step, total)``, called after every step.
        gradient_checkpointing: recompute each UNet block's activations in the backward pass instead of keeping
            them: the same weights (the forward arithmetic done again), half the memory at 512 px, a third more
            computation per step (``bench estimate``).
        graphs: a :class:`~adaptivedrag_core.graphs.StepGraphs`: with CUDA graphs enabled, the training step is
            replayed from one (not with gradient checkpointing, whose recomputation saves and restores the random
            number generators' state, which a capture cannot).

    Returns:
        The LoRA weights (float32, on the CPU), for ``identity_lora`` and ``save_lora``.
    """
    _check_training_inputs(unet, latent, text_embeddings, steps, rank, batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        latents, context = training_batch(unet, latent, text_embeddings, batch_size)
        with lora_in_training(unet, rank, seed, gradient_checkpointing) as (layers, parameters):
            fit_noise(unet, latents, context, parameters, steps, lr, seed, progress,
                      None if gradient_checkpointing else graphs)
            return lora_weights(layers)


def training_batch(unet, latent: torch.Tensor, text_embeddings: torch.Tensor, batch_size: int):
    """The clean latents (float32) and the conditioning (the UNet's dtype), repeated ``batch_size`` times."""
    device, dtype = _parameter(unet).device, _parameter(unet).dtype
    latents = latent.detach().clone().to(device=device, dtype=torch.float32).expand(batch_size, -1, -1, -1)
    context = text_embeddings.detach().clone().to(device=device, dtype=dtype).expand(batch_size, -1, -1)
    return latents, context


@contextmanager
def lora_in_training(unet: torch.nn.Module, rank: int, seed: int, gradient_checkpointing: bool = False):
    """Put trainable float32 LoRA layers on ``unet`` for the ``with`` block; yields (layers, parameters).

    The original modules, and the UNet's gradient-checkpointing setting, are put back on exit. Use it outside
    inference mode.
    """
    layers = _inject_lora_layers(unet, TARGET_MODULES, rank, seed)
    was_checkpointing = unet.is_gradient_checkpointing
    try:
        for layer in layers.values():  # float32 LoRA weights even on a half-precision UNet
            layer.lora_A.float()
            layer.lora_B.float()
            # peft would cast each projection's input to float32 and keep that copy for the backward pass;
            # the down projection casts it itself and keeps the input as it came.
            layer.lora_A[ADAPTER_NAME] = Float32Down(layer.lora_A[ADAPTER_NAME])
            layer.cast_input_dtype_enabled = False
        parameters = [p for layer in layers.values() for p in _lora_parameters(layer)]
        for parameter in parameters:
            parameter.requires_grad_(True)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # diffusers' default: non-reentrant torch.utils.checkpoint
        yield layers, parameters
    finally:
        if gradient_checkpointing and not was_checkpointing:
            unet.disable_gradient_checkpointing()
        _put_modules(unet, {path: layer.base_layer for path, layer in layers.items()})


class _Float32Product(torch.autograd.Function):
    """``F.linear(x.float(), weight)`` for a float32 ``weight``, keeping ``x`` itself for the backward pass.

    Autograd would keep the float32 copy of ``x``: twice the bytes of an fp16 ``x``, once per projection, although
    the query, key and value projections share one input. The arithmetic is the same: the backward pass casts
    ``x`` again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight


class Float32Down(torch.nn.Module):
    """A LoRA down projection (peft's ``lora_A``, no bias) computed in its weights' float32 from an input of any
    dtype, keeping only the input for the backward pass (:class:`_Float32Product`)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Float32Product.apply(x, self.weight)


def _check_training_inputs(unet, latent, text_embeddings, steps, rank, batch_size) -> None:
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise ValueError(f"latent must be [1, C, h, w], got {tuple(latent.shape)}")
    if text_embeddings.ndim != 3 or text_embeddings.shape[0] != 1:
        raise ValueError(f"text_embeddings must be [1, tokens, D], got {tuple(text_embeddings.shape)}")
    if steps < 1 or rank < 1 or batch_size < 1:
        raise InputError(f"LoRA steps, rank and batch size must be >= 1 (got {steps}, {rank}, {batch_size})")
    if any(parameter.is_inference() for parameter in unet.parameters()):
        raise RuntimeError(
            "the UNet's weights are inference tensors (created under torch.inference_mode()), so no gradient can "
            "flow through them; load or clone the weights outside inference mode"
        )


def fit_noise(unet, latents, context, parameters, steps, lr, seed, progress=None, graphs=None) -> None:
    """The training loop: epsilon-prediction loss at random timesteps, AdamW on ``parameters``.

    Args:
        graphs: a :class:`~adaptivedrag_core.graphs.StepGraphs`: replay the step from a CUDA graph when it is
            enabled; None runs every step eagerly.
    """
    on_cuda = latents.device.type == "cuda"
    # fp16 gradients underflow without loss scaling; bf16 and float32 ones do not.
    fitting = NoiseFitting(unet, latents, context, parameters, steps, lr, seed, fused_optimiser=on_cuda,
                           loss_scaling=on_cuda and _parameter(unet).dtype == torch.float16)
    step = fitting.step
    if graphs is not None:
        step = ReplayedStep(fitting.step, graphs, "identity LoRA", on_failure=fitting.reset_scaler)
    for index in range(steps):
        fitting.load(index)
        step()
        report(progress, index + 1, steps)


class NoiseFitting:
    """The identity LoRA's training step, capture-ready: what varies from step to step sits in fixed tensors.

    The noise and timesteps of every step are drawn up front, on the CPU with the seeded generator and in the
    order the steps use them (so they are the values a step-by-step loop would draw), and copied to the device
    once; :meth:`load` copies one step's into the step's buffers. :meth:`step` then reads no value back to the host:
    the timesteps reach the UNet as a device tensor; with ``fused_optimiser`` (CUDA) AdamW keeps its step count on
    the device, and loss scaling hands it the scale and the overflow flag as tensors.

    Args:
        unet, latents, context, parameters: as :func:`fit_noise` (latents float32 [B, 4, h, w]).
        steps, lr, seed: steps to draw noise for, AdamW's learning rate, the seed.
        fused_optimiser: fused, capturable AdamW (CUDA); else PyTorch's default AdamW for the device.
        loss_scaling: dynamic loss scaling (an fp16 UNet).
    """

    def __init__(self, unet, latents, context, parameters, steps: int, lr: float, seed: int,
                 fused_optimiser: bool = False, loss_scaling: bool = False):
        from diffusers import DDPMScheduler

        schedule_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
        self.noise_schedule = DDPMScheduler(**{key: SD15_SCHEDULER_CONFIG[key] for key in schedule_keys})
        self.unet, self.latents, self.context = unet, latents, context
        device = latents.device
        generator = torch.Generator(device="cpu").manual_seed(seed)
        noises, timesteps = [], []
        for _ in range(steps):
            noises.append(torch.randn(latents.shape, generator=generator))
            timesteps.append(torch.randint(0, self.noise_schedule.config.num_train_timesteps, (latents.shape[0],),
                                           generator=generator))
        self.noises, self.timesteps = torch.stack(noises).to(device), torch.stack(timesteps).to(device)
        self.noise, self.timestep = torch.empty_like(self.noises[0]), torch.empty_like(self.timesteps[0])
        # On the device before the first step: add_noise would copy them there inside it.
        self.noise_schedule.alphas_cumprod = self.noise_schedule.alphas_cumprod.to(device)
        fused = {"fused": True, "capturable": True} if fused_optimiser else {}
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, **fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=loss_scaling)

    def load(self, index: int) -> None:
        """Put step ``index``'s noise and timesteps in the step's buffers."""
        self.noise.copy_(self.noises[index])
        self.timestep.copy_(self.timesteps[index])

    def step(self) -> None:
        """One AdamW step on the noise-prediction loss of the loaded noise and timesteps."""
        noisy = self.noise_schedule.add_noise(self.latents, self.noise, self.timestep)
        prediction = self.unet(noisy.to(self.context.dtype), self.timestep, encoder_hidden_states=self.context).sample
        loss = F.mse_loss(prediction.float(), self.noise)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def reset_scaler(self) -> None:
        """A fresh loss scaler with this one's scale: an aborted capture leaves the old one mid-step."""
        fresh = torch.amp.GradScaler(self.latents.device.type, enabled=self.scaler.is_enabled())
        if self.scaler.is_enabled():
            fresh.load_state_dict(self.scaler.state_dict())
        self.scaler = fresh


@contextmanager
def identity_lora(unet: torch.nn.Module, lora_state: dict[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """Run ``unet`` with the LoRA ``lora_state`` merged into its projection weights for the ``with`` block.

    Every pass that does not train the LoRA (inversion, reference, drag, sampling) runs through here: each
    projection ``W`` becomes ``W + B A`` (computed in float32, stored in ``W``'s dtype), so a forward pass costs
    what the plain UNet's does, with none of the extra kernels of unmerged LoRA layers. The original weight
    tensors are put back on exit (also on an exception), untouched, so the UNet is bitwise as before; the merged
    copies exist only inside the block. Outputs match the unmerged layers to float rounding (float32: about
    1e-6 relative; fp16: the merged weight is rounded once to fp16, where the unmerged layer rounds the LoRA
    branch's output). Gradients flow to the UNet's inputs (the drag optimises the latent), not into the weights.

    Args:
        unet: the diffusers UNet the LoRA was trained on.
        lora_state: LoRA weights from ``train_identity_lora`` or ``load_lora`` (read, never modified).

    Yields:
        The same ``unet``.
    """
    pairs = _lora_pairs(lora_state)
    modules = dict(unet.named_modules())
    _check_lora_fits(pairs, modules)
    originals = {}
    try:
        # Outside inference mode, so autograd can pass through the merged weights; no graph into the LoRA.
        with torch.inference_mode(False), torch.no_grad():
            for path, (down, up) in pairs.items():
                module = modules[path]
                weight = module.weight
                delta = up.to(weight.device, torch.float32) @ down.to(weight.device, torch.float32)
                originals[path] = weight
                module._parameters["weight"] = torch.nn.Parameter((weight.float() + delta).to(weight.dtype),
                                                                  requires_grad=False)
        yield unet
    finally:
        for path, weight in originals.items():
            modules[path]._parameters["weight"] = weight


def _check_lora_fits(pairs: dict, modules: dict) -> None:
    for path, (down, up) in pairs.items():
        module = modules.get(path)
        if not isinstance(module, torch.nn.Linear):
            raise InputError(f"the LoRA does not fit this UNet: it has no linear layer '{path}'")
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
            raise InputError(
                f"the LoRA does not fit this UNet: '{path}' is {module.in_features}->{module.out_features}, "
                f"the LoRA has {down.shape[1]}->{up.shape[0]}"
            )


def _inject_lora_layers(unet: torch.nn.Module, targets: tuple, rank: int, seed: int) -> dict:
    """Put peft LoRA layers (rank ``rank``, scale 1, B = 0) on the modules named or suffixed by ``targets``.

    Returns module path -> LoRA layer. Only the module tree changes: peft's other marks on the UNet (its
    ``peft_config`` attribute, frozen ``requires_grad`` flags) are undone here.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in unet.modules()):
        raise RuntimeError("the UNet already carries peft adapter layers (is a LoRA training already running on it?)")
    attributes = set(vars(unet))
    # By identity: peft renames the wrapped weights ("to_q.weight" -> "to_q.base_layer.weight").
    requires_grad = [(parameter, parameter.requires_grad) for parameter in unet.parameters()]
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets))
    # Outside inference mode so the layers can take part in autograd; on a forked RNG so peft's random
    # initialisation is seeded and leaves the caller's global RNG untouched.
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    for name in set(vars(unet)) - attributes:
        delattr(unet, name)
    for parameter, flag in requires_grad:
        parameter.requires_grad_(flag)
    return {path: module for path, module in unet.named_modules() if isinstance(module, BaseTunerLayer)}


def _lora_parameters(layer) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight


def lora_weights(layers: dict, device="cpu") -> dict[str, torch.Tensor]:
    """float32 copies of the LoRA layers' weights on ``device``, under the state dict's key names."""
    state = {}
    for path, layer in layers.items():
        down, up = _lora_parameters(layer)
        state[f"{path}.lora_A.weight"] = down.detach().to(device, torch.float32, copy=True)
        state[f"{path}.lora_B.weight"] = up.detach().to(device, torch.float32, copy=True)
    return state


def _put_modules(unet: torch.nn.Module, modules: dict) -> None:
    """Set each module path of ``unet`` (e.g. "up_blocks.1.attentions.0....to_out.0") to the given module."""
    for path, module in modules.items():
        parent_path, _, name = path.rpartition(".")
        parent = unet.get_submodule(parent_path) if parent_path else unet
        setattr(parent, name, module)


def _parameter(module: torch.nn.Module) -> torch.nn.Parameter:
    return next(module.parameters())


def _lora_pairs(state: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (lora_A weight [rank, in], lora_B weight [out, rank]); InputError if malformed."""
    paths = sorted({key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})
    if not paths or len(state) != 2 * len(paths):
        raise InputError("not a LoRA state: expected pairs of '<module>.lora_A.weight' and '<module>.lora_B.weight'")
    pairs = {}
    for path in paths:
        down, up = state.get(f"{path}.lora_A.weight"), state.get(f"{path}.lora_B.weight")
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise InputError(f"not a LoRA state: bad or missing lora_A/lora_B weights for '{path}'")
        pairs[path] = (down, up)
    if len({down.shape[0] for down, _ in pairs.values()}) != 1:
        raise InputError("not a LoRA state: its layers have different ranks")
    return pairs


def save_lora(
    state: dict[str, torch.Tensor],
    path,
    metadata: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Write LoRA weights to a ``.safetensors`` file.

    Args:
        state: LoRA weights (as from ``train_identity_lora``).
        path: the file to write; its folder is created if needed.
        metadata: extra string metadata stored in the file (e.g. the settings it was trained with).
        overwrite: replace an existing file; without it an existing file raises InputError.

    Returns:
        The path written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"LoRA file already exists: {path} (pass overwrite=True to replace it)")
    _lora_pairs(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target, then renamed: an interrupted save never leaves a truncated LoRA behind.
    return atomic_write(path, lambda partial: write_lora(state, partial, metadata))


def write_lora(state: dict[str, torch.Tensor], path, metadata: Optional[dict] = None) -> None:
    """Write LoRA weights to ``path`` as it is (no checks, not atomic: :func:`save_lora` and the disk cache wrap it).

    Args:
        state: LoRA weights.
        path: the file to write.
        metadata: extra string metadata stored in the file.
    """
    from safetensors.torch import save_file

    rank = next(iter(_lora_pairs(state).values()))[0].shape[0]
    header = {str(key): str(value) for key, value in (metadata or {}).items()}
    header.update({"format": LORA_FORMAT, "rank": str(rank)})
    save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, str(path), header)


def load_lora(path) -> dict[str, torch.Tensor]:
    """Read LoRA weights written by ``save_lora``; InputError if the file is missing, not a LoRA, or holds weights
    that are not finite (they would turn every edit black)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise InputError(f"cannot read LoRA file {path}: not a valid .safetensors file ({error})") from error
    try:
        _lora_pairs(state)
    except InputError as error:
        raise InputError(f"{path} is {error}") from error
    broken = next((key for key, value in state.items() if not torch.isfinite(value).all()), None)
    if broken is not None:
        raise InputError(f"cannot use LoRA file {path}: its weight '{broken}' holds NaN or infinite values")
    return state
