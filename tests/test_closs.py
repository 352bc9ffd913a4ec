"""CLoss: the matching patch is its optimum; it decreases as the target patch comes to match the handle patch;
both kinds; gradients; the region it may change; errors."""

import pytest
import torch

from adaptivedrag_core.drag.closs import closs_region, correspondence_loss, soft_symmetric_cross_entropy
from adaptivedrag_core.errors import InputError

HANDLE, TARGET = (6.0, 8.0), (20.0, 12.0)


def _latents():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 4, 24, 32, generator=generator)
    unrelated = torch.randn(1, 4, 24, 32, generator=generator)
    return reference, unrelated


def _with_target_patch(base, reference, share, radius=6):
    """``base`` whose patch at TARGET is ``share`` of the reference's patch at HANDLE (rest: its own); radius 6
    covers the contrastive form's descriptors around the 11x11 patch."""
    edited = base.clone()
    (hx, hy), (tx, ty) = [tuple(int(c) for c in p) for p in (HANDLE, TARGET)]
    wanted = reference[..., hy - radius:hy + radius + 1, hx - radius:hx + radius + 1]
    own = base[..., ty - radius:ty + radius + 1, tx - radius:tx + radius + 1]
    edited[..., ty - radius:ty + radius + 1, tx - radius:tx + radius + 1] = share * wanted + (1 - share) * own
    return edited


@pytest.mark.parametrize("kind", ["contrastive", "mse"])
def test_closs_decreases_as_the_target_patch_matches_the_handle_patch(kind):
    reference, unrelated = _latents()
    losses = [float(correspondence_loss(_with_target_patch(unrelated, reference, share), reference,
                                        [HANDLE], [TARGET], kind=kind)) for share in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] == pytest.approx(0.0, abs=1e-5)


#: A handle and target whose footprints lie inside the 24x32 latent; the matching prediction is the reference
#: rolled by (4, 12), so its neighbourhood of every target position equals the reference's around the handle.
INNER_HANDLE, INNER_TARGET, MATCH_ROLL = (9.0, 9.0), (21.0, 13.0), (4, 12)


def _rolled(reference, extra_x=0):
    return torch.roll(reference, shifts=(MATCH_ROLL[0], MATCH_ROLL[1] + extra_x), dims=(2, 3))


@pytest.mark.parametrize("kind", ["contrastive", "mse"])
def test_the_matching_patch_is_the_optimum_zero_gradient_there_and_a_shifted_patch_scores_higher(kind):
    reference, _ = _latents()
    match = _rolled(reference).requires_grad_(True)
    loss = correspondence_loss(match, reference, [INNER_HANDLE], [INNER_TARGET], kind=kind)
    loss.backward()
    assert float(loss.detach()) < 1e-6
    assert float(match.grad.abs().max()) < 1e-5
    for shift in (1, 2, -1):
        shifted = correspondence_loss(_rolled(reference, shift), reference, [INNER_HANDLE], [INNER_TARGET], kind=kind)
        assert float(shifted) > 1.0 + float(loss), shift


def test_adam_started_at_the_match_stays_there():
    """The contrastive form (the paper's literal one drifted away from a perfect match: 17% of the patch in 200
    steps here)."""
    reference, _ = _latents()
    start = _rolled(reference)
    prediction = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prediction], lr=0.01)
    for _ in range(200):
        optimizer.zero_grad()
        correspondence_loss(prediction, reference, [INNER_HANDLE], [INNER_TARGET], kind="contrastive").backward()
        optimizer.step()
    (x, y), radius = INNER_TARGET, 5
    patch = (..., slice(int(y) - radius, int(y) + radius + 1), slice(int(x) - radius, int(x) + radius + 1))
    drift = (prediction.detach() - start)[patch].norm() / start[patch].norm()
    assert float(drift) < 0.01


def test_soft_symmetric_cross_entropy_is_zero_for_equal_descriptors_and_positive_for_permuted_ones():
    descriptors = torch.nn.functional.normalize(torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1)),
                                                dim=-1)
    assert torch.allclose(soft_symmetric_cross_entropy(descriptors, descriptors, 0.07), torch.zeros(2), atol=1e-6)
    permuted = descriptors[:, torch.randperm(9, generator=torch.Generator().manual_seed(2))]
    assert (soft_symmetric_cross_entropy(permuted, descriptors, 0.07) > 0.1).all()


def test_closs_region_is_the_square_around_each_target_within_the_mask():
    region = closs_region((10, 12), [(2.0, 3.0), (9.4, 7.6)], radius=1)
    expected = torch.zeros(10, 12, dtype=torch.bool)
    expected[2:5, 1:4] = True      # around (2, 3)
    expected[7:10, 8:11] = True    # around (9, 8), the rounded target
    assert torch.equal(region, expected)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[:, :3] = True
    assert torch.equal(closs_region((10, 12), [(2.0, 3.0), (9.4, 7.6)], 1, mask), expected & mask)


def test_mse_is_100_times_the_mean_squared_difference():
    reference, unrelated = _latents()
    loss = correspondence_loss(unrelated, reference, [HANDLE], [TARGET], kind="mse", patch_radius=1)
    (hx, hy), (tx, ty) = [tuple(int(c) for c in p) for p in (HANDLE, TARGET)]
    expected = 100 * ((unrelated[..., ty - 1:ty + 2, tx - 1:tx + 2]
                       - reference[..., hy - 1:hy + 2, hx - 1:hx + 2]) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("kind", ["contrastive", "mse"])
def test_a_gradient_step_on_the_prediction_lowers_closs_and_leaves_the_reference_alone(kind):
    reference, unrelated = _latents()
    prediction = unrelated.clone().requires_grad_(True)
    reference_copy = reference.clone().requires_grad_(True)
    loss = correspondence_loss(prediction, reference_copy, [HANDLE, (3.0, 3.0)], [TARGET, (28.0, 20.0)], kind=kind)
    loss.backward()
    assert reference_copy.grad is None
    assert prediction.grad[..., 12, 20].abs().sum() > 0 and prediction.grad[..., 0, 31].abs().sum() == 0
    with torch.no_grad():
        stepped = prediction - 0.05 * prediction.grad.sign()
    assert correspondence_loss(stepped, reference, [HANDLE, (3.0, 3.0)], [TARGET, (28.0, 20.0)], kind=kind) < loss


def test_closs_rejects_bad_input():
    reference, unrelated = _latents()
    with pytest.raises(InputError, match="unknown CLoss kind 'l1'"):
        correspondence_loss(unrelated, reference, [HANDLE], [TARGET], kind="l1")
    with pytest.raises(InputError, match="1 handles but 2 targets"):
        correspondence_loss(unrelated, reference, [HANDLE], [TARGET, TARGET])
    with pytest.raises(InputError, match="same shape"):
        correspondence_loss(unrelated[..., :10], reference, [HANDLE], [TARGET])


def test_the_public_codes_mse_is_the_default_form_everywhere():
    """The contrastive form did not edit better on ``bench scenes`` (docs/quality.md, issue 12)."""
    from adaptivedrag_core.cli import build_parser
    from adaptivedrag_core.pipeline import EditSettings
    from adaptivedrag_core.sampling import CLossSettings

    edit_args = build_parser().parse_args(["edit", "in.png"])
    assert EditSettings(method="adaptive").closs_settings().kind == CLossSettings().kind == edit_args.closs_kind
    assert CLossSettings().kind == "mse"
