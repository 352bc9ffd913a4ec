"""FreeDrag mechanisms pinned to exact expectations, and an end-to-end drag on a synthetic scene."""

import math

import pytest
import torch

from adaptivedrag_core.bench.synthetic import arrival, make_scene
from adaptivedrag_core.drag import drag
from adaptivedrag_core.drag.common import sample_features, window_offsets
from adaptivedrag_core.drag.freedrag import (
    FALLBACK,
    FORWARD,
    STAY,
    FreeDragOptions,
    backtracking_case,
    line_search,
    plan_next_points,
    template_update_coefficient,
)


@pytest.mark.parametrize("l", [1.0, 0.3, 4.0])
def test_template_coefficient_is_half_at_a_fifth_of_l_and_a_tenth_at_four_fifths(l):
    coefficient = template_update_coefficient(torch.tensor([0.2 * l, 0.8 * l]), l)
    assert torch.allclose(coefficient, torch.tensor([0.5, 0.1]), atol=1e-6)


def test_template_coefficient_is_capped():
    uncapped = template_update_coefficient(torch.tensor([0.0]), 1.0)
    assert math.isclose(float(uncapped), 1 / (1 + 9 ** (-1 / 3)), rel_tol=1e-6)   # the formula's own maximum
    assert float(template_update_coefficient(torch.tensor([0.0]), 1.0, lambda_max=0.5)) == 0.5


def _ramp(height=16, width=32):
    """One channel equal to x: the per-element patch distance between positions x1 and x2 is |x1 - x2|."""
    return torch.arange(width, dtype=torch.float32).expand(height, width)[None, None].clone()


def test_line_search_picks_the_candidate_whose_template_distance_is_closest_to_l():
    features = _ramp()
    offsets = window_offsets(1)
    template = sample_features(features, torch.tensor([[4.0, 8.0]])[:, None, :] + offsets[None])   # from x = 4
    chosen = line_search(features, starts=torch.tensor([[4.0, 8.0]]), directions=torch.tensor([[1.0, 0.0]]),
                         reach=torch.tensor([5.0]), templates=template, expected=torch.tensor([1.5]),
                         offsets=offsets, candidates=10)
    # Candidates at x = 4.5, 5, ..., 9 have distances 0.5, 1, ..., 5: 1.5 is at x = 5.5.
    assert torch.allclose(chosen, torch.tensor([[5.5, 8.0]]))


def test_backtracking_cases_follow_equation_9():
    loss_in = torch.tensor([0.9, 0.9, 0.9, 0.3])
    loss_end = torch.tensor([0.5, 0.7, 1.2, 0.6])
    assert backtracking_case(loss_in, loss_end, l=1.0).tolist() == [FORWARD, STAY, FALLBACK, FALLBACK]


def _plan(case, template_x):
    features = _ramp()
    options = FreeDragOptions(l=1.0, d=5.0, window_radius=1)
    offsets = window_offsets(1)
    template = sample_features(features, torch.tensor([[template_x, 8.0]])[:, None, :] + offsets[None])
    return plan_next_points(features, torch.tensor([[10.0, 8.0]]), torch.tensor([[30.0, 8.0]]), template,
                            torch.tensor([case]), offsets, options)


def test_forward_branch_searches_ahead_for_distance_l():
    # Template from x = 10 (the current point): forward candidates 10.5, 11, .., 15; distance 1 at x = 11.
    assert torch.allclose(_plan(FORWARD, 10.0), torch.tensor([[11.0, 8.0]]))


def test_stay_branch_keeps_the_point():
    assert torch.allclose(_plan(STAY, 10.0), torch.tensor([[10.0, 8.0]]))


def test_fallback_branch_searches_from_behind_over_twice_d_with_l_zero():
    # Start at 10 - 5 = 5, candidates 6, 7, .., 15; with l = 0 the one at the template (x = 7) wins, although
    # x = 11 is at distance 4 ~ l and would win a forward search.
    assert torch.allclose(_plan(FALLBACK, 7.0), torch.tensor([[7.0, 8.0]]))


def test_each_branch_is_taken_in_a_full_run_built_to_trigger_it():
    scene = make_scene("long", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="freedrag",
                  lr=2.0, max_steps=60)   # an oversized step overshoots: drags stall (stay) or get worse (fall back)
    assert all(count > 0 for count in result.info["cases"].values()), result.info


def test_freedrag_moves_the_object_to_the_target():
    scene = make_scene("long", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="freedrag", mask=scene.mask)
    assert result.converged
    assert math.dist(result.handles[0], scene.targets[0]) <= 2.0
    assert arrival(scene, result.latent) > 0.2
    assert result.steps <= 300 and result.handle_history.shape[1:] == (1, 2)


def test_every_drag_takes_at_least_one_optimisation_step():
    """With l this large every drag starts below 0.5 l; before, such drags took no step at all (the raw-scale
    l = 1 did that on the synthetic features), so the template moved while the latent did not."""
    scene = make_scene("short", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="freedrag", l=100.0)
    drags = len(result.handle_history) - 1
    assert drags >= 1 and result.steps >= drags
    assert not torch.equal(result.latent, scene.latent)
