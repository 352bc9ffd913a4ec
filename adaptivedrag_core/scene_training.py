"""Training the scene model (:mod:`scene_model`) from procedural scenes, resumable, with fixed seeds.

``python -m adaptivedrag_core train-scenes --out DIR`` runs five stages, each with a progress bar, and keeps its
state in ``DIR`` so that an interrupted run carries on where it stopped:

1. **scenes**: render the training scenes and their captions once, a process per core the run may use
   (``scenes.npy``, ``captions.json``);
2. **VAE**: train the autoencoder on random crops, decoding the posterior mean (reconstruction MSE + 0.1 L1 + a
   tiny KL term); small batches, since on a CPU more steps of 4 crops beat fewer of 16 for the same time;
   checkpoint ``vae.pt``;
3. **latents**: encode every scene once (the posterior mean, as the edit does) and set the latent scale so the
   latents have unit variance, as 0.18215 does for SD1.5; ``latents.pt``;
4. **decoder**: refine the VAE's decoder on whole scenes, decoding those latents with plain MSE (what PSNR
   measures) in bfloat16 autocast, and export the moving average of its weights; the encoder is left as it is,
   so the latents the UNet learns stay the ones the edit encodes. Whole scenes, not crops: a decoder trained on
   8x8-latent crops spends much of itself on their borders, and for the same time whole scenes raise the
   held-out PSNR about four times as fast as crops; checkpoint ``decoder.pt``;
5. **UNet**: epsilon prediction on SD1.5's noise schedule, with min-SNR-5 loss weights, captions dropped half of
   the time (so the empty prompt, the edit's default, is a strong condition), and an exponential moving average
   of the weights, which is what is exported; checkpoint ``unet.pt``.

The model is then written to ``DIR/model`` as a diffusers folder (the layout of ``adaptivedrag_core/scene_model``).
Every random draw of a step comes from a generator seeded by (seed, stage, step), so a resumed run computes the
same steps as an uninterrupted one. Checkpoints are written to a temporary file and renamed, so a run killed
while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .models import SD15_SCHEDULER_CONFIG, SDComponents
from .progress import TqdmProgress
from .scene_model import SceneModelSpec, build_scene_components, save_scene_model, spec_info
from .scenes import scene_set

CHECKPOINT_FILES = {"vae": "vae.pt", "decoder": "decoder.pt", "unet": "unet.pt"}
_STAGE_SEEDS = {"vae": 1, "unet": 2, "decoder": 3}
# for the log: a stage and what it batches
_STAGE_WORDS = {"vae": ("VAE", "crops"), "decoder": ("decoder", "scenes"), "unet": ("UNet", "latents")}


@dataclass(frozen=True)
class TrainingPlan:
    """Everything that decides the trained weights. The defaults made the shipped model.

    Args:
        spec: the architecture.
        seed: seeds the scenes, the initial weights and every step.
        scenes: training scenes rendered (the held-out scenes of the benchmarks use other seeds).
        vae_steps, vae_batch, vae_crop, vae_lr: VAE training (crops of ``vae_crop`` pixels).
        decoder_steps, decoder_batch, decoder_lr: the decoder's refinement on whole scenes.
        decoder_ema_decay: the moving average of the decoder's weights that is exported.
        decoder_bfloat16: decode in bfloat16 autocast while refining (weights, loss and optimiser in float32); on
            CPUs with bfloat16 instructions a step takes about two thirds of the time.
        unet_steps, unet_batch, unet_lr: UNet training.
        caption_dropout: probability of training on the empty prompt instead of the scene's caption.
        ema_decay: the moving average of the UNet's weights that is exported.
        min_snr_gamma: min-SNR loss weighting (Hang et al. 2023), which speeds up convergence.
        warmup_steps: linear learning-rate warm-up of both stages; then a cosine decay to 10%.
        checkpoint_every: steps between checkpoints.
    """

    spec: SceneModelSpec = field(default_factory=SceneModelSpec)
    seed: int = 0
    scenes: int = 16000
    vae_steps: int = 8000
    vae_batch: int = 4
    vae_crop: int = 64
    vae_lr: float = 1e-3
    decoder_steps: int = 1750
    decoder_batch: int = 4
    decoder_lr: float = 6e-4
    decoder_ema_decay: float = 0.995
    decoder_bfloat16: bool = True
    unet_steps: int = 2800
    unet_batch: int = 32
    unet_lr: float = 5e-4
    caption_dropout: float = 0.5
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    warmup_steps: int = 100
    checkpoint_every: int = 100

    def info(self) -> dict:
        plan = asdict(self)
        plan["spec"] = spec_info(self.spec)
        return plan


ProgressFactory = Callable[[str], Callable[[int, int], None]]


def train_scene_model(out_dir, plan: TrainingPlan = TrainingPlan(), device="cpu",
                      progress_factory: ProgressFactory = TqdmProgress,
                      log: Callable[[str], None] = print) -> Path:
    """Run (or resume) every stage and export the model; returns the model folder ``out_dir/model``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_plan(out_dir, plan)
    device = torch.device(device)
    components = build_scene_components(plan.spec, seed=plan.seed)
    images, captions = scene_dataset(out_dir, plan, progress_factory("scenes"))
    vae_seconds = train_vae(components.vae, images, out_dir, plan, device, progress_factory("VAE"), log)
    latents, scale = encode_dataset(components.vae, images, out_dir, device, progress_factory("latents"))
    components.latent_scale = scale
    decoder_seconds = train_decoder(components.vae, latents, images, out_dir, plan, device, progress_factory("decoder"),
                                    log)
    token_ids = _tokenize(components.tokenizer, captions, plan.spec.text_length)
    unet_seconds = train_unet(components, latents * scale, token_ids, out_dir, plan, device,
                              progress_factory("UNet"), log)
    folder = out_dir / "model"
    components.to(device="cpu")
    info = {"native_size": plan.spec.native_size, "latent_scale": scale, "training": plan.info(),
            "data_digest": data_digest(images),
            "training_seconds": {"vae": round(vae_seconds, 1), "decoder": round(decoder_seconds, 1),
                                 "unet": round(unet_seconds, 1)},
            "trained_on": str(device)}
    save_scene_model(components, folder, info)
    log(f"scene model written to {folder} ({weights_digest(folder)[:16]})")
    return folder


