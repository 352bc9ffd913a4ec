"""What drag() asks of the feature function: starting features passed in are used as they are, and an evaluation
that no optimisation step follows runs without autograd and asks for the features alone. Results are bitwise those
of a run that computes everything itself, with gradients everywhere (tolerance zero)."""

import pytest
import torch

from adaptivedrag_core.bench.synthetic import conv_feature_fn
from adaptivedrag_core.drag import DragStart, drag, drag_start
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.features import make_feature_fn
from adaptivedrag_core.inversion import make_schedule

LATENT = 0.2 * torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
HANDLES, TARGETS = [(4.0, 4.0)], [(27.0, 27.0)]  # far: no handle arrives within these budgets
MASK = torch.zeros(32, 32, dtype=torch.bool)
MASK[:16] = True


class RecordedFeatures:
    """A feature function with a prediction (its features' mean, latent-shaped) and ``features_only``, recording
    for each call which of the two ran and whether autograd was on."""

    def __init__(self):
        self.features = conv_feature_fn(0)
        self.calls = []

    def __call__(self, latent):
        self.calls.append(("full", torch.is_grad_enabled()))
        features = self.features(latent)
        return features, latent + features.mean()

    def features_only(self, latent):
        self.calls.append(("features_only", torch.is_grad_enabled()))
        return self.features(latent)


def _plain(latent):
    """The same function without ``features_only``: every evaluation runs in full."""
    features = conv_feature_fn(0)(latent)
    return features, latent + features.mean()


def _assert_same_result(got, expected):
    assert torch.equal(got.latent, expected.latent)
    assert got.handles == expected.handles and got.steps == expected.steps
    assert torch.equal(got.handle_history, expected.handle_history)


@pytest.mark.parametrize("method, budget", [
    ("dragdiffusion", dict(max_steps=3)), ("adaptive", dict(n_steps=3, n_max=3)),
])
def test_the_last_tracking_evaluation_runs_without_gradient_on_the_features_alone(method, budget):
    recorded = RecordedFeatures()
    result = drag(LATENT, recorded, HANDLES, TARGETS, method=method, mask=MASK, **budget)
    assert result.steps == 3
    # The starting features, one evaluation per step (with autograd: a step follows), then the last tracking.
    assert recorded.calls == [("full", False)] + [("full", True)] * 3 + [("features_only", False)]
    _assert_same_result(result, drag(LATENT, _plain, HANDLES, TARGETS, method=method, mask=MASK, **budget))


def test_an_evaluation_that_may_be_followed_by_a_step_keeps_its_gradient():
    """Arrival is only known after tracking: the evaluation that finds it had to be ready for a step."""
    recorded = RecordedFeatures()
    result = drag(LATENT, recorded, HANDLES, [(5.0, 4.0)], method="adaptive", mask=MASK, n_steps=2, n_max=40)
    assert result.steps == 0 and result.converged
    assert recorded.calls == [("full", False), ("full", True)]


def test_freedrag_ends_each_drag_with_an_evaluation_without_gradient():
    recorded = RecordedFeatures()
    options = dict(max_steps=6, max_drag_steps=2, l=1e-6)  # tiny l: no drag ends early, each takes 2 steps
    result = drag(LATENT, recorded, HANDLES, TARGETS, method="freedrag", mask=MASK, **options)
    assert result.steps == 6
    assert recorded.calls == [("full", False)] + [("full", True), ("full", True), ("features_only", False)] * 3
    _assert_same_result(result, drag(LATENT, _plain, HANDLES, TARGETS, method="freedrag", mask=MASK, **options))


@pytest.mark.parametrize("method", ["dragdiffusion", "freedrag", "adaptive"])
def test_starting_features_passed_in_replace_the_first_evaluation(method):
    recorded = RecordedFeatures()
    start = drag_start(LATENT, _plain)
    budget = dict(n_steps=2, n_max=2) if method == "adaptive" else dict(max_steps=2)
    result = drag(LATENT, recorded, HANDLES, TARGETS, method=method, mask=MASK, start=start, **budget)
    assert recorded.calls[0] == ("full", True)  # no evaluation for the start
    _assert_same_result(result, drag(LATENT, _plain, HANDLES, TARGETS, method=method, mask=MASK, **budget))


def test_starting_features_must_fit():
    start = drag_start(LATENT, _plain)
    with pytest.raises(InputError, match="start must be a DragStart"):
        drag(LATENT, _plain, HANDLES, TARGETS, method="dragdiffusion", start=(start.features, start.prediction))
    with pytest.raises(InputError, match="prediction must have the latent's shape"):
        drag(LATENT, _plain, HANDLES, TARGETS, method="dragdiffusion",
             start=DragStart(start.features, start.prediction[:, :2]))


def test_unet_features_alone_stop_after_the_feature_block(tiny, empty_prompt):
    schedule = make_schedule(tiny.make_scheduler(), 50, 0.7)
    feature_fn = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16), with_prediction=True)
    later = []
    hook = tiny.unet.up_blocks[3].register_forward_hook(lambda *args: later.append(1))
    try:
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            features, _ = feature_fn(latent)
            assert len(later) == 1
            assert torch.equal(feature_fn.features_only(latent), features)
        assert len(later) == 1  # the last decoder block did not run
    finally:
        hook.remove()


def test_the_unet_is_whole_again_after_a_truncated_call_even_one_that_fails(tiny, empty_prompt):
    schedule = make_schedule(tiny.make_scheduler(), 50, 0.7)
    feature_fn = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16), with_prediction=False)
    modules = [(name, module) for name, module in tiny.unet.named_modules()]
    with pytest.raises(RuntimeError):
        feature_fn(torch.zeros(1, 3, 8, 8))  # wrong channel count: fails inside the UNet
    feature_fn(torch.zeros(1, 4, 8, 8))
    assert [(name, module) for name, module in tiny.unet.named_modules()] == modules
