"""The optimisers read values back from the tensors (a GPU synchronisation each) a fixed number of times per step,
however many handles there are: no per-point Python loops in tracking, line search or budgets."""

import numpy as np
import pytest
import torch

from adaptivedrag_core.bench.synthetic import conv_feature_fn
from adaptivedrag_core.drag import drag

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
STEPS = 6


def _reads_per_step(monkeypatch, method: str, count: int) -> float:
    latent = 0.2 * torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    handles = [(2.0 + 4 * i, 2.0) for i in range(count)]
    targets = [(x, 29.0) for x, _ in handles]  # far: no handle arrives within the budget
    mask = torch.ones(32, 32, dtype=torch.bool)
    regions = torch.from_numpy(np.arange(32)[None, :] // 8 + 4 * (np.arange(32)[:, None] // 8))
    budget = dict(n_steps=STEPS, n_max=STEPS) if method == "adaptive" else dict(max_steps=STEPS)
    reads = []
    with monkeypatch.context() as patch:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, **kwargs):
                reads.append(1)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        result = drag(latent, conv_feature_fn(0), handles, targets, method=method, mask=mask, regions=regions,
                      **budget)
    assert result.steps >= 1
    return len(reads) / result.steps


@pytest.mark.parametrize("method", ["dragdiffusion", "adaptive", "freedrag"])
def test_reads_per_step_do_not_grow_with_the_number_of_handles(monkeypatch, method):
    one, five = _reads_per_step(monkeypatch, method, 1), _reads_per_step(monkeypatch, method, 5)
    assert five - one < 1, (one, five)
    assert one <= 12  # a handful: loop control, budget, Adam's step count
