"""The speed benchmark in CI size: the report's structure and step counts, never its times."""

import argparse
import json

import pytest
import torch

from adaptivedrag_core import cli_bench
from adaptivedrag_core.bench.speed import (
    MemoryClock,
    SpeedConfig,
    benchmark_image,
    far_drag,
    mask_stages,
    run_speed_benchmark,
)
from adaptivedrag_core.errors import InputError

EDIT_STAGES = {"prepare", "lora", "inversion", "reference", "drag", "sampling", "vae_decode"}
ALL_STAGES = EDIT_STAGES | {"sam2_features", "slic", "vae_encode", "sampling_closs", "sampling_no_closs"}
CI_SIZE = dict(size=64, lora_steps=2, num_steps=10, sam2_size="none")


def _parser():
    parser = argparse.ArgumentParser()
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _check_figures(figures: dict):
    assert figures["wall_s"] >= 0
    assert figures["peak_memory_bytes"] is None or figures["peak_memory_bytes"] > 0
    if figures["steps"] is not None:
        assert figures["steps"] > 0 and figures["per_step_s"] >= 0


def test_cli_speed_report_has_every_stage_and_the_requested_drag_steps(tmp_path, capsys):
    out = tmp_path / "speed.json"
    args = _parser().parse_args(["bench", "speed", "--size", "64", "--drag-steps", "3", "--lora-steps", "2",
                                 "--ddim-steps", "10", "--sam2-size", "none", "--cuda-graphs", "on", "--out", str(out)])
    assert args.run(args) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert set(report["stages"]) == ALL_STAGES
    assert set(report["warmup"]["stages"]) == ALL_STAGES
    assert EDIT_STAGES - {"lora", "inversion"} <= set(report["re_drag_stages"])
    for figures in [*report["stages"].values(), *report["re_drag_stages"].values()]:
        _check_figures(figures)
    stages = report["stages"]
    assert stages["drag"]["steps"] == report["drag_steps_run"] == report["drag_steps_requested"] == 3
    assert stages["lora"]["steps"] == 2
    assert stages["inversion"]["steps"] == stages["sampling"]["steps"] == 7  # 0.7 of 10 DDIM steps
    assert report["re_drag_stages"]["drag"]["steps"] == 3
    # The re-drag reuses LoRA, inversion and reference: no LoRA or inversion steps are run again.
    assert report["re_drag_stages"].get("lora", {}).get("steps") is None
    assert "inversion" not in report["re_drag_stages"]
    assert report["first_edit_s"] >= 0 and report["re_drag_s"] >= 0
    assert report["first_edit_peak_memory_bytes"] > 0
    assert report["environment"]["device"] == "cpu"
    # Asked for, but the CPU never captures CUDA graphs.
    assert report["config"]["cuda_graphs"] is True and report["cuda_graphs"] is False
    assert report["cuda_graph_failures"] == {}


@pytest.mark.parametrize("method", ["dragdiffusion", "freedrag"])
def test_drag_runs_the_fixed_number_of_steps(tiny, method):
    report = run_speed_benchmark(SpeedConfig(method=method, drag_steps=4, **CI_SIZE), components=tiny)
    assert report["stages"]["drag"]["steps"] == report["drag_steps_run"]
    if method == "dragdiffusion":
        assert report["drag_steps_run"] == 4
    else:  # FreeDrag may stop early; the report says so
        assert 1 <= report["drag_steps_run"] <= 4
        assert any("FreeDrag" in note for note in report["notes"])
    json.dumps(report)


class _FakeSam2:
    """Stands in for a Sam2Encoder: a module to move around and a feature map."""

    def __init__(self):
        self.model = torch.nn.Linear(1, 1)
        self.calls = 0

    def features(self, image):
        self.calls += 1
        return torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(0))


def test_mask_stages_time_the_encoder_and_slic():
    encoder = _FakeSam2()
    figures, result = mask_stages(benchmark_image(64), far_drag(64), encoder, MemoryClock(torch.device("cpu")),
                                  torch.device("cpu"))
    assert encoder.calls == 1 and result.mask.shape == (64, 64) and result.mask.any()
    assert set(figures) == {"sam2_features", "slic"}
    assert all(f.wall_s >= 0 for f in figures.values())


def test_far_drag_crosses_the_image():
    points = far_drag(128)
    (hx, hy), (tx, ty) = points.handles[0], points.targets[0]
    assert hx < 20 and hy < 20 and tx > 108 and ty > 108


@pytest.mark.parametrize("overrides, message", [
    (dict(size=60), "multiple of 8"),
    (dict(drag_steps=0), "drag-steps"),
    (dict(method="nope"), "unknown method"),
    (dict(sam2_size="huge"), "SAM2 size"),
])
def test_bad_config_is_an_input_error(overrides, message):
    with pytest.raises(InputError, match=message):
        SpeedConfig(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_input_error():
    with pytest.raises(InputError, match="no CUDA device"):
        SpeedConfig(device="cuda")