def _check_plan(out_dir: Path, plan: TrainingPlan) -> None:
    """Refuse to resume from a folder made with another plan (its checkpoints would not fit this one)."""
    plan_file = out_dir / "plan.json"
    text = json.dumps(plan.info(), sort_keys=True)
    if plan_file.is_file() and plan_file.read_text(encoding="utf-8") != text:
        from .errors import InputError

        raise InputError(f"{out_dir} holds a training run with other settings ({plan_file}); use another --out")
    plan_file.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ scenes
def scene_dataset(out_dir: Path, plan: TrainingPlan, progress=None) -> tuple[np.ndarray, list[str]]:
    """The training scenes [N, S, S, 3] uint8 and their captions, rendered once and kept in ``out_dir``."""
    images_file, captions_file = out_dir / "scenes.npy", out_dir / "captions.json"
    if images_file.is_file() and captions_file.is_file():
        return np.load(images_file), json.loads(captions_file.read_text(encoding="utf-8"))
    images, captions = scene_set(plan.seed, plan.scenes, plan.spec.native_size, workers=len(os.sched_getaffinity(0)),
                                 progress=progress)
    _atomic(images_file, lambda path: np.save(path, images))
    _atomic(captions_file, lambda path: Path(path).write_text(json.dumps(captions), encoding="utf-8"))
    return images, captions


def data_digest(images: np.ndarray, count: int = 16) -> str:
    """sha256 of the first ``count`` training scenes: recorded with the model, so a change to the scene
    generator that would make ``train-scenes`` train on other pictures is caught (``tests/test_scene_model.py``)."""
    return hashlib.sha256(np.ascontiguousarray(images[:count]).tobytes()).hexdigest()


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------- VAE
def train_vae(vae, images: np.ndarray, out_dir: Path, plan: TrainingPlan, device, progress=None,
              log: Callable[[str], None] = print) -> float:
    """Train (or resume, or skip when done) the VAE in place; returns the seconds spent in total."""
    optimiser = _trainable(vae, "vae", plan, device)
    seconds = _run_stage("vae", vae, optimiser, out_dir, plan,
                         lambda step: _vae_step(vae, optimiser, _draw_vae_batch(plan, step, images), device),
                         progress, log)
    vae.eval().requires_grad_(False)
    return seconds


