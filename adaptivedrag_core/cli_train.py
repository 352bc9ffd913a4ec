"""``train-scenes``: train the scene model (:mod:`scene_training`), resumable.

    python -m adaptivedrag_core train-scenes [--out DIR] [--device cpu|cuda] [--seed 0]
        [--scenes N] [--vae-steps N | --vae-seconds S] [--decoder-steps N | --decoder-seconds S]
        [--unet-steps N | --unet-seconds S] [--vae-batch N] [--unet-batch N] [--unet-lr LR] [--checkpoint-every N]
        [--size 128]

The defaults reproduce the shipped model (``adaptivedrag_core/scene_model``). Run it again with the same
``--out`` to resume after an interruption.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

#: The stages whose length the command sets, in steps or seconds: (stage, name in the help).
STAGE_NAMES = (("vae", "VAE"), ("decoder", "decoder refinement"), ("unet", "UNet"))


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .scene_training import TrainingPlan

    defaults = TrainingPlan()
    p = subparsers.add_parser("train-scenes", help="train the small scene model (resumable)",
                              description="Train the project's small SD1.x-architecture model on procedural scenes "
                              "(VAE, its decoder refined on whole scenes, then the UNet on cached latents). The "
                              "defaults reproduce the shipped weights in about 85 minutes on 2 CPU cores; run again "
                              "with the same --out to resume.")
    p.add_argument("--out", default="scene-model-training", help="folder for data, checkpoints and the model "
                   "(default scene-model-training); the model is written to OUT/model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--scenes", type=int, default=defaults.scenes, help=f"training scenes (default {defaults.scenes})")
    for stage, name in STAGE_NAMES:
        steps = p.add_mutually_exclusive_group()
        default = getattr(defaults, f"{stage}_steps")
        steps.add_argument(f"--{stage}-steps", type=int, default=default, help=f"{name} steps (default {default})")
        steps.add_argument(f"--{stage}-seconds", type=float,
                           help=f"instead of --{stage}-steps: as many {name} steps as fill about this many seconds, "
                           "from a step timed on this device before training (for a GPU call of limited time; the "
                           f"log gives the --{stage}-steps that plans the same run, and a rerun in the same --out "
                           "keeps the count)")
    p.add_argument("--vae-batch", type=int, default=defaults.vae_batch,
                   help=f"crops per VAE step (default {defaults.vae_batch}; a GPU is better used with more)")
    p.add_argument("--unet-batch", type=int, default=defaults.unet_batch,
                   help=f"latents per UNet step (default {defaults.unet_batch}; a GPU is better used with more)")
    p.add_argument("--unet-lr", type=float, default=defaults.unet_lr,
                   help=f"the UNet's peak learning rate (default {defaults.unet_lr})")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help=f"steps between checkpoints (default {defaults.checkpoint_every}; a GPU run steps so fast "
                   "that saving this often costs time)")
    p.add_argument("--size", type=int, default=defaults.spec.native_size,
                   help=f"native image size, a multiple of 64 (default {defaults.spec.native_size}; 256 gives 32x32 "
                   "latents, four times the compute: a GPU run)")
    p.set_defaults(run=run_train)
    return p


def run_train(args) -> int:
    import torch

    from .errors import InputError
    from .scene_training import TrainingPlan, fit_steps, train_scene_model

    for name in ("scenes", "vae_steps", "decoder_steps", "unet_steps", "vae_batch", "unet_batch", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    seconds = {stage: getattr(args, f"{stage}_seconds") for stage, _ in STAGE_NAMES
               if getattr(args, f"{stage}_seconds") is not None}
    for stage, budget in seconds.items():
        if not budget > 0:
            raise InputError(f"--{stage}-seconds must be above 0, got {budget}")
    if not args.unet_lr > 0:
        raise InputError(f"--unet-lr must be above 0, got {args.unet_lr}")
    if args.size < 64 or args.size % 64:
        raise InputError(f"--size must be a multiple of 64 (the UNet halves the 8x smaller latents three times), "
                         f"got {args.size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    defaults = TrainingPlan()
    plan = replace(defaults, seed=args.seed, scenes=args.scenes, vae_steps=args.vae_steps,
                   decoder_steps=args.decoder_steps, unet_steps=args.unet_steps,
                   vae_batch=args.vae_batch, unet_batch=args.unet_batch, unet_lr=args.unet_lr,
                   checkpoint_every=args.checkpoint_every,
                   spec=replace(defaults.spec, native_size=args.size))
    if seconds:
        plan = fit_steps(args.out, plan, seconds, args.device)
    train_scene_model(args.out, plan, device=args.device)
    return 0
