"""AdaptiveDrag mechanisms (direction check, adaptive budget, superpixel radii, the semantic region's fallback)
and end-to-end drags."""

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


@pytest.mark.parametrize("reference, corrected", [("start", False), ("current", True)])
def test_an_overshoot_can_be_corrected_only_when_moves_are_checked_against_the_current_handle(reference, corrected):
    policy = PositionSupervisedPolicy(torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, 0.0]]), n_steps=10, n_max=20,
                                      reference=reference)
    active = torch.tensor([True])
    # The handle passed its target (13 > 10); tracking brings it back to 11, toward the target but against p -> t.
    kept = policy.accept(torch.tensor([[13.0, 0.0]]), torch.tensor([[11.0, 0.0]]), active)
    assert kept.tolist() == ([[11.0, 0.0]] if corrected else [[13.0, 0.0]])
    # Before the target both readings keep a forward move and reject a backward one.
    assert policy.accept(torch.tensor([[4.0, 0.0]]), torch.tensor([[5.0, 0.0]]), active).tolist() == [[5.0, 0.0]]
    assert policy.accept(torch.tensor([[4.0, 0.0]]), torch.tensor([[3.0, 0.0]]), active).tolist() == [[4.0, 0.0]]


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


def test_superpixel_radii_at_the_public_codes_scale_measure_the_distance_in_image_pixels():
    regions = (torch.arange(40)[None, :] // 10).expand(40, 40).contiguous()   # centres 10 feature px apart
    motion, tracking = superpixel_radii(regions, torch.tensor([[4.0, 20.0]]), scale=2.0)
    assert motion.tolist() == [20 // 7] and tracking.tolist() == [2 * 20 // 5]


def test_a_handle_on_the_target_facing_edge_of_its_superpixel_still_moves():
    """Seen before the fallback: the handle stayed put for all 300 steps, 291 moves rejected."""
    scene = make_scene("long", seed=0)
    (handle_x, _), = scene.handles
    height, width = scene.regions.shape
    # Two regions split right at the handle: nothing of its own region lies ahead of it.
    regions = (torch.arange(width)[None, :] > round(handle_x)).long().expand(height, width).contiguous()
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="adaptive",
                  mask=scene.mask, regions=regions)
    assert result.converged and result.steps < 150
    assert arrival(scene, result.latent) > 0.1


@pytest.mark.parametrize("reference", ["start", "current"])
def test_both_direction_checks_reach_the_target(reference):
    scene = make_scene("long", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="adaptive",
                  mask=scene.mask, regions=scene.regions, direction_check=reference)
    assert result.converged and arrival(scene, result.latent) > 0.1


def test_superpixel_radii_option_runs_and_reports_its_radii():
    scene = make_scene("short", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="adaptive",
                  regions=scene.regions, superpixel_radii=True, n_steps=10, n_max=10)
    expected_motion, expected_tracking = superpixel_radii(scene.regions, torch.tensor(scene.handles))
    assert result.info["motion_radii"] == expected_motion.tolist()
    assert result.info["tracking_radii"] == expected_tracking.tolist()
