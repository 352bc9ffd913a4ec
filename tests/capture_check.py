"""Checks, on the CPU, that a step can be captured as a CUDA graph and replayed for every later step.

A CUDA graph records the kernels one call of a step launches, with every argument fixed: the tensors' addresses
and the Python numbers. Replaying it for another step is right only if that step would launch the very same
kernels with the very same arguments, its changing inputs having been copied into the same tensors beforehand.
And a capture fails if the step reads a value back to the host or copies Python data to the device.

- :class:`HostSyncs` counts, inside a step, what would wait for the GPU or cannot be captured: values read back to the
  host (``item``, ``bool``, ``tolist``...), tensors made from Python data (a copy from the host), and operators
  whose output size depends on the data (``nonzero`` and the like).
- :class:`OpStream` records the operators a step runs with their arguments: tensors by shape, dtype, layout and
  identity (a tensor made earlier in the step by its order of creation, any other tensor by its address), other
  arguments by value. Two steps that record the same stream launch the same kernels on the same tensors.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

SYNCING_OPERATORS = {
    "aten._local_scalar_dense": "reads",  # item(), bool(), int(), float() of a tensor
    "aten.lift_fresh": "from_python",  # torch.tensor(python data): a copy from the host on a GPU
    "aten.nonzero": "data_dependent",
    "aten.masked_select": "data_dependent",
    "aten._unique2": "data_dependent",
    "aten.unique_dim": "data_dependent",
    "aten.unique_consecutive": "data_dependent",
}
READ_METHODS = ("tolist", "numpy", "__array__")  # host reads that dispatch no operator


class HostSyncs(TorchDispatchMode):
    """Counts host reads, tensors from Python data and data-dependent output sizes (see the module docstring).
    Use it through :func:`counting_host_syncs`, which also counts the reads that dispatch no operator."""

    def __init__(self):
        super().__init__()
        self.counts = {"reads": 0, "from_python": 0, "data_dependent": 0}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = SYNCING_OPERATORS.get(str(func._overloadpacket))
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_host_syncs():
    """``with counting_host_syncs() as syncs:`` counts in ``syncs.counts`` what the block would sync on a GPU."""
    syncs = HostSyncs()
    with pytest.MonkeyPatch.context() as patch:
        for name in READ_METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                syncs.counts["reads"] += 1
                return _original(tensor, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        with syncs:
            yield syncs


class OpStream(TorchDispatchMode):
    """Records the operators a step runs and their arguments (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.operators: list = []
        self._made: dict[int, int] = {}  # storage address -> order of creation, for tensors made in the step
        self._count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func.namespace == "profiler":  # the optimiser's profiling marks: no kernel
            return result
        inputs = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        self.operators.append((str(func), [self._describe(leaf) for leaf in tree_leaves((args, kwargs))]))
        input_storages = {tensor.untyped_storage().data_ptr() for tensor in inputs}
        for tensor in tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                address = tensor.untyped_storage().data_ptr()
                if address not in input_storages:  # a new tensor, not a view of an input or an in-place result
                    self._made[address] = self._count
                    self._count += 1
        return result

    def _describe(self, value):
        if not isinstance(value, torch.Tensor):
            return ("value", repr(value))
        address = value.untyped_storage().data_ptr()
        identity = ("made", self._made[address]) if address in self._made else ("outside", address)
        return ("tensor", tuple(value.shape), value.dtype, tuple(value.stride()), value.storage_offset(), identity)