def _draw_vae_batch(plan: TrainingPlan, step: int, images: np.ndarray) -> torch.Tensor:
    """Step ``step``'s crops [B, 3, C, C] in [-1, 1], from the step's own generator."""
    generator = _step_generator(plan.seed, "vae", step)
    index = torch.randint(0, len(images), (plan.vae_batch,), generator=generator).numpy()
    size, crop = plan.spec.native_size, plan.vae_crop
    # Crops start on the 8-pixel latent grid, so the encoder sees cells as it will on whole images.
    left, top = (torch.randint(0, (size - crop) // 8 + 1, (2,), generator=generator) * 8).tolist()
    batch = _to_pixels(images[np.sort(index), top:top + crop, left:left + crop])
    flip = torch.rand(plan.vae_batch, generator=generator) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def _vae_step(vae, optimiser, batch: torch.Tensor, device) -> None:
    """One optimiser step of reconstruction (MSE + 0.1 L1, a whisper of KL) on a drawn batch."""
    batch = batch.to(device)
    posterior = vae.encode(batch).latent_dist
    # Decoded from the mean, as the edit encodes: sampling the posterior (log-variance 0 at the start) would
    # bury the code in noise for most of a short training.
    reconstruction = vae.decode(posterior.mean).sample
    error = reconstruction - batch
    loss = error.pow(2).mean() + 0.1 * error.abs().mean() + 1e-6 * posterior.kl().mean()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def encode_dataset(vae, images: np.ndarray, out_dir: Path, device, progress=None,
                   batch: int = 64) -> tuple[torch.Tensor, float]:
    """Posterior means of every scene [N, 4, s, s] (unscaled) and the scale that makes them unit-variance."""
    latents_file = out_dir / "latents.pt"
    if latents_file.is_file():
        saved = torch.load(latents_file, map_location="cpu", weights_only=True)
        return saved["latents"], float(saved["scale"])
    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pixels = _to_pixels(images[start:start + batch]).to(device)
            chunks.append(vae.encode(pixels).latent_dist.mean.cpu())
            if progress is not None:
                progress(min(start + batch, len(images)), len(images))
    latents = torch.cat(chunks)
    scale = float(1.0 / latents.std())
    _atomic(latents_file, lambda path: torch.save({"latents": latents, "scale": scale}, path))
    return latents, scale


# ----------------------------------------------------------------------------------------------- decoder
def train_decoder(vae, latents: torch.Tensor, images: np.ndarray, out_dir: Path, plan: TrainingPlan, device,
                  progress=None, log: Callable[[str], None] = print) -> float:
    """Refine (or resume, or skip when done) the VAE's decoder in place on whole scenes, leaving the moving average
    of its weights in it; returns the seconds spent.

    Args:
        vae: the trained VAE; only ``post_quant_conv`` and ``decoder`` change.
        latents: the scenes' unscaled posterior means, as :func:`encode_dataset` returns them.
        images: the scenes [N, S, S, 3] uint8, in the latents' order.
    """
    optimiser = _trainable(vae, "decoder", plan, device)
    decoder_side = _decoder_side(vae)
    ema = _weights_copy(decoder_side)
    averaging = _MovingAverage(ema, decoder_side)

    def one_step(step):
        _decoder_step(vae, optimiser, _draw_decoder_batch(plan, step, latents, images), device, plan.decoder_bfloat16)
        averaging.update(_averaging_decay(plan.decoder_ema_decay, step + 1))

    seconds = _run_stage("decoder", vae, optimiser, out_dir, plan, one_step, progress, log, ema)
    decoder_side.load_state_dict(ema)
    vae.eval().requires_grad_(False)
    return seconds


def _decoder_side(vae) -> torch.nn.Module:
    """The VAE's modules the decoder stage trains, as one module (state names as in the VAE's own state)."""
    return torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})


def _draw_decoder_batch(plan: TrainingPlan, step: int, latents: torch.Tensor,
                        images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s latents and their scenes [B, 3, S, S] in [-1, 1], from the step's own generator."""
    generator = _step_generator(plan.seed, "decoder", step)
    index = np.sort(torch.randint(0, len(latents), (plan.decoder_batch,), generator=generator).numpy())
    return latents[index], _to_pixels(images[index])


def _decoder_step(vae, optimiser, batch: tuple[torch.Tensor, torch.Tensor], device, bfloat16: bool) -> None:
    """One optimiser step of the decoder's reconstruction MSE on a drawn batch (decoded in bfloat16 autocast if
    ``bfloat16``)."""
    latents, pixels = (tensor.to(device) for tensor in batch)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bfloat16):
        decoded = vae.decode(latents).sample
    loss = (decoded.float() - pixels).pow(2).mean()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


