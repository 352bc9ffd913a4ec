"""``bench scene-model``'s feature tracking and latent transplant: the metrics themselves, and the shipped model."""

import statistics

import numpy as np
import pytest
import torch

from adaptivedrag_core.bench.scene_model_quality import (drawn_at_start_or_target, feature_tracking,
                                                         latent_transplant, moved_cells, tracking_error)
from adaptivedrag_core.scene_model import SceneModelSpec, build_scene_components, load_scene_model
from adaptivedrag_core.scenes import make_cases


def _maps(object_at: tuple[int, int], side: int = 8, channels: int = 3) -> torch.Tensor:
    """A feature map of a flat background with one distinctive cell, the "object", at (column, row)."""
    features = torch.zeros(1, channels, side, side)
    features[0, :, object_at[1], object_at[0]] = torch.tensor([5.0, -3.0, 2.0])
    return features


def test_an_object_found_where_it_went_scores_zero_and_one_left_behind_scores_one():
    # Maps at half the image's resolution, as the edit's (feature_scale 0.5): cell (c, r) covers pixels 2c..2c+2.
    before = _maps((1, 2))
    handle, target = (3.0, 5.0), (11.0, 5.0)  # the cell (1, 2) moved 4 cells right
    assert tracking_error(before, _maps((5, 2)), [handle], [target], image_size=16) == pytest.approx([0.0])
    assert tracking_error(before, before, [handle], [target], image_size=16) == pytest.approx([1.0])
    halfway = tracking_error(before, _maps((3, 2)), [handle], [target], image_size=16)
    assert halfway == pytest.approx([0.5])


def test_feature_tracking_gives_one_figure_per_drag_and_strength():
    spec = SceneModelSpec(native_size=64, unet_channels=(8, 8, 16, 16), unet_heads=2, vae_channels=(8, 8, 16, 16),
                          text_width=16, text_length=16, norm_groups=4)
    components = build_scene_components(spec)
    errors = feature_tracking(components, cases=2, strengths=(0.5, 0.2))
    assert set(errors) == {0.5, 0.2}
    drags = len(errors[0.5])
    assert drags >= 2 and len(errors[0.2]) == drags
    assert all(error >= 0 and error == error for error in errors[0.5] + errors[0.2])


def test_the_shipped_models_drag_features_find_a_moved_object_at_low_noise():
    # At strength 0.3 the trained model's up_blocks[2] features carry the objects (docs/quality.md); features from
    # the wrong block, the wrong timestep or an untrained UNet score about 1 (no better than not moving).
    errors = feature_tracking(load_scene_model(), cases=4, strengths=(0.3,))[0.3]
    assert statistics.median(errors) < 0.5


def test_the_moved_cells_cover_each_moved_objects_old_and_new_place_and_nothing_else():
    case = make_cases(1, 1000, 128)[0]
    cells = moved_cells(case, 16)
    (index, (dx, dy)), = case.moves.items()
    x0, y0, x1, y1 = case.scene.objects[index].bounds()
    for x, y in ((x0 + x1) / 2, (y0 + y1) / 2), ((x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy):  # centre, before and after
        assert cells[int(y // 8), int(x // 8)]
    near = np.zeros_like(cells)  # the cells of the object's bounds, before and after
    for x_from, y_from, x_to, y_to in (x0, y0, x1, y1), (x0 + dx, y0 + dy, x1 + dx, y1 + dy):
        near[int(y_from // 8):int(y_to // 8) + 1, int(x_from // 8):int(x_to // 8) + 1] = True
    assert cells.sum() > 2 and not (cells & ~near).any()


def test_an_object_counts_as_drawn_at_its_start_or_target_only_near_one_of_them():
    case = make_cases(1, 1000, 128)[0]
    (hx, hy), (tx, ty) = case.handles[0], case.targets[0]
    length = case.drag_lengths()[0]
    at = lambda fraction: [(hx + fraction * (tx - hx), hy + fraction * (ty - hy))]  # noqa: E731 (along the drag)
    assert drawn_at_start_or_target(case, at(0.0)) == [True] and drawn_at_start_or_target(case, at(1.1)) == [True]
    assert drawn_at_start_or_target(case, at(0.5)) == [False]
    assert drawn_at_start_or_target(case, [(hx - length, hy)]) == [False]


def test_the_shipped_models_sampler_draws_an_object_where_it_was_moved_in_the_inverted_latent():
    # At the papers' strength the transplanted object is drawn at its target (docs/quality.md: MD / drag median
    # 0.05 on 8 cases). Transplanting the wrong cells, or none, leaves it where it was (about 1).
    scores = latent_transplant(load_scene_model(), cases=4, strengths=(0.7,))[0.7]
    assert len(scores.iou) == 4 and len(scores.md_per_drag) > 4 and len(scores.halfway_kept) == len(scores.md_per_drag)
    assert statistics.median(scores.md_per_drag) < 0.5
