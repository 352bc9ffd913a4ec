"""Backward passes through a float16 UNet: with dynamic loss scaling the latent's gradient points where the
float32 one does, also when it is far below float16's smallest normal number (6e-5)."""

import copy

import pytest
import torch

from adaptivedrag_core.drag.closs import correspondence_loss
from adaptivedrag_core.drag.common import LatentAdam, LossScaler, PatchGeometry, motion_supervision_loss
from adaptivedrag_core.features import make_feature_fn
from adaptivedrag_core.inversion import make_schedule, predict_clean, unet_noise_fn

#: Loss weights that make the tiny model's latent gradients as small as a full-size UNet's, where float16 flushes
#: many to zero or rounds them coarsely unscaled: gradient cosine to float32 without the scaler 0.59 (drag) and
#: 0.87 (CLoss) here, against 1.000 with it.
SMALL = {"drag": 1e-5, "closs": 1e-7}
HANDLES, TARGETS = torch.tensor([[8.0, 8.0]]), torch.tensor([[20.0, 14.0]])


@pytest.fixture(scope="module")
def unets(tiny):
    """The tiny UNet in float32 and float16 (copies: the session's model must not change)."""
    copies = {}
    for dtype in (torch.float32, torch.float16):
        unet = copy.deepcopy(tiny.unet)
        torch.nn.Module.to(unet, dtype=dtype)
        copies[dtype] = unet
    return copies


def _drag_loss(unet, prompt, schedule, latent):
    features = make_feature_fn(unet, prompt, schedule, (32, 32), with_prediction=False)(latent)
    geometry = PatchGeometry(HANDLES, torch.tensor([1]), torch.tensor([3]), (32, 32))
    return motion_supervision_loss(features, HANDLES, TARGETS, geometry, torch.tensor([True]))


def _closs_loss(unet, prompt, schedule, latent):
    timestep = schedule.start_timestep
    noise = unet_noise_fn(unet, prompt)(latent, timestep)
    clean = predict_clean(latent, noise.float(), schedule.alpha(timestep))
    original = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return correspondence_loss(clean, original, [(4.0, 4.0)], [(10.0, 7.0)], kind="mse", patch_radius=2)


@pytest.mark.parametrize("loss_fn, weight", [(_drag_loss, SMALL["drag"]), (_closs_loss, SMALL["closs"])],
                         ids=["drag", "closs"])
def test_half_precision_gradient_points_where_the_float32_one_does(tiny, empty_prompt, unets, loss_fn, weight):
    schedule = make_schedule(tiny.make_scheduler(), 10, 0.7)
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    gradients = {}
    for dtype, unet in unets.items():
        optimizer = LatentAdam(latent, lr=0.01, compute_dtype=dtype)
        gradients[dtype] = optimizer.backward(weight * loss_fn(unet, empty_prompt.to(dtype), schedule,
                                                               optimizer.latent))
    half, full = gradients[torch.float16], gradients[torch.float32]
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float(torch.nn.functional.cosine_similarity(half.flatten(), full.flatten(), dim=0)) >= 0.999
    assert float(half.norm() / full.norm()) == pytest.approx(1.0, abs=0.01)   # unscaled again


def test_overflow_halves_the_scale_and_repeats_the_backward_pass():
    scaler = LossScaler(torch.float16)
    tensor = torch.ones(3, requires_grad=True)
    # 1e3 x 2**16 overflows float16 (max 65504), so the scale must come down to 2**5 before the gradient fits.
    gradient = scaler.gradient((tensor.half() * 1e3).float().sum(), tensor)
    assert torch.equal(gradient, torch.full((3,), 1e3))
    assert scaler.scale <= 2.0 ** 6


def test_no_scaling_for_float32():
    scaler = LossScaler(torch.float32)
    tensor = torch.ones(2, requires_grad=True)
    assert torch.equal(scaler.gradient((3 * tensor).sum(), tensor), torch.full((2,), 3.0)) and scaler.scale == 1.0
