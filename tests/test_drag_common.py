"""drag(): input checks, sampling, tracking, semantic patches, progress, inference mode, determinism."""

import pytest
import torch

from adaptivedrag_core.bench.synthetic import make_scene
from adaptivedrag_core.drag import METHODS, EmptyMaskWarning, drag
from adaptivedrag_core.drag.common import PatchGeometry, motion_supervision_loss, sample_features, track_points
from adaptivedrag_core.errors import InputError


#: Small budgets: these tests check plumbing, not convergence.
QUICK = {"dragdiffusion": {"max_steps": 8}, "freedrag": {"max_steps": 8}, "adaptive": {"n_steps": 8, "n_max": 12}}


@pytest.fixture(scope="module")
def scene():
    return make_scene("short", seed=0)


def _call(scene, **overrides):
    arguments = dict(latent=scene.latent, feature_fn=scene.feature_fn, handles=scene.handles,
                     targets=scene.targets, method="dragdiffusion")
    arguments.update(overrides)
    if arguments["method"] == "dragdiffusion":
        arguments.setdefault("max_steps", 2)
    return drag(**arguments)


@pytest.mark.parametrize("overrides, message", [
    (dict(targets=[(1.0, 1.0), (2.0, 2.0)]), "1 handles but 2 targets"),
    (dict(handles=[(40.0, 3.0)]), "outside the 32x32 feature map"),
    (dict(targets=[(3.0, -0.5)]), "outside the 32x32 feature map"),
    (dict(mask=torch.ones(16, 16, dtype=torch.bool)), "mask must have the feature map's shape"),
    (dict(regions=torch.zeros(32, 31, dtype=torch.int64)), "regions must have the feature map's shape"),
    (dict(method="dragdiffusion++"), "unknown drag method 'dragdiffusion++'"),
    (dict(radius=3), "unknown option(s) radius for method 'dragdiffusion'; valid options: lam, lr, max_steps"),
    (dict(max_steps=0), "max_steps must be a positive number"),
    (dict(method="adaptive", n_steps=100, n_max=50), "n_max (50) must be at least n_steps (100)"),
    (dict(method="adaptive", superpixel_radii=True), "superpixel_radii needs regions"),
    (dict(method="adaptive", direction_check="target"), "direction_check must be one of start, current"),
    (dict(method="adaptive", superpixel_scale=0), "superpixel_scale must be a positive number"),
    (dict(method="freedrag", l=-1.0), "l must be a positive number"),
    (dict(handles=[]), "they must pair up"),
    (dict(handles=[], targets=[]), "at least one handle/target pair"),
    (dict(latent=torch.zeros(4, 16, 16)), "latent must be a tensor of shape [1,C,h,w]"),
])
def test_invalid_arguments_raise_value_error_naming_the_problem(scene, overrides, message):
    with pytest.raises(ValueError) as caught:
        _call(scene, **overrides)
    assert isinstance(caught.value, InputError)
    assert message in str(caught.value)


def test_feature_fn_with_a_badly_shaped_prediction_is_rejected(scene):
    with pytest.raises(InputError, match="prediction must have the latent's shape"):
        _call(scene, feature_fn=lambda z: (scene.feature_fn(z), z[:, :2]))


def test_sample_features_is_exact_bilinear_interpolation():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij")
    features = torch.stack([xs, ys, xs * ys])[None]
    sampled = sample_features(features, torch.tensor([[2.25, 3.5], [9.0, 7.0]]))
    assert torch.allclose(sampled[:, :2], torch.tensor([[2.25, 3.5], [9.0, 7.0]]), atol=1e-5)
    # x*y is bilinear inside a cell, so bilinear sampling reproduces it.
    assert torch.allclose(sampled[:, 2], torch.tensor([2.25 * 3.5, 63.0]), atol=1e-4)


