import pytest
import torch

from adaptivedrag_core import sampling
from adaptivedrag_core.drag import EmptyMaskWarning
from adaptivedrag_core.drag.closs import correspondence_loss
from adaptivedrag_core.inversion import make_schedule
from adaptivedrag_core.sampling import CLossSettings, record_reference, sample_dragged

HANDLES, TARGETS = [(4.0, 4.0)], [(10.0, 9.0)]


@pytest.fixture(scope="module")
def setup(tiny, empty_prompt):
    schedule = make_schedule(tiny.make_scheduler(), 10, 0.7)
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(1, 4, 16, 16, generator=generator)
    inverted = torch.randn(1, 4, 16, 16, generator=generator)
    reference = record_reference(tiny.unet, empty_prompt, schedule, inverted)
    return schedule, original, inverted, reference


def _sample(tiny, empty_prompt, setup, closs):
    schedule, original, inverted, reference = setup
    return sample_dragged(tiny.unet, empty_prompt, schedule, inverted, reference, closs=closs,
                          original_latent=original, handles=HANDLES, targets=TARGETS)


@pytest.mark.parametrize("kind", ["contrastive", "mse"])
def test_closs_pulls_the_target_patch_toward_the_handle_patch(tiny, empty_prompt, setup, kind):
    original = setup[1]
    plain = _sample(tiny, empty_prompt, setup, None)
    pulled = _sample(tiny, empty_prompt, setup, CLossSettings(kind=kind, weight=5.0))
    before = correspondence_loss(plain, original, HANDLES, TARGETS, kind=kind)
    after = correspondence_loss(pulled, original, HANDLES, TARGETS, kind=kind)
    assert after < before


def test_zero_weight_is_no_closs(tiny, empty_prompt, setup):
    plain = _sample(tiny, empty_prompt, setup, None)
    assert torch.equal(_sample(tiny, empty_prompt, setup, CLossSettings(weight=0.0)), plain)


def test_closs_needs_points(tiny, empty_prompt, setup):
    schedule, original, inverted, reference = setup
    with pytest.raises(ValueError, match="CLoss needs"):
        sample_dragged(tiny.unet, empty_prompt, schedule, inverted, reference, closs=CLossSettings())


def test_guidance_scale_one_is_no_guidance_and_replay_matches_the_guided_recording(tiny, empty_prompt):
    from adaptivedrag_core.models import encode_prompt

    schedule = make_schedule(tiny.make_scheduler(), 6, 0.7)
    inverted = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompt = encode_prompt(tiny, "a red ball")
    plain = record_reference(tiny.unet, prompt, schedule, inverted).reconstruction
    scale_one = record_reference(tiny.unet, prompt, schedule, inverted, uncond_embeddings=empty_prompt,
                                 guidance_scale=1.0).reconstruction
    assert torch.equal(plain, scale_one)
    guided = record_reference(tiny.unet, prompt, schedule, inverted, uncond_embeddings=empty_prompt,
                              guidance_scale=5.0)
    assert not torch.allclose(guided.reconstruction, plain, atol=1e-3)
    # Denoising the reference with its own guided recording, with the same guidance, gives it back.
    again = sample_dragged(tiny.unet, prompt, schedule, inverted, guided, uncond_embeddings=empty_prompt,
                           guidance_scale=5.0)
    assert torch.allclose(again, guided.reconstruction, atol=1e-5)



@pytest.mark.parametrize("kind", ["contrastive", "mse"])
def test_the_closs_step_changes_nothing_outside_the_targets_neighbourhood_and_the_mask(tiny, empty_prompt, setup,
                                                                                       monkeypatch, kind):
    """Adam moves every element it is given by about lr on its first step, whatever the gradient: unconfined,
    CLoss changed the whole latent."""
    schedule, original, inverted, reference = setup
    # Without the DDIM step, whatever changes the latent is the CLoss step.
    monkeypatch.setattr(sampling, "ddim_step", lambda latent, noise, schedule, t, t_prev: latent)
    closs = CLossSettings(kind=kind, patch_radius=2, steps=1)
    result = _sample(tiny, empty_prompt, setup, closs)
    assert torch.equal(result[..., :2, :2], inverted[..., :2, :2])   # the corner, far from the target (10, 9)
    changed = (result != inverted).any(dim=1)[0]
    region = closs.region(inverted.shape[-2:], TARGETS)
    assert changed.any() and not changed[~region].any() and 0 < int(region.sum()) < region.numel()

    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :11] = True                                                # cuts the target's square in two
    masked = sample_dragged(tiny.unet, empty_prompt, schedule, inverted, reference, closs=closs,
                            original_latent=original, handles=HANDLES, targets=TARGETS, mask=mask)
    changed = (masked != inverted).any(dim=1)[0]
    assert changed.any() and not changed[~(region & mask)].any()


def test_an_empty_mask_is_no_mask_with_a_warning(tiny, empty_prompt, setup):
    schedule, original, inverted, reference = setup
    closs = CLossSettings(steps=2)
    plain = _sample(tiny, empty_prompt, setup, closs)
    with pytest.warns(EmptyMaskWarning, match="empty"):
        empty = sample_dragged(tiny.unet, empty_prompt, schedule, inverted, reference, closs=closs,
                               original_latent=original, handles=HANDLES, targets=TARGETS,
                               mask=torch.zeros(16, 16, dtype=torch.bool))
    assert torch.equal(empty, plain)
