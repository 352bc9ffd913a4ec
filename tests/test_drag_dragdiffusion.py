"""DragDiffusion end to end on a synthetic scene, and what the mask term protects."""

import math

import torch

from adaptivedrag_core.bench.synthetic import arrival, change_ratio, make_scene
from adaptivedrag_core.drag import drag


def test_dragdiffusion_moves_the_object_to_the_target():
    scene = make_scene("short", seed=0)
    result = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="dragdiffusion",
                  mask=scene.mask)
    assert result.converged and result.steps < 80
    assert math.dist(result.handles[0], scene.targets[0]) <= 2.0
    assert arrival(scene, result.latent) > 0.2
    history = result.handle_history
    assert history[0].tolist() == [list(scene.handles[0])] and len(history) == result.steps + 1


def test_mask_term_keeps_the_outside_nearly_unchanged():
    scene = make_scene("short", seed=0)
    unmasked = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="dragdiffusion",
                    max_steps=30)
    masked = drag(scene.latent, scene.feature_fn, scene.handles, scene.targets, method="dragdiffusion",
                  max_steps=30, mask=scene.mask)
    assert change_ratio(scene, masked.latent) < 0.5 * change_ratio(scene, unmasked.latent)
    assert not torch.equal(masked.latent, scene.latent)