def test_tracking_finds_the_reference_feature_inside_the_window_only():
    features = torch.zeros(1, 3, 16, 16)
    reference = torch.tensor([[1.0, 2.0, 3.0]])
    features[0, :, 9, 6] = reference[0]      # (x=6, y=9): 2 px from the handle at (5, 8)... inside r_p = 3
    features[0, :, 2, 14] = reference[0]     # far away: outside the window
    geometry = PatchGeometry(torch.tensor([[5.0, 8.0]]), torch.tensor([1]), torch.tensor([3]), (16, 16))
    assert track_points(features, reference, torch.tensor([[5.0, 8.0]]), geometry).tolist() == [[6.0, 9.0]]


def _two_region_features():
    """Left half (x < 8) region 0, right half region 1; the right half holds a perfect match for the reference."""
    features = torch.zeros(1, 2, 16, 16)
    features[0, 0, :, :8] = 0.5
    features[0, 0, :, 8:] = 1.0
    regions = torch.zeros(16, 16, dtype=torch.int64)
    regions[:, 8:] = 1
    return features, regions


def test_semantic_region_keeps_tracking_out_of_the_neighbouring_region():
    features, regions = _two_region_features()
    reference = torch.tensor([[1.0, 0.0]])   # looks like the right-hand region
    handle = torch.tensor([[6.0, 8.0]])      # but the handle is in the left-hand region
    target = torch.tensor([[6.0, 15.0]])     # down, along its own region: plenty of it lies ahead
    square = PatchGeometry(handle, torch.tensor([1]), torch.tensor([3]), (16, 16))
    semantic = PatchGeometry(handle, torch.tensor([1]), torch.tensor([3]), (16, 16), regions, target)
    assert track_points(features, reference, handle, square)[0, 0] >= 8       # jumps into the neighbour
    assert track_points(features, reference, handle, semantic)[0, 0] < 8      # stays in its own region


def test_semantic_region_excludes_neighbouring_features_from_motion_supervision():
    features, regions = _two_region_features()
    features = features + 0.1 * torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    features.requires_grad_(True)
    handle, target = torch.tensor([[7.0, 8.0]]), torch.tensor([[7.0, 14.0]])   # moving down, along the border
    semantic = PatchGeometry(handle, torch.tensor([2]), torch.tensor([3]), (16, 16), regions, target)
    weights = semantic.motion_weights(handle)
    positions = semantic.positions(handle, semantic.motion_offsets)
    assert weights.any() and (positions[weights][:, 0] < 8).all()
    loss = motion_supervision_loss(features, handle, target, semantic, torch.tensor([True]))
    loss.backward()
    # No gradient reaches the right-hand region beyond the bilinear neighbour column (x = 8).
    assert features.grad[0, :, :, 9:].abs().sum() == 0
    square = PatchGeometry(handle, torch.tensor([2]), torch.tensor([3]), (16, 16))
    features.grad = None
    motion_supervision_loss(features, handle, target, square, torch.tensor([True])).backward()
    assert features.grad[0, :, :, 9:].abs().sum() > 0


def test_semantic_region_moves_with_the_handle():
    regions = torch.zeros(16, 16, dtype=torch.int64)
    regions[:, 8:] = 1
    start = torch.tensor([[6.0, 8.0]])
    geometry = PatchGeometry(start, torch.tensor([1]), torch.tensor([2]), (16, 16), regions,
                             targets=torch.tensor([[6.0, 0.0]]))  # up, along the region
    moved = torch.tensor([[9.0, 8.0]])       # three pixels right: now inside region 1 of the original map
    weights = geometry.tracking_weights(moved)
    positions = geometry.positions(moved, geometry.tracking_offsets)
    # The allowed positions are the original region's shape shifted by 3: x - 3 < 8.
    assert set(positions[weights][:, 0].tolist()) == {7.0, 8.0, 9.0, 10.0}


