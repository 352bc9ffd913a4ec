"""AdaptiveDrag's correspondence loss (CLoss), used while sampling the dragged latent.

At a sampling step the predicted clean latent's patch around each TARGET should look like the original
latent's patch around the matching HANDLE. Two forms:

- ``"contrastive"`` (paper): the symmetric cross-entropy of CLIP over cosine similarities between the
  positions of the two patches: each predicted position is scored against every original position and vice
  versa, softmax over the positions. Taken literally (single 4-channel latent vectors, one-hot "position k
  matches position k" labels) the match is not its optimum: neighbouring latent vectors are nearly collinear,
  so the loss at a perfect match is well above zero and its gradient pushes the prediction away from the
  match. Two changes make the matching patch the optimum while keeping the paper's form:

  * each position is described by its (2 d + 1)^2 neighbourhood (``descriptor_radius`` d = 1: 3x3 x C
    values), centred by the patch's mean per channel, so descriptors differ between neighbouring positions and
    a constant offset does not dominate the cosine;
  * the labels are soft: the softmax of the ORIGINAL patch's own similarities (position k against every
    position j), not one-hot. The loss is the KL divergence from those labels to the predicted softmax, in
    both directions, so it is zero, with a zero gradient, exactly when the predicted patch's similarity
    pattern equals the original's (at the matching patch), and positive for a shifted patch.

- ``"mse"`` (public code, the default): 100 x the mean squared difference between the two 11x11 patches.

Why ``mse`` is the default (``DEFAULT_CLOSS_KIND``, used by the pipeline, the CLI, the nodes and the sampler):
the corrected contrastive form has the matching patch as its optimum, as ``mse`` always had, but it did not
edit better. On ``bench scenes`` (4 held-out cases, adaptive + auto mask + CLoss) ``mse`` gave MD 35.8 px
against 36.2, outside PSNR 28.1 dB against 27.8 and PSNR against the truth 21.3 dB against 21.0, small
differences all in its favour (docs/quality.md, issue 12); it is also the public code's form and cheaper.
That model cannot move objects at the papers' strength, so the comparison mostly shows fidelity; it should be
repeated on a model that can.

The paper gives no temperature; the default 0.07 is CLIP's initial value.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .common import sample_features, window_offsets

CLOSS_KINDS = ("contrastive", "mse")
#: The form every entry point (pipeline, CLI, nodes, sampler) uses unless told otherwise; see the module docstring.
DEFAULT_CLOSS_KIND = "mse"
MSE_SCALE = 100.0

#: The contrastive form's neighbourhood radius: the loss and the footprint CLoss may change must agree on it.
DESCRIPTOR_RADIUS = 1


def correspondence_loss(
    pred_latent: torch.Tensor,
    ref_latent: torch.Tensor,
    handles: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    kind: str = DEFAULT_CLOSS_KIND,
    patch_radius: int = 5,
    temperature: float = 0.07,
    descriptor_radius: int = DESCRIPTOR_RADIUS,
) -> torch.Tensor:
    """CLoss between ``pred_latent`` around the targets and ``ref_latent`` around the handles, summed over pairs.

    Args:
        pred_latent: [1,C,h,w] predicted clean latent of the edited branch (gradients flow into it).
        ref_latent: [1,C,h,w] original clean latent (treated as a constant).
        handles, targets: (x, y) in LATENT grid pixels (floats allowed; patches are sampled bilinearly,
            border values repeat past the edge).
        kind: "contrastive" or "mse".
        patch_radius: patches are (2 r + 1)^2 positions (5 -> 11x11).
        temperature: softmax temperature of the contrastive form.
        descriptor_radius: the contrastive form describes each position by its (2 d + 1)^2 neighbourhood.
    Returns:
        a scalar tensor.
    """
    if kind not in CLOSS_KINDS:
        raise InputError(f"unknown CLoss kind {kind!r}; choose one of {', '.join(CLOSS_KINDS)}")
    if pred_latent.dim() != 4 or pred_latent.shape != ref_latent.shape:
        raise InputError(f"pred_latent and ref_latent must be [1,C,h,w] of the same shape, got "
                         f"{tuple(pred_latent.shape)} and {tuple(ref_latent.shape)}")
    handle_points = torch.as_tensor(handles, dtype=torch.float32, device=pred_latent.device).reshape(-1, 2)
    target_points = torch.as_tensor(targets, dtype=torch.float32, device=pred_latent.device).reshape(-1, 2)
    if len(handle_points) != len(target_points):
        raise InputError(f"got {len(handle_points)} handles but {len(target_points)} targets; they must pair up")
    if kind == "mse":
        offsets = window_offsets(patch_radius, pred_latent.device)
        reference = sample_features(ref_latent.detach().float(), handle_points[:, None, :] + offsets[None])
        predicted = sample_features(pred_latent.float(), target_points[:, None, :] + offsets[None])
        return MSE_SCALE * ((predicted - reference) ** 2).mean(dim=(1, 2)).sum()
    reference = patch_descriptors(ref_latent.detach().float(), handle_points, patch_radius, descriptor_radius)
    predicted = patch_descriptors(pred_latent.float(), target_points, patch_radius, descriptor_radius)
    return soft_symmetric_cross_entropy(predicted, reference, temperature).sum()


def footprint_radius(kind: str, patch_radius: int, descriptor_radius: int = DESCRIPTOR_RADIUS) -> int:
    """How far (latent pixels, square) from a target the predicted latent enters CLoss, bilinear neighbour
    included."""
    return patch_radius + (descriptor_radius if kind == "contrastive" else 0) + 1


def patch_descriptors(latent: torch.Tensor, centres: torch.Tensor, patch_radius: int, descriptor_radius: int
                      ) -> torch.Tensor:
    """Unit descriptors [N,K,D] of the K = (2r+1)^2 positions of the patch around each centre [N,2]: each
    position's (2d+1)^2 neighbourhood of C channels, centred by the per-channel mean over the patch."""
    offsets = window_offsets(patch_radius, latent.device)
    neighbourhood = window_offsets(descriptor_radius, latent.device)
    points = centres[:, None, None, :] + offsets[None, :, None, :] + neighbourhood[None, None, :, :]
    values = sample_features(latent, points)  # [N,K,L,C]
    values = values - values.mean(dim=(1, 2), keepdim=True)
    return F.normalize(values.flatten(2), dim=-1)


