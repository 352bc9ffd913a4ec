import torch

from adaptivedrag_core.features import make_feature_fn
from adaptivedrag_core.inversion import ddim_step, make_schedule


def test_feature_map_has_the_requested_size_and_carries_gradients(tiny, empty_prompt):
    schedule = make_schedule(tiny.make_scheduler(), 50, 0.7)
    feature_fn = make_feature_fn(tiny.unet, empty_prompt, schedule, feature_size=(24, 16), with_prediction=False)
    latent = torch.randn(1, 4, 8, 12, requires_grad=True)
    features = feature_fn(latent)
    assert features.shape == (1, tiny.unet.up_blocks[2].resnets[-1].out_channels, 16, 24)
    features[..., 3, 5].sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0


def test_early_exit_gives_the_same_features_as_the_full_unet(tiny, empty_prompt):
    schedule = make_schedule(tiny.make_scheduler(), 50, 0.7)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    short = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16), with_prediction=False)
    full = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16), with_prediction=True)
    with torch.no_grad():
        features, prediction = full(latent)
        assert torch.equal(short(latent), features)
        t = schedule.start_timestep
        noise = tiny.unet(latent, t, encoder_hidden_states=empty_prompt).sample
    assert torch.allclose(prediction, ddim_step(latent, noise, schedule, t, t - 20))
