"""AdaptiveDrag's correspondence loss (CLoss), used while sampling the dragged latent.

At a sampling step the predicted clean latent's patch around each TARGET should look like the original
latent's patch around the matching HANDLE. Two forms:

- ``"contrastive"`` (paper, default): the symmetric cross-entropy of CLIP over cosine similarities. Each patch
  is a set of (2r+1)^2 latent vectors; position k of the predicted target patch should be most similar to
  position k of the original handle patch and to no other position, and vice versa.
- ``"mse"`` (public code): 100 x the mean squared difference between the two 11x11 patches.

The paper gives no temperature; the default 0.07 is CLIP's initial value.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from .common import sample_features, window_offsets

CLOSS_KINDS = ("contrastive", "mse")
MSE_SCALE = 100.0


def correspondence_loss(
    pred_latent: torch.Tensor,
    ref_latent: torch.Tensor,
    handles: Sequence[Sequence[float]],
    targets: Sequence[Sequence[float]],
    kind: str = "contrastive",
    patch_radius: int = 5,
    temperature: float = 0.07,
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
    offsets = window_offsets(patch_radius, pred_latent.device)
    reference = sample_features(ref_latent.detach().float(), handle_points[:, None, :] + offsets[None])
    predicted = sample_features(pred_latent.float(), target_points[:, None, :] + offsets[None])
    if kind == "mse":
        return MSE_SCALE * ((predicted - reference) ** 2).mean(dim=(1, 2)).sum()
    return symmetric_cross_entropy(predicted, reference, temperature).sum()


def symmetric_cross_entropy(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """CLIP's loss between two sets of K vectors per pair ([N,K,C] each), position k matching position k; [N]."""
    similarity = F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).transpose(1, 2) / temperature
    labels = torch.arange(first.shape[1], device=first.device).expand(first.shape[0], -1)
    # cross_entropy takes classes on dim 1: [N, j, i] scores first_i against every second_j, and vice versa.
    first_to_second = F.cross_entropy(similarity.transpose(1, 2), labels, reduction="none").mean(dim=1)
    second_to_first = F.cross_entropy(similarity, labels, reduction="none").mean(dim=1)
    return (first_to_second + second_to_first) / 2