# -------------------------------------------------------------------------------------------------- UNet
def train_unet(components: SDComponents, latents: torch.Tensor, token_ids: torch.Tensor, out_dir: Path,
               plan: TrainingPlan, device, progress=None, log: Callable[[str], None] = print) -> float:
    """Train (or resume, or skip when done) the UNet; leaves the moving average of its weights in it."""
    unet, text_encoder = components.unet, components.text_encoder
    optimiser = _trainable(unet, "unet", plan, device)
    text_encoder.to(device)
    ema = _weights_copy(unet)
    averaging = _MovingAverage(ema, unet)
    alphas_cumprod = noise_schedule().to(device)
    empty_ids = _empty_prompt_ids(components.tokenizer, plan.spec.text_length)

    def one_step(step):
        batch = _draw_unet_batch(plan, step, latents, token_ids, empty_ids, len(alphas_cumprod))
        _unet_step(unet, text_encoder, optimiser, alphas_cumprod, batch, device, plan.min_snr_gamma)
        averaging.update(_averaging_decay(plan.ema_decay, step + 1))

    seconds = _run_stage("unet", unet, optimiser, out_dir, plan, one_step, progress, log, ema)
    unet.load_state_dict(ema)
    unet.eval().requires_grad_(False)
    return seconds


def _draw_unet_batch(plan: TrainingPlan, step: int, latents: torch.Tensor, token_ids: torch.Tensor,
                     empty_ids: torch.Tensor, timestep_count: int) -> tuple[torch.Tensor, ...]:
    """Step ``step``'s clean latents, noise, timesteps and token ids, from the step's own generator."""
    generator = _step_generator(plan.seed, "unet", step)
    index = torch.randint(0, len(latents), (plan.unet_batch,), generator=generator)
    clean = latents[index]
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, timestep_count, (plan.unet_batch,), generator=generator)
    dropped = torch.rand(plan.unet_batch, generator=generator) < plan.caption_dropout
    ids = torch.where(dropped[:, None], empty_ids, token_ids[index])
    return clean, noise, timesteps, ids


