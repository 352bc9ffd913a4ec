"""DragDiffusion's latent optimisation: motion supervision and point tracking, alternated.

Each step: compute features, track the handles (from the second step on), stop if every handle is within
2 px of its target, else take one Adam step on

    sum_i sum_{q in patch(h_i, r_m)} mean_c |F_{q+d_i}(z) - sg(F_q(z))|  +  lam * |(pred(z) - pred(z0)) * (1-M)|_1

The same loop serves AdaptiveDrag (:mod:`.adaptive`), which changes the patches and the step budget through
a :class:`StepPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..progress import ProgressFn, report
from .common import (
    DragProblem,
    DragResult,
    LatentAdam,
    MaskPenalty,
    PatchGeometry,
    arrived,
    make_result,
    motion_supervision_loss,
    require_non_negative,
    require_positive,
    require_whole,
    sample_features,
    track_points,
)


@dataclass
class DragDiffusionOptions:
    """DragDiffusion hyper-parameters (paper and public code agree on these).

    Args:
        max_steps: optimisation steps (80).
        motion_radius: r_m, half-size of the motion-supervision patch (1 -> 3x3).
        tracking_radius: r_p, half-size of the tracking window (3 -> 7x7).
        lam: weight of the mask term (0.1), summed over latent elements as in DragDiffusion.
        lr: Adam learning rate on the latent (0.01).
    """

    max_steps: int = 80
    motion_radius: int = 1
    tracking_radius: int = 3
    lam: float = 0.1
    lr: float = 0.01

    def __post_init__(self):
        require_whole(max_steps=self.max_steps, motion_radius=self.motion_radius,
                      tracking_radius=self.tracking_radius)
        require_positive(max_steps=self.max_steps, tracking_radius=self.tracking_radius, lr=self.lr)
        require_non_negative(motion_radius=self.motion_radius, lam=self.lam)


class StepPolicy:
    """How many steps the loop may take, and which tracked moves it keeps. DragDiffusion: fixed, all."""

    def __init__(self, total: int):
        self.total = total

    def accept(self, previous: torch.Tensor, tracked: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The handles to continue from, given the previous ones and the newly tracked ones."""
        return tracked

    def spent(self, steps: int) -> bool:
        """No step can follow after ``steps`` steps, whatever tracking finds (the budget cannot grow)."""
        return steps >= self.total

    def info(self) -> dict:
        return {}


def point_drag_loop(problem: DragProblem, geometry: PatchGeometry, policy: StepPolicy, lam: float, lr: float,
                    method: str, progress: ProgressFn = None) -> DragResult:
    """Alternate tracking and motion supervision until every handle arrives or the policy's budget is spent."""
    optimizer = LatentAdam(problem.latent, lr, problem.compute_dtype)
    penalty = MaskPenalty(problem.mask, problem.prediction0)
    reference = sample_features(problem.features0, problem.handles)
    handles = problem.handles.clone()
    history = [handles]
    steps = 0
    while True:
        # Once the budget is spent, this evaluation only feeds the last tracking: no gradient, features alone.
        features, prediction = problem.evaluate(optimizer.latent, features_only=policy.spent(steps))
        if steps > 0:
            active = ~arrived(handles, problem.targets)
            tracked = track_points(features.detach(), reference, handles, geometry)
            handles = policy.accept(handles, tracked, active)
            history.append(handles)
        done = arrived(handles, problem.targets)
        if done.all() or steps >= policy.total:
            break
        loss = motion_supervision_loss(features, handles, problem.targets, geometry, ~done)
        loss = loss + lam * penalty.sum(prediction)
        optimizer.step(loss)
        del features, prediction, loss  # frees the graph, kept for a loss-scaling retry, before the next forward
        steps += 1
        report(progress, steps, policy.total)
    return make_result(problem, optimizer, handles, steps, method, history, **policy.info())


def run_dragdiffusion(problem: DragProblem, options: DragDiffusionOptions, progress: ProgressFn = None) -> DragResult:
    """DragDiffusion with square patches and a fixed step budget."""
    count = len(problem.handles)
    geometry = PatchGeometry(
        problem.handles,
        torch.full((count,), options.motion_radius, device=problem.handles.device),
        torch.full((count,), options.tracking_radius, device=problem.handles.device),
        problem.feature_size,
    )
    return point_drag_loop(problem, geometry, StepPolicy(options.max_steps), options.lam, options.lr,
                           "dragdiffusion", progress)