def soft_symmetric_cross_entropy(predicted: torch.Tensor, reference: torch.Tensor, temperature: float
                                 ) -> torch.Tensor:
    """CLIP's symmetric loss with soft labels, per pair ([N,K,D] unit descriptors each; returns [N]).

    Scores s_kj = cos(predicted_k, reference_j) / temperature; labels from the reference's own scores
    cos(reference_k, reference_j) / temperature. Each predicted position's softmax over the reference positions,
    and each reference position's softmax over the predicted ones, is compared with the labels' by the KL
    divergence, averaged over positions; the two directions are averaged. Zero when predicted == reference.
    """
    scores = predicted @ reference.transpose(1, 2) / temperature  # [N, predicted k, reference j]
    labels = reference @ reference.transpose(1, 2) / temperature  # symmetric
    predicted_to_reference = _kl_divergence(labels, scores, dim=2)
    reference_to_predicted = _kl_divergence(labels, scores, dim=1)
    return (predicted_to_reference + reference_to_predicted) / 2


def _kl_divergence(label_scores: torch.Tensor, scores: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(softmax(label_scores) || softmax(scores)) along ``dim``, averaged over the other position axis; [N]."""
    log_labels = label_scores.log_softmax(dim=dim)
    log_scores = scores.log_softmax(dim=dim)
    return (log_labels.exp() * (log_labels - log_scores)).sum(dim=dim).mean(dim=-1)


def closs_region(shape: Sequence[int], targets: Sequence[Sequence[float]], radius: int,
                 mask: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Where CLoss may change the latent: [h,w] bool, the latent positions within ``radius`` (square) of a
    target's rounded position, intersected with ``mask`` ([h,w] bool, True = may change) when given.

    Args:
        shape: (h, w) of the latent grid.
        targets: (x, y) latent-grid pixels.
        radius: half-size of the square around each target (CLoss's footprint plus a margin).
        mask: None, or the edit's mask on the latent grid.
        device: where to build the region.
    """
    height, width = shape
    centres = torch.as_tensor(targets, dtype=torch.float32, device=device).reshape(-1, 2).round()
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    near_x = (xs[None] - centres[:, 0, None, None]).abs() <= radius
    near_y = (ys[None] - centres[:, 1, None, None]).abs() <= radius
    region = (near_x & near_y).any(dim=0)
    return region if mask is None else region & mask.to(device=region.device, dtype=torch.bool)