def _unet_step(unet, text_encoder, optimiser, alphas_cumprod: torch.Tensor, batch: tuple[torch.Tensor, ...],
               device, min_snr_gamma: float) -> None:
    """One optimiser step of epsilon prediction with min-SNR weights on a drawn batch."""
    clean, noise, timesteps, ids = (tensor.to(device) for tensor in batch)
    with torch.no_grad():
        context = text_encoder(ids)[0]
    alpha = alphas_cumprod[timesteps][:, None, None, None]
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
    snr = alpha.flatten() / (1 - alpha.flatten())
    weights = torch.clamp(snr, max=min_snr_gamma) / snr
    loss = (weights * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def _averaging_decay(limit: float, done: int) -> float:
    """The moving average's decay after ``done`` steps: short at first, so early weights fade fast, up to ``limit``."""
    return min(limit, (1 + done) / (10 + done))


class _MovingAverage:
    """The moving average ``ema`` (name -> tensor) of ``model``'s weights, updated by batched operations: the
    UNet has 686 tensors, so one operation each would launch about 1,400 GPU kernels a step (on the CPU the
    batched form takes about half the time; the results are the same to the bit)."""

    def __init__(self, ema: dict, model: torch.nn.Module):
        current = model.state_dict(keep_vars=True)
        floating = {name for name, value in current.items() if value.dtype.is_floating_point}
        self.averages = [ema[name] for name in current if name in floating]
        self.weights = [value.detach() for name, value in current.items() if name in floating]
        self.others = [(ema[name], value.detach()) for name, value in current.items() if name not in floating]

    def update(self, decay: float) -> None:
        with torch.no_grad():
            torch._foreach_mul_(self.averages, decay)
            torch._foreach_add_(self.averages, self.weights, alpha=1 - decay)
            for average, value in self.others:
                average.copy_(value)


def step_seconds(plan: TrainingPlan, stage: str, device, steps: int = 10, warmup: int = 3) -> float:
    """Median seconds of a training step of ``stage`` ("vae", "decoder" or "unet") of ``plan`` on ``device`` (its
    batch, size and widths; the decoder's and the UNet's moving averages included), timed on a fresh model and random
    data, after ``warmup`` untimed steps."""
    components = build_scene_components(plan.spec, seed=plan.seed)
    random = torch.Generator().manual_seed(plan.seed)
    if stage in ("vae", "decoder"):
        vae = components.vae
        optimiser = _trainable(vae, stage, plan, device)
        size, batch = plan.spec.native_size, getattr(plan, f"{stage}_batch")
        images = torch.randint(0, 256, (batch, size, size, 3), generator=random, dtype=torch.uint8).numpy()
        if stage == "vae":
            def one_step(step):
                _vae_step(vae, optimiser, _draw_vae_batch(plan, step, images), device)
        else:
            latents = torch.randn(batch, 4, size // 8, size // 8, generator=random)
            decoder_side = _decoder_side(vae)
            averaging = _MovingAverage(_weights_copy(decoder_side), decoder_side)

            def one_step(step):
                _decoder_step(vae, optimiser, _draw_decoder_batch(plan, step, latents, images), device,
                              plan.decoder_bfloat16)
                averaging.update(plan.decoder_ema_decay)
    else:
        unet = components.unet
        optimiser = _trainable(unet, "unet", plan, device)
        text_encoder = components.text_encoder.to(device)
        averaging = _MovingAverage(_weights_copy(unet), unet)
        alphas_cumprod = noise_schedule().to(device)
        side = plan.spec.native_size // 8
        latents = torch.randn(plan.unet_batch, 4, side, side, generator=random)
        empty_ids = _empty_prompt_ids(components.tokenizer, plan.spec.text_length)
        token_ids = empty_ids.expand(plan.unet_batch, -1)

        def one_step(step):
            batch = _draw_unet_batch(plan, step, latents, token_ids, empty_ids, len(alphas_cumprod))
            _unet_step(unet, text_encoder, optimiser, alphas_cumprod, batch, device, plan.min_snr_gamma)
            averaging.update(plan.ema_decay)
    times = []
    for step in range(warmup + steps):
        _synchronise(device)
        start = time.perf_counter()
        one_step(step)
        _synchronise(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))


def fit_steps(out_dir, plan: TrainingPlan, seconds: dict[str, float], device,
              log: Callable[[str], None] = print) -> TrainingPlan:
    """``plan`` with as many steps of each stage in ``seconds`` (stage -> seconds) as fill its time on ``device``
    (:func:`step_seconds`).

    A folder that already holds this plan, with whatever step counts for those stages, keeps its counts: a rerun
    resumes it rather than measuring again and being refused as another plan.
    """
    plan_file = Path(out_dir) / "plan.json"
    if plan_file.is_file():
        text = plan_file.read_text(encoding="utf-8")
        saved_plan = json.loads(text)
        saved = replace(plan, **{f"{stage}_steps": int(saved_plan[f"{stage}_steps"]) for stage in seconds})
        if json.dumps(saved.info(), sort_keys=True) == text:
            counts = ", ".join(f"{getattr(saved, f'{stage}_steps')} {_STAGE_WORDS[stage][0]} steps"
                               for stage in seconds)
            log(f"{counts}, as the run in {out_dir} was planned")
            return saved
    for stage, budget in seconds.items():
        seconds_a_step = step_seconds(plan, stage, torch.device(device))
        steps = max(1, int(budget / seconds_a_step))
        name, items = _STAGE_WORDS[stage]
        batch = getattr(plan, f"{stage}_batch")
        count = "1 step" if steps == 1 else f"{steps} steps"
        over = ", though it takes longer than that" if seconds_a_step > budget else ""
        log(f"{name}: {seconds_a_step:.3f} s a step of {batch} {items} on {device}, so {count} for {budget:g} s{over} "
            f"(--{stage}-steps {steps} plans the same run)")
        plan = replace(plan, **{f"{stage}_steps": steps})
    return plan


def _synchronise(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def noise_schedule() -> torch.Tensor:
    """SD1.5's cumulative alphas (scaled-linear betas 0.00085..0.012 over 1000 steps), the edit's schedule."""
    config = SD15_SCHEDULER_CONFIG
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _tokenize(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def _empty_prompt_ids(tokenizer, length: int) -> torch.Tensor:
    return _tokenize(tokenizer, [""], length)[0]


# ------------------------------------------------------------------------------------------------ shared
def _trainable(model: torch.nn.Module, stage: str, plan: TrainingPlan, device) -> torch.optim.Optimizer:
    """Put ``model`` on ``device`` in training mode and return the stage's optimiser for what the stage trains
    (AdamW; weight decay on the UNet only). The decoder stage trains the VAE's ``post_quant_conv`` and ``decoder``
    and leaves the encoder's side frozen."""
    model.to(device).train().requires_grad_(False)
    parameters = list((_decoder_side(model) if stage == "decoder" else model).parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    weight_decay = 0.01 if stage == "unet" else 0.0
    return torch.optim.AdamW(parameters, lr=getattr(plan, f"{stage}_lr"), weight_decay=weight_decay)


def _run_stage(stage: str, model: torch.nn.Module, optimiser: torch.optim.Optimizer, out_dir: Path,
               plan: TrainingPlan, one_step: Callable[[int], None], progress, log: Callable[[str], None],
               ema: Optional[dict] = None) -> float:
    """Run ``one_step(step)`` for every step of ``stage`` not yet in its checkpoint, setting the learning rate before
    each and saving ``model``, ``optimiser`` (and ``ema``) every ``checkpoint_every`` steps and at the end; returns the
    seconds the stage has taken in all, resumed runs included."""
    checkpoint_file = out_dir / CHECKPOINT_FILES[stage]
    states = {"model": model, "optimiser": optimiser}
    total = getattr(plan, f"{stage}_steps")
    step, seconds = _resume(checkpoint_file, states, ema)
    if step:
        log(f"{_STAGE_WORDS[stage][0]}: resuming at step {step} of {total}")
    started = time.perf_counter() - seconds
    while step < total:
        _set_lr(optimiser, getattr(plan, f"{stage}_lr"), step, total, plan.warmup_steps)
        one_step(step)
        step += 1
        if step % plan.checkpoint_every == 0 or step == total:
            _save(checkpoint_file, states, step, time.perf_counter() - started, ema)
        if progress is not None:
            progress(step, total)
    return _saved_seconds(checkpoint_file)


def _weights_copy(model: torch.nn.Module) -> dict:
    """A detached copy of ``model``'s state (the moving average starts from it)."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + _STAGE_SEEDS[stage]) * 10_000_019 + step)


def _set_lr(optimiser, peak: float, step: int, total: int, warmup: int) -> None:
    if step < warmup:
        lr = peak * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimiser.param_groups:
        group["lr"] = lr


def _save(path: Path, states: dict, step: int, seconds: float, ema: Optional[dict] = None) -> None:
    payload = {name: obj.state_dict() for name, obj in states.items()}
    payload.update(step=step, seconds=seconds)
    if ema is not None:
        payload["ema"] = ema
    _atomic(path, lambda temporary: torch.save(payload, temporary))


def _resume(path: Path, states: dict, ema: Optional[dict] = None) -> tuple[int, float]:
    """Load a checkpoint into ``states`` (and ``ema``); (step, seconds spent) or (0, 0) when there is none."""
    if not path.is_file():
        return 0, 0.0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name, obj in states.items():
        obj.load_state_dict(saved[name])
    if ema is not None:
        for name, value in saved["ema"].items():
            ema[name].copy_(value)
    return int(saved["step"]), float(saved["seconds"])


def _saved_seconds(path: Path) -> float:
    return float(torch.load(path, map_location="cpu", weights_only=True)["seconds"]) if path.is_file() else 0.0


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    temporary = path.with_name(path.name + ".partial")
    suffix = path.suffix
    if suffix == ".npy":  # np.save appends .npy to a name without it
        temporary = path.with_name(path.stem + ".partial.npy")
    write(str(temporary))
    os.replace(temporary, path)


def weights_digest(folder: Path) -> str:
    """sha256 over the model's weight files, in a fixed order: the same digest means the same weights."""
    digest = hashlib.sha256()
    for file in sorted(Path(folder).rglob("*.safetensors")):
        digest.update(file.relative_to(folder).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()
