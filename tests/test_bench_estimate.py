"""The GPU-free estimate: the live-byte count, the meta run against a real one, FLOPs, what checkpointing saves."""

import argparse
import copy
import functools
import json

import pytest
import torch

from adaptivedrag_core import cli_bench
from adaptivedrag_core.bench.estimate import CostCounter, EstimateConfig, estimate_edit
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import tiny_sd_components

STAGES = ["prepare", "lora", "lora_merge", "inversion", "reference", "drag_start", "drag", "drag_end", "sampling",
          "vae_decode"]
# 2 inversion and sampling steps, no SAM2 stage
SMALL = dict(size=64, num_steps=4, strength=0.5, lora_steps=10, drag_steps=20, sam2_size="none")


def _estimate(device="cpu", **overrides):
    """The tiny model's estimate; on the CPU by default (as exact as meta, see below, and faster for it). Each
    configuration runs once per test session (a copy is returned)."""
    return copy.deepcopy(_estimate_once(device, tuple(sorted(overrides.items()))))


@functools.lru_cache(maxsize=None)
def _estimate_once(device: str, overrides: tuple) -> dict:
    return estimate_edit(EstimateConfig(**{**SMALL, **dict(overrides)}), tiny_sd_components(seed=0), device=device)


def _peaks(report):
    return {name: stage["peak_bytes"] for name, stage in report["stages"].items()}


def _flops(report):
    return {name: stage["flop_per_step"] for name, stage in report["stages"].items()}


def test_cost_counter_counts_each_storage_once_until_it_is_freed_and_flops():
    counter = CostCounter()
    with counter:
        a = torch.zeros(1000)  # 4000 bytes
        view = a[10:20]
        b = torch.zeros(500, dtype=torch.float16)  # 1000 bytes
        assert counter.live == 5000
        del a
        assert counter.live == 5000  # the view keeps the storage alive
        del view
        assert counter.live == 1000
        counter.reset_peak()
        c = b.float()  # 2000 bytes
        del b, c
    assert counter.live == 0 and counter.peak == 3000
    assert counter.flops == 0
    with counter:
        torch.ones(3, 5) @ torch.ones(5, 7)  # 3 x 7 outputs, 5 multiply-adds each
    assert counter.flops == 2 * 3 * 5 * 7


def test_meta_estimate_matches_a_real_run_on_the_cpu():
    """The meta run follows the real code path: the same FLOPs, and bytes within 1 % of the real run's."""
    meta, real = _estimate("meta"), _estimate("cpu")
    assert list(meta["stages"]) == STAGES
    assert meta["weights_bytes"] == real["weights_bytes"] > 0
    assert meta["reference_recording_bytes"] == real["reference_recording_bytes"] > 0
    meta_flops, real_flops = _flops(meta), _flops(real)
    # The float16 CLoss backward overflows at the loss scaler's first scale on this model, so the real run repeats
    # it at a smaller scale (drag.common.LossScaler): a one-off cost the meta run, which has no values, cannot see.
    assert meta_flops["sampling"] < real_flops.pop("sampling") < 1.5 * meta_flops.pop("sampling")
    assert meta_flops == real_flops
    assert meta["unet_forward_launches"] == real["unet_forward_launches"]
    for name, stage in meta["stages"].items():
        if name in ("prepare", "lora"):  # copies to the device (the prompt's token ids, the LoRA's noise drawn
            # on the host): a kernel on meta, as on a GPU; none on the CPU
            assert 0 < stage["launches_per_step"] - real["stages"][name]["launches_per_step"] <= 2, name
            continue
        if name == "sampling":  # the real run's one repeated CLoss backward (above)
            assert stage["launches_per_step"] < real["stages"][name]["launches_per_step"], name
            continue
        assert stage["launches_per_step"] == real["stages"][name]["launches_per_step"] > 0, name
    for stage, peak in _peaks(meta).items():
        assert peak == pytest.approx(_peaks(real)[stage], rel=0.01), stage


