"""Command line: ``python -m adaptivedrag_core edit|mask|bench ...``.

Bad input (points, image, mask, model, settings, an output that cannot be written) prints one line on stderr and
exits with status 2, without writing any file; everything that can be checked is checked before a model is
loaded. Ctrl-C prints one line and exits with status 130.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError
from .outputs import check_outputs, save_image

DEMO_DRAG = "150,152:196,140"
DEMO_NOTE = (
    "demo: the model is the project's own small scene model (128 px, trained on procedural scenes like this "
    "picture), not SD1.5: it edits scenes of that kind only. Pass --model with your SD1.5 checkpoint for photos."
)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def warnings_as_lines(category: type[Warning]):
    """Show warnings of ``category`` as one ``warning: ...`` line on stderr, instead of Python's two-line form."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", category)  # every damaged entry is worth its line
        show = warnings.showwarning

        def one_line(message, kind, *args, **kwargs):
            if issubclass(kind, category):
                print(f"warning: {message}", file=sys.stderr)
            else:
                show(message, kind, *args, **kwargs)

        warnings.showwarning = one_line
        yield


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m adaptivedrag_core", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command")
    add_edit_parser(subparsers)
    for module in _command_modules():
        module.add_parser(subparsers)
    return parser


def _command_modules():
    from . import cli_bench, cli_mask, cli_train

    return [cli_mask, cli_bench, cli_train]


def add_edit_parser(subparsers) -> None:
    from .drag.closs import CLOSS_KINDS, DEFAULT_CLOSS_KIND

    p = subparsers.add_parser("edit", help="drag-edit an image", description="Drag-edit an image with SD1.5.")
    p.add_argument("image", nargs="?", help="input image (any mode and size)")
    p.add_argument("--drag", action="append", default=[], metavar="X1,Y1:X2,Y2",
                   help="handle -> target pair in image pixels; repeat for several pairs")
    p.add_argument("--model", help="SD1.5 checkpoint: a diffusers folder or a single .safetensors file")
    p.add_argument("--tokenizer", help="folder with CLIP vocab.json and merges.txt (single-file models + a prompt)")
    p.add_argument("--out", help="output image path; a preview <out>_preview.png is written beside it")
    p.add_argument("--mask", help="mask image (white = may change), 'auto' for the superpixel auto mask, or 'none'; "
                                  "default: auto for adaptive (mask-free, as in the paper), none otherwise. With a "
                                  "mask image, adaptive still takes its superpixel regions from the auto mask")
    p.add_argument("--sam2", help="SAM2 checkpoint for the auto mask (else a weight-free Lab-colour fallback, "
                                  "with a warning)")
    p.add_argument("--sam2-size", help="SAM2 model size (tiny, small, base_plus, large; sam2.1_ prefix for 2.1), "
                                       "if the file name does not tell")
    p.add_argument("--prompt", default="", help="text prompt (default empty)")
    p.add_argument("--method", default="adaptive", choices=("adaptive", "freedrag", "dragdiffusion"))
    p.add_argument("--closs", action=argparse.BooleanOptionalAction, default=None,
                   help="correspondence loss while sampling (default: on for adaptive)")
    p.add_argument("--closs-kind", default=DEFAULT_CLOSS_KIND, choices=CLOSS_KINDS,
                   help="CLoss form: the public code's MSE (default), or the paper's contrastive loss")
    p.add_argument("--closs-weight", type=float, default=1.0, help="CLoss step-size multiplier (default 1)")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance while sampling (default 1 = off, as in the papers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-steps", type=int, default=None, help="identity LoRA steps (default 80; 0 skips)")
    p.add_argument("--lora", help="LoRA .safetensors: loaded if it exists, else trained and saved there")
    add_checkpointing_argument(p)
    add_graphs_argument(p)
    p.add_argument("--drag-steps", type=int, default=None,
                   help="drag step budget: max steps for dragdiffusion/freedrag, the step count n for adaptive")
    p.add_argument("--drag-option", action="append", default=[], metavar="NAME=VALUE",
                   help="any optimiser hyper-parameter, e.g. n_max=300 or tracking_radius=3; repeatable")
    p.add_argument("--work-size", type=int, default=None, help="longer side of the working copy (default 512)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the full schedule (default 50)")
    p.add_argument("--strength", type=float, default=0.7, help="inversion strength (default 0.7: 35 of 50 steps)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--cache-dir", default=None, help="keep LoRA weights and inversions here across runs")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--demo", action="store_true",
                   help="no model needed: the bundled scene model on the bundled sample picture")
    p.set_defaults(run=run_edit)


def add_auto_on_off_argument(parser, flag: str, help: str) -> None:
    """``flag auto|on|off`` (default auto); read the value with :func:`auto_on_off`."""
    from .pipeline import AUTO_ON_OFF

    parser.add_argument(flag, choices=tuple(AUTO_ON_OFF), default="auto", help=help)


def auto_on_off(value: str):
    """The setting (None = auto) for an ``auto|on|off`` argument's value."""
    from .pipeline import AUTO_ON_OFF

    return AUTO_ON_OFF[value]


def add_checkpointing_argument(parser) -> None:
    add_auto_on_off_argument(parser, "--lora-gradient-checkpointing",
                             "train the identity LoRA with gradient checkpointing: half the GPU memory, a third "
                             "more computation (default auto: on for GPUs under 11 GiB)")


def add_graphs_argument(parser) -> None:
    add_auto_on_off_argument(parser, "--cuda-graphs",
                             "replay the repeated steps from CUDA graphs: the same result, faster (default auto: "
                             "on with --device cuda; never on the CPU)")


def preview_path(out: Path) -> Path:
    return out.with_name(out.stem + "_preview.png")


