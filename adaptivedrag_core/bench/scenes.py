"""``bench scenes``: every method and variant on held-out scene cases, scored against the known answer.

Each case (:func:`~adaptivedrag_core.scenes.make_cases`) is edited by the whole pipeline on the scene model, once
per variant (method; CLoss on or off; the auto mask, a user mask, or none), and scored by
:func:`~adaptivedrag_core.bench.scene_metrics.score_case`. The identity LoRA, the inversion and the reference
recording of a case are computed once and shared by its variants, as they would be for a user trying them.

The *user mask* stands in for the hand-drawn mask of DragBench: the moved objects' footprints before and after
the move, dilated by a few pixels. The *auto mask* is AdaptiveDrag's (SAM2 features when a checkpoint is given,
else the Lab-colour fallback, as ``edit --mask auto`` does).

Beside the scores from the picture, each edit records where the optimiser left its handles (``tracked``: the
distance to the target per drag length, the method's own belief). A tracked handle at its target with the object
not drawn there means the method's tracking was misled (it searches near the handle's last position, so it follows
whatever the optimiser did to the features there); a tracked handle that never got near means the optimisation
itself did not get there.

Times: ``drag s`` and ``sampling s`` are each variant's own stages; ``edit s`` is what one edit of a new picture
takes with it, the stages its case's variants share (LoRA, inversion, reference) counted in. ``peak MiB`` is the
edit's peak allocated memory on CUDA; on the CPU it is the process's peak resident memory so far, which never goes
down, so a row includes the rows run before it.

Results go one line per (case, variant) to ``OUT/results.jsonl`` as they are made, so an interrupted run resumes
where it stopped; the summary table is printed and written to ``OUT/summary.md`` and ``OUT/summary.json``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..models import SDComponents
from ..pipeline import DragPipeline, EditSettings, step_budget
from ..scenes import CASE_KINDS, DragCase, make_cases
from .scene_metrics import moved_footprints, score_case
from .speed import MemoryClock

#: Held-out cases: the training scenes come from another seed's stream.
DEFAULT_CASE_SEED = 1000
#: Pixels by which the stand-in user mask extends the moved footprints.
USER_MASK_MARGIN = 4
NO_EDIT = "input (no edit)"


@dataclass(frozen=True)
class Variant:
    """One way to run an edit: a method, its mask ("none", "user" or "auto") and CLoss on or off."""

    name: str
    method: str
    mask: str
    closs: bool


VARIANTS = (
    Variant("dragdiffusion", "dragdiffusion", "none", False),
    Variant("dragdiffusion + user mask", "dragdiffusion", "user", False),
    Variant("freedrag", "freedrag", "none", False),
    Variant("freedrag + user mask", "freedrag", "user", False),
    Variant("adaptive + auto mask + CLoss", "adaptive", "auto", True),
    Variant("adaptive + auto mask", "adaptive", "auto", False),
    Variant("adaptive + user mask + CLoss", "adaptive", "user", True),
    Variant("adaptive + CLoss", "adaptive", "none", True),
    Variant("adaptive", "adaptive", "none", False),
)


@dataclass
class SceneBenchConfig:
    """What ``bench scenes`` runs.

    Args:
        cases: number of held-out cases; seed: their seed.
        variants: names from :data:`VARIANTS` (default all), possibly narrowed by ``methods``.
        methods: keep only the variants of these methods (default all).
        device: "cpu" or "cuda".
        lora_steps, drag_steps, num_steps: override the papers' defaults (for quick runs; None keeps them).
        drag_options: extra optimiser options for every variant (e.g. to compare a choice).
        sam2, sam2_size: a SAM2 checkpoint for the auto mask (else the Lab-colour fallback).
        closs_kind: the CLoss form of the CLoss variants (None: the default, see ``EditSettings``).
    """

    cases: int = 20
    seed: int = DEFAULT_CASE_SEED
    variants: Optional[Sequence[str]] = None
    methods: Optional[Sequence[str]] = None
    device: str = "cpu"
    lora_steps: Optional[int] = None
    drag_steps: Optional[int] = None
    num_steps: Optional[int] = None
    drag_options: dict = field(default_factory=dict)
    sam2: Optional[str] = None
    sam2_size: Optional[str] = None
    closs_kind: Optional[str] = None

    def chosen_variants(self) -> list[Variant]:
        names = {v.name for v in VARIANTS}
        unknown = [name for name in (self.variants or ()) if name not in names]
        if unknown:
            raise InputError(f"unknown variant {unknown[0]!r}; choose from: {', '.join(sorted(names))}")
        chosen = [v for v in VARIANTS if (self.variants is None or v.name in self.variants)
                  and (self.methods is None or v.method in self.methods)]
        if not chosen:
            raise InputError("no variant left to run with these --method/--variant choices")
        return chosen

    def settings(self, variant: Variant, native_size: int) -> EditSettings:
        # auto_mask off: every variant brings its own mask ("none" must stay mask-free).
        settings = EditSettings(method=variant.method, closs=variant.closs, work_size=native_size, seed=0,
                                auto_mask=False)
        if self.lora_steps is not None:
            settings.lora_steps = self.lora_steps
        if self.num_steps is not None:
            settings.num_steps = self.num_steps
        if self.closs_kind is not None:
            settings.closs_kind = self.closs_kind
        if self.drag_steps is not None:
            settings.drag_options.update(step_budget(variant.method, self.drag_steps))
        settings.drag_options.update(self.drag_options)
        return settings

    def identity(self) -> dict:
        """What must match for a results folder to be resumed."""
        keys = ("cases", "seed", "lora_steps", "drag_steps", "num_steps", "drag_options", "sam2", "sam2_size")
        identity = {key: getattr(self, key) for key in keys}
        if self.closs_kind is not None:  # absent otherwise, so folders from before the option still resume
            identity["closs_kind"] = self.closs_kind
        return identity


def tracked_ratio(case: DragCase, final_handles) -> float:
    """Mean over pairs of the distance from where the optimiser left the handle to its target, per drag length
    (0: the method believes it got there; 1: it did not move)."""
    return float(np.mean([math.dist(end, target) / max(length, 1.0)
                          for end, target, length in zip(final_handles, case.targets, case.drag_lengths())]))


def user_mask(case: DragCase, margin: int = USER_MASK_MARGIN) -> np.ndarray:
    """A stand-in for a hand-drawn mask: the moved objects before and after, dilated by ``margin`` pixels."""
    return moved_footprints(case, case.scene.render(), case.ground_truth().render(), margin)


def run_scene_bench(config: SceneBenchConfig, components: SDComponents, out_dir,
                    log: Callable[[str], None] = print, progress_factory=None) -> dict:
    """Run every (case, variant) not yet in ``out_dir/results.jsonl``; return the summary."""
    variants = config.chosen_variants()
    out_dir = Path(out_dir)
    records = _open_results(out_dir, config)
    done = {(r["case"], r["variant"]) for r in records}
    cases = make_cases(config.cases, config.seed, components.native_size)
    pipeline = DragPipeline(components, device=config.device, model_id="scene-bench")
    encoder = _sam2(config)
    clock = MemoryClock(torch.device(config.device))
    results_file = out_dir / "results.jsonl"
    for number, case in enumerate(cases):
        rendered = case.scene.render().image
        image = Image.fromarray(rendered)
        masks = _CaseMasks(case, image, encoder)
        if (number, NO_EDIT) not in done:
            unedited = score_case(case, rendered)
            records.append(_append(results_file, _record(number, case, NO_EDIT, unedited)))
        for variant in variants:
            if (number, variant.name) in done:
                continue
            mask, regions, mask_seconds = masks.get(variant.mask)
            settings = config.settings(variant, components.native_size)
            clock.start()
            result = pipeline.edit(image, case.points(), settings, mask=mask, regions=regions,
                                   progress_factory=progress_factory)
            seconds, peak = clock.lap()
            scores = score_case(case, np.asarray(result.image.convert("RGB")))
            record = _record(number, case, variant.name, scores, seconds=round(seconds, 3), timings=result.timings,
                             reused=result.reused, mask_seconds=mask_seconds, drag_steps=result.drag_steps,
                             peak_memory_bytes=peak, final_handles=[list(h) for h in result.final_handles],
                             tracked_ratio=tracked_ratio(case, result.final_handles))
            records.append(_append(results_file, record))
            log(f"case {number} ({case.kind}) {variant.name}: MD {scores.md:.1f} px of "
                f"{np.mean(case.drag_lengths()):.1f}, IoU {scores.iou:.2f}, outside PSNR {scores.outside_psnr:.1f} dB, "
                f"tracked handle / drag {record['tracked_ratio']:.2f}")
        pipeline.clear_cache()
    summary = summarise(records, [NO_EDIT] + [v.name for v in variants], config.cases)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_table(summary) + "\n", encoding="utf-8")
    return summary


class _CaseMasks:
    """The masks of one case, made when first asked for: (mask, regions, seconds spent making them)."""

    def __init__(self, case: DragCase, image: Image.Image, encoder):
        self.case, self.image, self.encoder = case, image, encoder
        self.made: dict = {"none": (None, None, 0.0)}

    def get(self, kind: str):
        if kind not in self.made:
            started = time.perf_counter()
            if kind == "user":
                self.made[kind] = (user_mask(self.case), None)
            else:
                from ..automask import AutoMaskWarning, auto_mask

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", AutoMaskWarning)
                    result = auto_mask(self.image, self.case.points(), self.encoder)
                self.made[kind] = (result.mask, result.regions)
            self.made[kind] += (round(time.perf_counter() - started, 3),)
        return self.made[kind]


def _sam2(config: SceneBenchConfig):
    if config.sam2 is None:
        return None
    from ..sam2_loader import load_sam2

    return load_sam2(config.sam2, config.sam2_size, device=config.device)


def _record(number: int, case: DragCase, variant: str, scores, **extra) -> dict:
    return {"case": number, "kind": case.kind, "variant": variant, "drag_length": float(np.mean(case.drag_lengths())),
            **scores.as_dict(), **extra}


def _open_results(out_dir: Path, config: SceneBenchConfig) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / "config.json"
    identity = json.dumps(config.identity(), sort_keys=True)
    if config_file.is_file() and config_file.read_text(encoding="utf-8") != identity:
        raise InputError(f"{out_dir} holds results made with other settings ({config_file}); use another --out")
    config_file.write_text(identity, encoding="utf-8")
    results_file = out_dir / "results.jsonl"
    if not results_file.is_file():
        return []
    records = []
    for line in results_file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by an interruption: that edit runs again
            continue
    return records


def _append(path: Path, record: dict) -> dict:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


#: The stages a case's variants share (computed by the first, reused by the rest): an edit of a new picture pays them.
SHARED_STAGES = ("inversion", "reference")


def summarise(records: list[dict], variant_names: list[str], cases: int) -> dict:
    """Means per variant over the cases (and MD per case kind); medians of the times.

    ``edit_s`` is what one edit of a new picture costs with the variant: the case's shared stages (the LoRA and
    the inversion, the reference branch), timed where they were computed, plus the variant's own stages and mask.
    """
    shared = {}  # per case and stage, the time of the record that computed it (a resumed run may compute it again)
    for r in records:
        for stage in SHARED_STAGES:
            key = (r["case"], stage)
            shared[key] = max(shared.get(key, 0.0), r.get("timings", {}).get(stage, 0.0))
    rows = []
    for name in variant_names:
        mine = [r for r in records if r["variant"] == name and r["case"] < cases]
        if not mine:
            continue
        row = {"variant": name, "cases": len(mine)}
        for key in ("md", "iou", "outside_psnr", "outside_mae", "gt_psnr"):
            row[key] = round(statistics.fmean(r[key] for r in mine), 3)
        row["md_ratio"] = round(statistics.fmean(r["md"] / r["drag_length"] for r in mine), 3)
        tracked = [r["tracked_ratio"] for r in mine if "tracked_ratio" in r]
        row["tracked_ratio"] = round(statistics.fmean(tracked), 3) if tracked else None
        for kind in CASE_KINDS:
            of_kind = [r["md"] for r in mine if r["kind"] == kind]
            row[f"md_{kind}"] = round(statistics.fmean(of_kind), 2) if of_kind else None
        timed = [r for r in mine if "timings" in r]
        if timed:
            row["drag_s"] = round(statistics.median(r["timings"].get("drag", 0.0) for r in timed), 2)
            row["sampling_s"] = round(statistics.median(r["timings"].get("sampling", 0.0) for r in timed), 2)
            row["edit_s"] = round(statistics.median(_fresh_edit_seconds(r, shared) for r in timed), 2)
            row["peak_memory_mib"] = round(max(r["peak_memory_bytes"] for r in timed) / 2**20)
        rows.append(row)
    return {"cases": cases, "rows": rows}


def _fresh_edit_seconds(record: dict, shared: dict) -> float:
    own = sum(seconds for stage, seconds in record["timings"].items() if stage not in SHARED_STAGES)
    return own + record.get("mask_seconds", 0.0) + sum(shared[(record["case"], stage)] for stage in SHARED_STAGES)


def summary_table(summary: dict) -> str:
    """The summary as a Markdown table."""
    header = ("| variant | MD px | MD / drag | tracked / drag | IoU | PSNR outside dB | MAE outside | "
              "PSNR vs truth dB | "
              + " | ".join(f"MD {kind}" for kind in CASE_KINDS) + " | drag s | sampling s | edit s | peak MiB |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in summary["rows"]:
        kinds = " | ".join(_cell(row[f"md_{kind}"], 1) for kind in CASE_KINDS)
        lines.append(f"| {row['variant']} | {row['md']:.2f} | {row['md_ratio']:.2f} | "
                     f"{_cell(row.get('tracked_ratio'), 2)} | {row['iou']:.2f} | "
                     f"{_cell(row['outside_psnr'], 1)} | {row['outside_mae']:.2f} | {row['gt_psnr']:.1f} | {kinds} | "
                     f"{_cell(row.get('drag_s'), 1)} | {_cell(row.get('sampling_s'), 1)} | "
                     f"{_cell(row.get('edit_s'), 1)} | {_cell(row.get('peak_memory_mib'), 0)} |")
    return "\n".join(lines)


def _cell(value, digits: int) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if not (isinstance(value, float) and math.isnan(value)) else "–"