def test_report_weights_peak_target_and_totals():
    tiny = tiny_sd_components(seed=0)
    report = estimate_edit(EstimateConfig(**SMALL), tiny, device="cpu")
    modules = (tiny.unet, tiny.text_encoder, tiny.vae)
    assert [next(m.parameters()).dtype for m in modules] == [torch.float16, torch.float16, torch.float32]
    assert report["weights_bytes"] == sum(t.numel() * t.element_size()
                                          for m in modules for t in (*m.parameters(), *m.buffers()))
    peaks = _peaks(report)
    assert all(peak > report["weights_bytes"] for peak in peaks.values())
    assert report["peak_bytes"] == max(peaks.values()) == peaks[report["peak_stage"]]
    assert report["meets_target"] is (report["peak_bytes"] <= 6 * 2**30)
    # The recording is alive from the reference stage on: sampling holds it and its own step on top.
    assert peaks["sampling"] > report["weights_bytes"] + report["reference_recording_bytes"]
    stages = report["stages"]
    assert (stages["lora"]["steps_run"], stages["lora"]["edit_steps"]) == (2, 10)
    assert (stages["drag"]["steps_run"], stages["drag"]["edit_steps"]) == (1, 20)
    assert stages["inversion"]["edit_steps"] == stages["sampling"]["edit_steps"] == 2
    total = sum(stage["flop_per_step"] * stage["edit_steps"] for stage in stages.values())
    assert report["first_edit_tflop"] == pytest.approx(total / 1e12, abs=1e-3)
    assert 0 < report["re_drag_tflop"] < report["first_edit_tflop"]
    # Each stage that runs the UNet merges the LoRA for itself: four in a first edit, two in a re-drag.
    assert (stages["lora_merge"]["steps_run"], stages["lora_merge"]["edit_steps"]) == (1, 4)
    re_drag_steps = {"lora_merge": 2, "drag": 20, "drag_end": 1, "sampling": 2, "vae_decode": 1}  # the rest is cached
    for total, per_step in (("re_drag_tflop", "flop_per_step"), ("re_drag_launches", "launches_per_step")):
        expected = sum(stages[name][per_step] * steps for name, steps in re_drag_steps.items())
        assert report[total] == (pytest.approx(expected / 1e12, abs=1e-3) if per_step == "flop_per_step" else expected)
    # The merged identity LoRA adds no kernel to a forward pass; peft's unmerged layers add several per projection.
    launches = report["unet_forward_launches"]
    assert launches["merged_identity_lora"] == launches["plain"] < launches["unmerged_peft_lora"]
    json.dumps(report)


def test_flops_follow_the_passes_each_step_makes():
    flops = _flops(_estimate("meta"))  # meta: no loss-scaling retry (see above) in the sampling reading
    forward = flops["inversion"]
    assert flops["reference"] == pytest.approx(forward, rel=0.01)  # one forward per step, no gradient
    assert 0 < flops["lora_merge"] < 0.2 * forward  # one small product per projection, not a pass
    assert flops["drag_start"] == pytest.approx(forward, rel=0.05)  # one forward (and the feature resize)
    assert flops["drag_end"] < 0.9 * flops["drag_start"]  # the same forward, stopped after the feature block
    # A backward pass for the input's gradient costs up to one forward more (less: the first layers need none),
    # and one for the weights' gradients on top: LoRA's are small.
    assert 1.5 * forward < flops["drag"] < 3 * forward
    assert flops["sampling"] == pytest.approx(flops["drag"], rel=0.05)  # CLoss on every step: the same passes
    assert 4 * 1.5 * forward < flops["lora"] < 4 * 3 * forward  # batch 4
    no_closs = _flops(_estimate(method="dragdiffusion", drag_steps=None))
    # One forward, less the key/value projections of the layers that replay the reference's.
    assert 0.9 * forward < no_closs["sampling"] < forward


def test_the_drag_budget_is_each_method_s():
    """DragDiffusion 80 steps; AdaptiveDrag n = 80 growing up to n_max = 300; FreeDrag 300 steps and one more
    evaluation per drag of at most 5 steps (at least 60), up to one per step when drags end early."""
    budgets = {}
    for method in ("dragdiffusion", "adaptive", "freedrag"):
        report = _estimate(method=method, drag_steps=None)
        stages = report["stages"]
        budgets[method] = [(stages[name]["edit_steps"], stages[name]["edit_steps_most"]) for name in ("drag", "drag_end")]
        most_is_more = report["first_edit_tflop_most"] > report["first_edit_tflop"]
        assert most_is_more is (method != "dragdiffusion")
        assert report["re_drag_tflop_most"] - report["re_drag_tflop"] == pytest.approx(
            report["first_edit_tflop_most"] - report["first_edit_tflop"], abs=2e-3)
        assert report["re_drag_launches_most"] >= report["re_drag_launches"] > 0
    assert budgets == {"dragdiffusion": [(80, 80), (1, 1)], "adaptive": [(80, 300), (1, 1)],
                       "freedrag": [(300, 300), (60, 300)]}
    config = EstimateConfig(method="adaptive", drag_steps=10, drag_max_steps=25)
    assert (config.drag_steps, config.drag_max_steps, config.drag_evaluations()) == (10, 25, (1, 1))
    assert EstimateConfig(method="freedrag", drag_steps=12).drag_evaluations() == (3, 12)


