"""CLoss: decreases as the target patch comes to match the handle patch; both kinds; gradients; errors."""

import pytest
import torch

from adaptivedrag_core.drag.closs import correspondence_loss, symmetric_cross_entropy
from adaptivedrag_core.errors import InputError

HANDLE, TARGET = (6.0, 8.0), (20.0, 12.0)


def _latents():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 4, 24, 32, generator=generator)
    unrelated = torch.randn(1, 4, 24, 32, generator=generator)
    return reference, unrelated


def _with_target_patch(base, reference, share, radius=5):
    """``base`` whose patch at TARGET is ``share`` of the reference's patch at HANDLE (rest: its own)."""
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
    if kind == "mse":
        assert losses[-1] == pytest.approx(0.0, abs=1e-6)


def test_contrastive_loss_is_the_symmetric_cross_entropy_over_cosine_similarity():
    first = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    loss = symmetric_cross_entropy(first, first, temperature=1.0)
    # Each row: softmax over cosines (1, 0) -> -log(e / (e + 1)).
    assert float(loss) == pytest.approx(-torch.log(torch.tensor(torch.e / (torch.e + 1))).item())
    swapped = symmetric_cross_entropy(first, first.flip(1), temperature=1.0)
    assert float(swapped) > float(loss)


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