def run_edit(args) -> int:
    """The ``edit`` command. Every check that needs no model (outputs, cache folder, settings, image, points,
    mask, a given LoRA) runs first, so bad input costs no model loading and no training."""
    from .cache import CacheWarning, DiskCache
    from .images import load_image, sample_image_path
    from .points import DragPoints

    if args.demo:
        args.image = args.image or str(sample_image_path())
        args.drag = args.drag or [DEMO_DRAG]
        args.out = args.out or "demo.png"
    if not args.image:
        raise InputError("give an IMAGE (or --demo)")
    if not args.out:
        raise InputError("give --out OUT.png")
    if not args.demo and not args.model:
        raise InputError("give --model PATH (an SD1.5 checkpoint), or --demo")
    out = Path(args.out)
    lora_file = Path(args.lora) if args.lora else None
    # A LoRA file that exists is read; one that does not is written after the edit, so it is an output.
    new_lora = {"--lora": lora_file} if lora_file is not None and not lora_file.exists() else {}
    check_outputs({"--out": out, "preview": preview_path(out)}, args.force, files=new_lora)
    cache = DiskCache(args.cache_dir) if args.cache_dir else None
    if cache is not None:
        cache.check()
    _check_device(args.device)
    settings = _settings(args)
    image = load_image(args.image)
    points = DragPoints.from_pairs(args.drag, image.width, image.height)
    given_lora = None
    if lora_file is not None and not new_lora:
        from .lora import load_lora

        given_lora = load_lora(lora_file)
    mask, regions = _mask_and_regions(args, image, points)
    pipeline = _pipeline(args, cache)

    from .progress import TqdmProgress

    with warnings_as_lines(CacheWarning):
        result = pipeline.edit(image, points, settings, mask=mask, regions=regions, progress_factory=TqdmProgress,
                               lora=given_lora)
    if lora_file is not None and given_lora is None and result.lora is not None:
        from .lora import save_lora

        save_lora(result.lora, lora_file)
        print(f"saved the identity LoRA to {lora_file}; pass --lora {lora_file} again to reuse it")
    save_image(result.image, out, args.force)
    from .preview import side_by_side

    save_image(side_by_side(image, result.image, points, result.final_handles), preview_path(out), args.force)
    final = ", ".join(f"({x:.1f}, {y:.1f})" for x, y in result.final_handles)
    print(f"wrote {out} and {preview_path(out)}; handles ended at {final} after {result.drag_steps} drag steps")
    if args.demo:
        print(DEMO_NOTE)
    return 0


def _mask_and_regions(args, image, points):
    """The mask and superpixel regions for the edit, from ``--mask`` (see its help): (mask, regions), each None
    or an array at image size. The auto mask is made here, not in the pipeline, to load SAM2 and print its
    warnings once."""
    from .images import load_mask, to_rgb

    choice = args.mask or ("auto" if args.method == "adaptive" else "none")
    mask = None if choice in ("auto", "none") else load_mask(choice, image.width, image.height)
    if choice == "auto" or (mask is not None and args.method == "adaptive"):
        from .cli_mask import cli_auto_mask

        automatic = cli_auto_mask(to_rgb(image), points, args.sam2, args.sam2_size, args.device)
        return (automatic.mask if mask is None else mask), automatic.regions
    return mask, None


def _settings(args):
    from .pipeline import EditSettings, step_budget

    # auto_mask off: _mask_and_regions has decided, and "--mask none" must stay mask-free.
    settings = EditSettings(method=args.method, prompt=args.prompt, seed=args.seed, auto_mask=False, closs=args.closs,
                            closs_kind=args.closs_kind, closs_weight=args.closs_weight,
                            num_steps=args.ddim_steps, strength=args.strength, guidance_scale=args.guidance_scale,
                            lora_gradient_checkpointing=auto_on_off(args.lora_gradient_checkpointing),
                            cuda_graphs=auto_on_off(args.cuda_graphs))
    drag_steps = args.drag_steps
    if args.demo:
        from .scene_model import scene_model_info

        settings.work_size = scene_model_info()["native_size"]  # the model's own size, as the README says
    if args.lora_steps is not None:
        settings.lora_steps = args.lora_steps
    if args.work_size is not None:
        settings.work_size = args.work_size
    if drag_steps is not None:
        settings.drag_options.update(step_budget(args.method, drag_steps))
    settings.drag_options.update(parse_drag_options(args.drag_option))
    return settings.validate()


def parse_drag_options(pairs) -> dict:
    """``NAME=VALUE`` strings as a dict of optimiser options (numbers and true/false converted)."""
    options = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--drag-option {pair!r}: expected NAME=VALUE")
        options[name.strip()] = _number(value.strip())
    return options


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")


def _pipeline(args, cache):
    """The pipeline for ``--model`` (or the demo's model). With a cache folder, the model's cache identity is the
    content of its files and of ``--tokenizer`` (hashed once, then remembered by size and modification time)."""
    from .models import load_sd15, model_files
    from .pipeline import DragPipeline

    if args.demo:
        from .scene_model import SCENE_MODEL_DIR, load_scene_model

        print("demo: running on the bundled scene model (nothing is downloaded)")
        components = load_scene_model()
        model_id = cache.fingerprint(model_files(SCENE_MODEL_DIR)) if cache else "scene-model"
    else:
        components = load_sd15(args.model, tokenizer_path=args.tokenizer)
        # Without a cache folder the id only names the model: nothing outlives the process.
        model_id = cache.fingerprint(model_files(args.model, args.tokenizer)) if cache else str(args.model)
    return DragPipeline(components, device=args.device, model_id=model_id, cache_dir=args.cache_dir)
