"""AdaptiveDrag mechanisms (direction check, adaptive budget, superpixel radii) and end-to-end drags."""

import math

import pytest
import torch

from adaptivedrag_core.bench.synthetic import arrival, make_scene
from adaptivedrag_core.drag import drag
from adaptivedrag_core.drag.adaptive import PositionSupervisedPolicy, direction_check, superpixel_radii


def test_direction_check_rejects_a_step_away_from_the_target():
    previous = torch.tensor([[5.0, 5.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
    tracked = torch.tensor([[6.0, 5.0], [4.0, 5.0], [5.0, 6.0], [5.0, 5.0]])   # toward, away, sideways, still
    drag_direction = torch.tensor([[10.0, 0.0]] * 4)
    kept = direction_check(previous, tracked, drag_direction)
    assert kept.tolist() == [[6.0, 5.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]


def test_budget_grows_by_one_when_a_move_falls_short_of_l_over_n_up_to_n_max():
    handles, targets = torch.tensor([[0.0, 0.0]]), torch.tensor([[20.0, 0.0]])
    policy = PositionSupervisedPolicy(handles, targets, n_steps=10, n_max=12)     # ideal distance 2 px
    active = torch.tensor([True])
    policy.accept(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 0.0]]), active)   # 3 >= 2: no extension
    assert policy.total == 10
    policy.accept(torch.tensor([[3.0, 0.0]]), torch.tensor([[4.0, 0.0]]), active)   # 1 < 2: one more step
    assert policy.total == 11
    policy.accept(torch.tensor([[4.0, 0.0]]), torch.tensor([[2.0, 0.0]]), active)   # rejected: moved 0
    assert policy.total == 12 and policy.rejected_moves == 1
    policy.accept(torch.tensor([[4.0, 0.0]]), torch.tensor([[4.0, 0.0]]), active)   # capped at n_max
    assert policy.total == 12
    policy.accept(torch.tensor([[4.0, 0.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([False]))
    assert policy.extensions == 2


def test_superpixel_radii_follow_the_nearest_superpixel_centre():
    regions = (torch.arange(40)[None, :] // 10).expand(40, 40).contiguous()   # vertical stripes 10 px wide
    motion, tracking = superpixel_radii(regions, torch.tensor([[4.0, 20.0], [35.0, 3.0]]))
    # Stripe centres are 10 px apart: r_m = 10 // 7 = 1, r_p = 2 * 10 // 5 = 4.
    assert motion.tolist() == [1, 1] and tracking.tolist() == [4, 4]
    wide = (torch.arange(60)[None, :] // 30).expand(60, 60).contiguous()      # two stripes, centres 30 px apart
    motion, tracking = superpixel_radii(wide, torch.tensor([[10.0, 10.0]]))
    assert motion.tolist() == [4] and tracking.tolist() == [12]


@pytest.mark.parametrize("use_regions", [False, True])
def test_adaptive_moves_the_object_to_the_target(use_regions):
    scene = make_scene("long", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="adaptive",
                  mask=scene.mask, regions=scene.regions if use_regions else None)
    assert result.converged
    assert math.dist(result.handles[0], scene.targets[0]) <= 2.0
    assert arrival(scene, result.latent) > 0.1
    assert result.steps <= result.info["budget"] <= 300


def test_superpixel_radii_option_runs_and_reports_its_radii():
    scene = make_scene("short", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="adaptive",
                  regions=scene.regions, superpixel_radii=True, n_steps=10, n_max=10)
    expected_motion, expected_tracking = superpixel_radii(scene.regions, torch.tensor(scene.handles))
    assert result.info["motion_radii"] == expected_motion.tolist()
    assert result.info["tracking_radii"] == expected_tracking.tolist()