def test_a_region_with_little_of_it_ahead_of_the_handle_falls_back_to_a_half_disc_facing_the_target():
    regions = torch.zeros(16, 16, dtype=torch.int64)
    regions[:, 8:] = 1
    handle = torch.tensor([[7.0, 8.0]])               # on the right-hand edge of region 0
    toward_region_1 = PatchGeometry(handle, torch.tensor([1]), torch.tensor([2]), (16, 16), regions,
                                    targets=torch.tensor([[14.0, 8.0]]))
    offsets = toward_region_1.tracking_offsets
    kept = {tuple(o) for o in offsets[toward_region_1.tracking_weights(handle)[0]].tolist()}
    # The half-disc of radius 2 facing +x: it reaches into region 1, so the handle can be tracked forward.
    assert kept == {(dx, dy) for dx, dy in offsets.tolist() if dx >= 0 and dx * dx + dy * dy <= 4}
    # Dragged along its region instead, plenty of it lies ahead: the region itself (x < 8), no fallback.
    along = PatchGeometry(handle, torch.tensor([1]), torch.tensor([2]), (16, 16), regions,
                          targets=torch.tensor([[7.0, 15.0]]))
    kept = {tuple(o) for o in offsets[along.tracking_weights(handle)[0]].tolist()}
    assert kept == {(dx, dy) for dx, dy in offsets.tolist() if dx <= 0}


def test_mask_is_resized_centre_aligned_like_every_other_map():
    from adaptivedrag_core.drag.common import resize_nearest
    from adaptivedrag_core.images import resize_labels

    generator = torch.Generator().manual_seed(0)
    for size, new_size in (((32, 32), (16, 16)), ((30, 44), (16, 12)), ((16, 16), (40, 40))):
        mask = torch.rand(size, generator=generator) > 0.5
        expected = resize_labels(mask.numpy(), new_size[1], new_size[0])
        assert torch.equal(resize_nearest(mask, new_size), torch.from_numpy(expected))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_empty_mask_is_no_mask_with_a_warning(scene, method):
    without = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method, **QUICK[method])
    with pytest.warns(EmptyMaskWarning, match="empty"):
        empty = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method,
                     mask=torch.zeros(32, 32, dtype=torch.bool), **QUICK[method])
    assert torch.equal(empty.latent, without.latent) and empty.handles == without.handles


@pytest.mark.parametrize("method", sorted(METHODS))
def test_progress_is_called_every_step_and_may_cancel(scene, method):
    calls = []
    drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method,
         progress=lambda step, total: calls.append(step), **QUICK[method])
    assert calls == list(range(1, len(calls) + 1)) and calls

    class Cancelled(Exception):
        pass

    def cancel(step, total):
        if step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method, progress=cancel,
             **QUICK[method])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_runs_inside_inference_mode_without_touching_the_input(scene, method):
    with torch.inference_mode():
        latent = scene.latent.clone()
        result = drag(latent, scene.feature_fn, scene.handles, scene.targets, method=method, mask=scene.mask,
                      **QUICK[method])
    assert torch.equal(latent, scene.latent)
    assert result.steps > 0 and not result.latent.requires_grad
    assert not torch.equal(result.latent, scene.latent)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_is_deterministic(scene, method):
    first = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method,
                 regions=scene.regions, **QUICK[method])
    second = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method=method,
                  regions=scene.regions, **QUICK[method])
    assert torch.equal(first.latent, second.latent) and first.handles == second.handles


def test_mask_term_uses_the_prediction_when_given(scene):
    """A prediction that ignores the latent leaves the mask term at zero: the result equals the maskless run."""
    constant = torch.zeros_like(scene.latent)
    with_prediction = _call(scene, feature_fn=lambda z: (scene.feature_fn(z), constant + 0 * z.sum()),
                            mask=scene.mask, max_steps=5)
    without_mask = _call(scene, max_steps=5)
    with_latent_mask = _call(scene, mask=scene.mask, max_steps=5)
    assert torch.allclose(with_prediction.latent, without_mask.latent)
    assert not torch.allclose(with_latent_mask.latent, without_mask.latent)
