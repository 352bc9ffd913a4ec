"""CUDA graphs: when they are used, and the eager fallback when a capture fails; the CPU never captures.

No GPU here: the capture functions are replaced by ones that raise (as a capture that hits something it cannot
record does) or that fail the test if they are reached at all.
"""

import logging

import numpy as np
import pytest
import torch

from adaptivedrag_core import graphs as graphs_module
from adaptivedrag_core.features import make_feature_fn
from adaptivedrag_core.graphs import GraphedFeatures, NoiseStep, ReplayedStep, StepGraphs, use_cuda_graphs
from adaptivedrag_core.inversion import make_schedule, unet_noise_fn
from adaptivedrag_core.lora import train_identity_lora
from adaptivedrag_core.models import tiny_sd_components
from adaptivedrag_core.pipeline import DragPipeline, EditSettings, step_budget
from adaptivedrag_core.points import DragPoints

CAPTURE_ERROR = "operation not permitted when stream is capturing"


@pytest.mark.parametrize("setting, device, expected", [
    (None, "cuda", True), (True, "cuda:0", True), (False, "cuda", False),
    (None, "cpu", False), (True, "cpu", False), (True, "meta", False),
])
def test_graphs_are_on_by_default_on_cuda_and_never_elsewhere(setting, device, expected):
    assert use_cuda_graphs(setting, device) is expected
    assert StepGraphs(device, setting).enabled is expected


def _failing_capture(calls: list):
    """Stand-ins for the CUDA functions: the warm-up runs eagerly, every capture raises."""

    def warm_up(fn, graphs):
        calls.append("warm-up")
        return fn()

    def capture(*args, **kwargs):
        calls.append("capture")
        raise RuntimeError(f"CUDA error: {CAPTURE_ERROR}")

    return warm_up, capture


@pytest.fixture
def failing_captures(monkeypatch):
    """Graphs 'enabled' on the CPU, with every capture raising; yields the list of calls made to the CUDA side."""
    calls = []
    warm_up, capture = _failing_capture(calls)
    monkeypatch.setattr(graphs_module, "warm_up", warm_up)
    monkeypatch.setattr(graphs_module, "capture_graph", capture)
    monkeypatch.setattr(graphs_module, "capture_differentiable", capture)
    return calls


def _enabled_on_cpu() -> StepGraphs:
    graphs = StepGraphs("cpu")
    graphs.enabled = True  # as on CUDA; the capture functions are stand-ins
    return graphs


def test_a_failed_capture_falls_back_to_eager_and_logs_once(failing_captures, caplog):
    graphs = _enabled_on_cpu()
    runs, resets = [], []
    step = ReplayedStep(lambda: runs.append(1) or len(runs), graphs, "identity LoRA",
                        on_failure=lambda: resets.append(1))
    with caplog.at_level(logging.WARNING, logger="adaptivedrag_core.graphs"):
        results = [step() for _ in range(4)]
    assert results == [1, 2, 3, 4]  # every call runs the step exactly once, whatever happened to the capture
    assert failing_captures == ["warm-up", "capture"] and resets == [1]
    assert "identity LoRA" in graphs.failures and CAPTURE_ERROR in graphs.failures["identity LoRA"]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "identity LoRA" in warnings[0] and CAPTURE_ERROR in warnings[0]
    # A later stage of the same edit does not try again.
    again = ReplayedStep(lambda: "eager", graphs, "identity LoRA")
    assert again() == again() == "eager" and failing_captures == ["warm-up", "capture"]


def test_failed_captures_of_the_drag_and_sampling_steps_give_eager_results(tiny, empty_prompt, failing_captures,
                                                                           caplog):
    graphs = _enabled_on_cpu()
    schedule = make_schedule(tiny.make_scheduler(), 10, 0.7)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    feature_fn = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16))
    graphed = GraphedFeatures(feature_fn, graphs)
    noise = NoiseStep(unet_noise_fn(tiny.unet, empty_prompt), graphs, "sampling")
    plain_noise = unet_noise_fn(tiny.unet, empty_prompt)
    with caplog.at_level(logging.WARNING, logger="adaptivedrag_core.graphs"):
        for _ in range(2):
            variable = latent.clone().requires_grad_(True)
            features, prediction = graphed(variable)
            expected_features, expected_prediction = feature_fn(latent.clone().requires_grad_(True))
            assert torch.equal(features, expected_features) and torch.equal(prediction, expected_prediction)
            assert torch.equal(noise(variable, 21), plain_noise(variable, 21))
            with torch.no_grad():
                assert torch.equal(noise(latent, 21), plain_noise(latent, 21))
    assert sorted(graphs.failures) == ["drag", "sampling", "sampling backward"]
    assert failing_captures.count("capture") == 3  # once per kind of step
    assert len(caplog.records) == 3


def test_lora_training_after_a_failed_capture_is_the_eager_training(tiny, empty_prompt, failing_captures):
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    settings = dict(steps=3, rank=4, lr=5e-3, batch_size=2, seed=0)
    eager = train_identity_lora(tiny.unet, latent, empty_prompt, **settings)
    graphs = _enabled_on_cpu()
    fallen_back = train_identity_lora(tiny.unet, latent, empty_prompt, graphs=graphs, **settings)
    assert list(graphs.failures) == ["identity LoRA"]
    assert all(torch.equal(fallen_back[key], eager[key]) for key in eager)


def test_the_cpu_never_captures_even_when_asked(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a CUDA graph was attempted on the CPU")

    for name in ("warm_up", "capture_graph", "capture_differentiable", "shared_pool"):
        monkeypatch.setattr(graphs_module, name, must_not_run)
    rng = np.random.default_rng(0)
    from PIL import Image

    image = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    settings = EditSettings(method="adaptive", work_size=64, lora_steps=3, num_steps=10, cuda_graphs=True,
                            drag_options=step_budget("adaptive", 3))
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    result = pipeline.edit(image, points, settings, mask=np.ones((40, 48), bool))
    assert result.image.size == image.size and pipeline.graph_failures == {}