def test_comfyui_s_weights_shared_with_the_nodes_cost_nothing_more_where_a_copy_cost_the_unet_again():
    """The node path: ComfyUI's inference-mode weights handed over as aliases keep every stage's peak the
    pipeline's; the copy the nodes made before put the UNet's weights on the device twice."""
    own, shared, copied = _estimate(), _estimate(node_weights="shared"), _estimate(node_weights="copied")
    assert _peaks(shared) == _peaks(own) and _flops(shared) == _flops(own)
    unet_bytes = sum(tensor.nbytes for tensor in tiny_sd_components(seed=0).unet.half().state_dict().values())
    assert copied["weights_bytes"] - own["weights_bytes"] == unet_bytes
    assert _peaks(copied)["lora"] - _peaks(own)["lora"] == unet_bytes


def test_gradient_checkpointing_lowers_the_lora_peak_and_adds_a_recomputation():
    plain, checkpointed = _estimate(), _estimate(lora_gradient_checkpointing=True)
    assert _peaks(checkpointed)["lora"] < _peaks(plain)["lora"]
    assert _flops(plain)["lora"] < _flops(checkpointed)["lora"] < 1.5 * _flops(plain)["lora"]
    for stage in STAGES[2:]:
        assert _peaks(checkpointed)[stage] == _peaks(plain)[stage]


def test_a_bigger_image_or_batch_needs_more():
    base = _estimate()
    bigger = _estimate(size=128)
    assert _peaks(bigger)["drag"] > _peaks(base)["drag"]
    # 4x the pixels: most of the work grows with them, self-attention faster, cross-attention to the prompt less.
    assert 3 <= _flops(bigger)["inversion"] / _flops(base)["inversion"] <= 16
    assert _peaks(_estimate(lora_batch_size=8))["lora"] > _peaks(base)["lora"]


@pytest.mark.parametrize("bad, message", [
    (dict(size=100), "multiple of 8"), (dict(method="warp"), "unknown method"), (dict(dtype="fp8"), "fp16 or bf16"),
    (dict(drag_steps=0), "drag-steps must be at least 1"),
    (dict(drag_steps=50, drag_max_steps=40), "must be at least drag-steps"),
    (dict(method="freedrag", drag_max_steps=400), "only AdaptiveDrag's budget grows"),
    (dict(node_weights="borrowed"), "node weights must be one of"),
])
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(InputError, match=message):
        EstimateConfig(**bad)


def test_cli_estimate_prints_the_full_size_report(tmp_path, capsys):
    """Full-size SD1.5 on meta at a small image: weights are SD1.5's, in the GPU's dtypes."""
    parser = argparse.ArgumentParser()
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "estimate.json"
    args = parser.parse_args(["bench", "estimate", "--size", "64", "--ddim-steps", "4", "--strength", "0.5",
                              "--sam2-size", "tiny", "--out", str(out)])
    assert args.run(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["unet_parameters"] == 859_520_964
    # UNet and CLIP text encoder in fp16, the VAE in fp32 (and CLIP's int64 position ids).
    assert report["weights_bytes"] == 2 * (859_520_964 + 123_060_480) + 4 * 83_653_863 + 8 * 77
    assert list(report["stages"]) == ["sam2_features", *STAGES]
    assert report["settings"]["closs"] is True and report["settings"]["lora_gradient_checkpointing"] is False
    # SAM2 tiny's weights are on the device for its stage only: the edit starts from SD1.5's weights alone.
    sam2_peak = report["stages"]["sam2_features"]["peak_bytes"]
    assert sam2_peak > report["weights_bytes"] + 38_000_000 * 4  # SAM2.1 tiny: about 39 M float32 parameters
    assert report["stages"]["prepare"]["peak_bytes"] < report["weights_bytes"] + 100 * 2**20
    assert report["stages"]["sam2_features"]["flop_per_step"] > 0
    edit_flop = sum(stage["edit_tflop"] for name, stage in report["stages"].items() if name != "sam2_features")
    assert report["first_edit_tflop"] == pytest.approx(edit_flop, abs=0.01)
