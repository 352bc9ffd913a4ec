"""``bench`` subcommand: the speed benchmark and the DragBench runner.

    python -m adaptivedrag_core bench speed [--device cpu|cuda] [--size 512] [--method adaptive]
        [--drag-steps 80] [--lora-steps 80] [--repeat 1] [--out FILE]
    python -m adaptivedrag_core bench estimate [--size 512] [--method adaptive] [--lora-gradient-checkpointing on]
        [--out FILE]
    python -m adaptivedrag_core bench dragbench DIR --model SD15 --method adaptive [--dift-model SD21_DIR]
        [--lpips-weights FILE] --out results/ [--limit N] [--device cuda]
    python -m adaptivedrag_core bench scenes [--cases N] [--seed S] [--method M ...] [--variant NAME ...]
        [--out DIR] [--model DIR]
    python -m adaptivedrag_core bench scene-model [--model DIR] [--scenes 100] [--round-trips 10]
        [--tracking-cases 12] [--transplant-cases 8] [--grid PNG] [--transplant-grid PNG]

``--model tiny-random`` (and ``--dift-model tiny-random``) stand in tiny random-weight models, for smoke tests:
their edits are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import add_checkpointing_argument, add_graphs_argument, auto_on_off
from .errors import InputError
from .pipeline import METHODS

TINY_MODEL = "tiny-random"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` (with ``speed`` and ``dragbench``) on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser("bench", help="speed benchmark, GPU memory estimate and DragBench evaluation",
                                   description="Benchmarks: speed and memory per stage, a GPU-free estimate of "
                                   "memory and compute per stage, and DragBench (MD, IF).")
    commands = parser.add_subparsers(dest="bench_command")
    _add_speed_parser(commands)
    _add_estimate_parser(commands)
    _add_dragbench_parser(commands)
    _add_scenes_parser(commands)
    _add_scene_model_parser(commands)
    parser.set_defaults(run=lambda args: _missing_command(parser))
    return parser


def _missing_command(parser) -> int:
    parser.print_help()
    return 2


def _add_speed_parser(commands) -> None:
    from .bench.speed import MODEL_KINDS, SAM2_SIZES

    p = commands.add_parser("speed", help="time each stage of an edit and print JSON",
                            description="Wall time, time per step and peak memory of each stage of one edit, in a "
                            "warm process; random-init full-size SD1.5 and SAM2 on CUDA, tiny models on the CPU.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512 on cuda, 128 on cpu)")
    p.add_argument("--method", default="adaptive", choices=METHODS)
    p.add_argument("--drag-steps", type=int, default=80, help="fixed number of drag steps (default 80)")
    p.add_argument("--lora-steps", type=int, default=80, help="identity LoRA steps (default 80)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the full schedule (default 50)")
    p.add_argument("--strength", type=float, default=0.7, help="inversion strength (default 0.7: 35 of 50 steps)")
    p.add_argument("--repeat", type=int, default=1, help="measured edits after the warm-up; the median is reported")
    p.add_argument("--models", choices=MODEL_KINDS, default=None,
                   help="sd15: random-init full size (default on cuda); tiny: tiny random (default on cpu)")
    p.add_argument("--sam2-size", choices=SAM2_SIZES, default=None,
                   help="random-init SAM2 size (default large on cuda, tiny on cpu); none: Lab-colour fallback")
    add_checkpointing_argument(p)
    add_graphs_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(run=run_speed)


def run_speed(args) -> int:
    from .bench.speed import SpeedConfig, run_speed_benchmark

    config = SpeedConfig(device=args.device, size=args.size, method=args.method, drag_steps=args.drag_steps,
                         lora_steps=args.lora_steps, num_steps=args.ddim_steps, strength=args.strength,
                         repeat=args.repeat, models=args.models, sam2_size=args.sam2_size, seed=args.seed,
                         lora_gradient_checkpointing=auto_on_off(args.lora_gradient_checkpointing),
                         cuda_graphs=auto_on_off(args.cuda_graphs))
    out = _report_path(args.out)
    _print_report(run_speed_benchmark(config, log=lambda line: print(line, file=sys.stderr)), out)
    return 0


def _add_estimate_parser(commands) -> None:
    from .bench.estimate import NODE_WEIGHTS
    from .bench.speed import SAM2_SIZES

    p = commands.add_parser("estimate", help="estimate each stage's peak GPU memory and compute, without a GPU",
                            description="Runs the stages of one edit on PyTorch's meta device with full-size SD1.5 "
                            "in the GPU's dtypes, counting the bytes of every live tensor (an estimate of "
                            "torch.cuda.max_memory_allocated per stage) and the FLOPs per step. About a minute "
                            "on a CPU.")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    p.add_argument("--method", default="adaptive", choices=METHODS)
    p.add_argument("--no-mask", dest="mask", action="store_false",
                   help="drag without a mask (the UNet stops after the feature block)")
    p.add_argument("--lora-gradient-checkpointing", choices=("on", "off"), default="off",
                   help="train the identity LoRA with gradient checkpointing (default off)")
    p.add_argument("--lora-steps", type=int, default=80, help="identity LoRA steps for the totals (default 80)")
    p.add_argument("--drag-steps", type=int, default=None,
                   help="the drag's step budget for the totals: max_steps of dragdiffusion (default 80) and freedrag "
                        "(default 300), n of adaptive (default 80)")
    p.add_argument("--drag-max-steps", type=int, default=None,
                   help="adaptive only: n_max, the most its budget grows to (default 300); the *_most totals use it")
    p.add_argument("--lora-batch-size", type=int, default=4, help="identity LoRA batch (default 4)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the full schedule (default 50)")
    p.add_argument("--strength", type=float, default=0.7, help="inversion strength (default 0.7: 35 of 50 steps)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="UNet and text encoder dtype")
    p.add_argument("--sam2-size", choices=SAM2_SIZES, default="large",
                   help="SAM2 for the auto mask's stage (default large); none leaves the stage out")
    p.add_argument("--node-weights", choices=NODE_WEIGHTS, default="own",
                   help="own: the pipeline's UNet weights (default); shared: ComfyUI's, as the nodes use them (no "
                        "copy); copied: ComfyUI's plus a copy, as the nodes used to back-propagate")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(run=run_estimate)


def run_estimate(args) -> int:
    from .bench.estimate import EstimateConfig, estimate_edit

    config = EstimateConfig(size=args.size, method=args.method, mask=args.mask,
                            lora_gradient_checkpointing=args.lora_gradient_checkpointing == "on",
                            lora_steps=args.lora_steps,
                            drag_steps=args.drag_steps, drag_max_steps=args.drag_max_steps,
                            lora_batch_size=args.lora_batch_size,
                            num_steps=args.ddim_steps, strength=args.strength, dtype=args.dtype,
                            sam2_size=args.sam2_size, node_weights=args.node_weights)
    out = _report_path(args.out)
    _print_report(estimate_edit(config), out)
    return 0


def _report_path(path):
    out = Path(path) if path else None
    if out is not None and not out.parent.exists():
        raise InputError(f"output folder {out.parent} does not exist")
    return out


def _print_report(report: dict, out) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")


def _add_dragbench_parser(commands) -> None:
    from .bench.dragbench import MASK_SOURCES

    p = commands.add_parser("dragbench", help="edit and score a DragBench folder (MD, IF)",
                            description="Run a drag method over DragBench (DIR/<category>/<sample>/...), write the "
                            "edited images, per-sample JSON and summary.json; resumes where it stopped.")
    p.add_argument("data_dir", metavar="DIR", help="DragBench folder (drag_bench_data)")
    p.add_argument("--model", required=True,
                   help=f"SD1.5 checkpoint: a diffusers folder or a single file ('{TINY_MODEL}' for a smoke test)")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder (needed with a single-file --model: prompts)")
    p.add_argument("--method", default="adaptive", choices=METHODS)
    p.add_argument("--dift-model", help=f"local diffusers SD2.1 folder for MD ('{TINY_MODEL}' for a smoke test); "
                                        "without it MD is skipped")
    p.add_argument("--dift-ensemble", type=int, default=8, help="DIFT ensemble size (default 8, as published)")
    p.add_argument("--lpips-weights", help="LPIPS AlexNet weights file for IF (see docs/performance.md); "
                                           "without it IF is skipped")
    p.add_argument("--out", required=True, help="results folder (created; reused to resume)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--drag-steps", type=int, default=None,
                   help="drag step budget: max steps for dragdiffusion/freedrag, the step count n for adaptive")
    p.add_argument("--lora-steps", type=int, default=None, help="identity LoRA steps (default 80)")
    p.add_argument("--work-size", type=int, default=None, help="longer side of the working copy (default 512)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps of the full schedule (default 50)")
    p.add_argument("--mask", choices=MASK_SOURCES, default=None,
                   help="dragbench: the samples' hand-drawn masks; auto: the AdaptiveDrag auto mask; none: no mask "
                        "(and no superpixel regions); default: auto for adaptive (mask-free, as in the paper), "
                        "dragbench otherwise")
    p.add_argument("--sam2", help="SAM2 checkpoint for the superpixels (adaptive, the auto mask); else Lab colour")
    p.add_argument("--sam2-size", help="SAM2 model size, if the file name does not tell")
    add_checkpointing_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_dragbench_command)


def run_dragbench_command(args) -> int:
    import logging

    from .bench.dragbench import Metrics, run_dragbench

    settings = _dragbench_settings(args)
    _check_device(args.device)
    if args.dift_ensemble < 1:
        raise InputError(f"--dift-ensemble must be at least 1, got {args.dift_ensemble}")
    components, model_id = _editing_model(args.model, args.tokenizer)
    metrics = Metrics(dift=_dift(args.dift_model, args.dift_ensemble, args.device),
                      lpips=_lpips(args.lpips_weights, args.device))
    encoder = None
    if args.sam2:
        from .sam2_loader import load_sam2

        encoder = load_sam2(args.sam2, args.sam2_size)  # on the CPU; on the device only while it masks
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    report = run_dragbench(args.data_dir, args.out, components, settings, metrics, model_id=model_id,
                           device=args.device, limit=args.limit, mask_source=args.mask, region_encoder=encoder)
    summary = report.summary
    print(f"edited {len(report.edited)}, rescored {len(report.rescored)}, already done {len(report.already_done)}, "
          f"skipped {len(report.skipped)}; MD {summary['md']}, IF {summary['if']} "
          f"(summary: {Path(args.out) / 'summary.json'})")
    for note in summary["notes"]:
        print(f"note: {note}")
    return 0


def _dragbench_settings(args):
    from .pipeline import EditSettings, step_budget

    settings = EditSettings(method=args.method, seed=args.seed,
                            lora_gradient_checkpointing=auto_on_off(args.lora_gradient_checkpointing))
    for name, value in (("lora_steps", args.lora_steps), ("work_size", args.work_size),
                        ("num_steps", args.ddim_steps)):
        if value is not None:
            setattr(settings, name, value)
    if args.drag_steps is not None:
        if args.drag_steps < 1:
            raise InputError(f"--drag-steps must be at least 1, got {args.drag_steps}")
        settings.drag_options.update(step_budget(args.method, args.drag_steps))
    return settings


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")


def _editing_model(model: str, tokenizer):
    from .models import load_sd15, tiny_sd_components

    if model == TINY_MODEL:
        return tiny_sd_components(seed=0), "tiny-random-0"
    path = Path(model)
    components = load_sd15(path, tokenizer_path=tokenizer)
    return components, f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"


def _dift(path, ensemble: int, device: str):
    if path is None:
        return None
    from .bench.metrics import DiftFeaturizer, DiftSettings, load_dift_components
    from .models import tiny_sd_components

    components = tiny_sd_components(seed=1) if path == TINY_MODEL else load_dift_components(path)
    return DiftFeaturizer(components, device=device, settings=DiftSettings(ensemble_size=ensemble))


def _lpips(path, device: str):
    if path is None:
        return None
    from .bench.metrics import load_lpips

    return load_lpips(path, device=device)


def _add_scenes_parser(commands) -> None:
    from .bench.scenes import DEFAULT_CASE_SEED, VARIANTS
    from .drag.closs import CLOSS_KINDS

    p = commands.add_parser("scenes", help="every method on held-out scene cases, scored against the known answer",
                            description="Edit held-out procedural scene cases with the scene model, once per method "
                            "and variant, and score MD, fidelity and IoU against the ground-truth moved scene. "
                            "Resumes from OUT/results.jsonl.")
    p.add_argument("--cases", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--seed", type=int, default=DEFAULT_CASE_SEED, help=f"case seed (default {DEFAULT_CASE_SEED})")
    p.add_argument("--method", action="append", choices=METHODS, help="only these methods (repeatable)")
    p.add_argument("--variant", action="append", metavar="NAME",
                   help="only these variants (repeatable): " + "; ".join(v.name for v in VARIANTS))
    p.add_argument("--out", default="bench-scenes", help="results folder (default bench-scenes; reused to resume)")
    p.add_argument("--model", help="scene model folder (default: the one shipped in the package)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--lora-steps", type=int, default=None, help="identity LoRA steps (default 80)")
    p.add_argument("--drag-steps", type=int, default=None, help="drag step budget (default: each paper's)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps of the full schedule (default 50)")
    p.add_argument("--drag-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an optimiser option for every variant (repeatable), e.g. to compare a choice")
    p.add_argument("--closs-kind", choices=CLOSS_KINDS, default=None,
                   help="CLoss form of the CLoss variants (default: the edit's default)")
    p.add_argument("--sam2", help="SAM2 checkpoint for the auto mask (else the Lab-colour fallback)")
    p.add_argument("--sam2-size", help="SAM2 model size, if the file name does not tell")
    p.set_defaults(run=run_scenes)


def run_scenes(args) -> int:
    from .bench.scenes import SceneBenchConfig, run_scene_bench, summary_table
    from .cli import parse_drag_options
    from .scene_model import load_scene_model

    _check_device(args.device)
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    config = SceneBenchConfig(cases=args.cases, seed=args.seed, variants=args.variant, methods=args.method,
                              device=args.device, lora_steps=args.lora_steps, drag_steps=args.drag_steps,
                              num_steps=args.ddim_steps, drag_options=parse_drag_options(args.drag_option),
                              sam2=args.sam2, sam2_size=args.sam2_size, closs_kind=args.closs_kind)
    config.chosen_variants()  # unknown names fail before the model loads
    components = load_scene_model(args.model)
    summary = run_scene_bench(config, components, args.out, log=lambda line: print(line, file=sys.stderr))
    print(summary_table(summary))
    return 0


def _add_scene_model_parser(commands) -> None:
    p = commands.add_parser("scene-model", help="the scene model's own quality (VAE, round trip, feature tracking, "
                            "latent transplant, samples)",
                            description="VAE reconstruction PSNR on held-out scenes, the invert-then-sample round "
                            "trip with the identity LoRA at strength 0.7, whether the drag's features find a moved "
                            "object (feature tracking), whether an object moved by hand in the inverted latent is "
                            "drawn where it went (latent transplant), and a grid of samples from noise.")
    p.add_argument("--model", help="scene model folder (default: the one shipped in the package)")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes for the VAE (default 100)")
    p.add_argument("--round-trips", type=int, default=10, help="held-out scenes for the round trip (default 10)")
    p.add_argument("--tracking-cases", type=int, default=12,
                   help="held-out drag cases for feature tracking (default 12; 0 skips it)")
    p.add_argument("--transplant-cases", type=int, default=8,
                   help="held-out drag cases for the latent transplant (default 8; 0 skips it)")
    p.add_argument("--grid", help="write the grid of samples from noise to this PNG")
    p.add_argument("--transplant-grid", help="write the latent transplant's pictures at strength 0.7 to this PNG "
                   "(per case: the scene, the transplant, the half-way latent, the ground truth)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(run=run_scene_model)


def run_scene_model(args) -> int:
    from .bench.scene_model_quality import measure_scene_model
    from .scene_model import load_scene_model

    _check_device(args.device)
    if args.scenes < 1 or args.round_trips < 1:
        raise InputError("--scenes and --round-trips must be at least 1")
    if args.tracking_cases < 0 or args.transplant_cases < 0:
        raise InputError("--tracking-cases and --transplant-cases must be 0 or more")
    out = _report_path(args.out)
    components = load_scene_model(args.model, device=args.device)
    report = measure_scene_model(components, args.scenes, args.round_trips, args.device, args.grid,
                                 args.tracking_cases, args.transplant_cases, args.transplant_grid,
                                 log=lambda line: print(line, file=sys.stderr))
    _print_report(report, out)
    return 0
