"""``bench scene-model``'s feature tracking: the metric itself, and the shipped model's features at low noise."""

import statistics

import pytest
import torch

from adaptivedrag_core.bench.scene_model_quality import feature_tracking, tracking_error
from adaptivedrag_core.scene_model import SceneModelSpec, build_scene_components, load_scene_model


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
