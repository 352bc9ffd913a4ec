"""CUDA graphs of an edit's repeated steps, with an eager fallback.

Every stage of an edit repeats one step at one shape, 35 to 80 times, and in eager mode SD1.5's UNet is bound by
the CPU launching its kernels (docs/performance.md). A CUDA graph records a step's kernels once and replays them
with one launch. The steps are written so that one recording serves every step ("capture-ready"): fixed shapes;
what changes from step to step sits in fixed tensors that are refilled before each call (the latent, the timestep as
a device tensor, the reference keys and values); nothing inside reads a value back to the host or makes a tensor
from Python data. ``tests/test_capture_ready.py`` checks this on the CPU.

- **Forward only** (inversion, sampling without CLoss): :class:`ReplayedStep` over ``torch.cuda.CUDAGraph``.
- **Forward and backward to the latent** (the drag's feature function; the CLoss step's noise prediction):
  ``torch.cuda.make_graphed_callables``. The loss, the point tracking and Adam stay eager (a few dozen small
  kernels), since tracking decides on the host what happens next; so does the float16 loss scaler's overflow
  check (:class:`~adaptivedrag_core.drag.common.LossScaler`), which reads one flag back per backward pass.
- **The whole identity-LoRA step** (forward, backward, loss scaling, fused AdamW): :class:`ReplayedStep`.

All graphs share one memory pool per device (:func:`shared_pool`). Graphs live only as long as the stage that made
them: the identity LoRA's merged weights, which they read, exist only for one stage. If a capture fails, that kind of
step runs eagerly from then on and the reason is logged once (:class:`StepGraphs`). On the CPU, and any device that
is not CUDA, nothing is ever captured: the same step code runs eagerly.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

_POOLS: dict = {}
#: Only this thread's CUDA calls matter to a capture: ComfyUI's other threads may use the GPU meanwhile.
CAPTURE_ERROR_MODE = "thread_local"


def use_cuda_graphs(setting: Optional[bool], device) -> bool:
    """Whether an edit's steps are captured as CUDA graphs: ``setting`` (None = auto: on) on a CUDA device, and
    never on any other device."""
    if torch.device(device).type != "cuda":
        return False
    return True if setting is None else bool(setting)


def shared_pool(device: torch.device):
    """The one CUDA-graph memory pool of ``device``: every capture uses it, so graphs of stages that do not run at
    the same time reuse each other's memory instead of each keeping its own."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


class StepGraphs:
    """Whether to capture, and the kinds of step whose capture failed (they run eagerly from then on).

    Args:
        device: the device the steps run on.
        setting: True, False or None (auto), as :func:`use_cuda_graphs`.
        failures: kind of step -> why its capture failed; pass the same dict to later stages (the pipeline keeps
            one), so a failure is logged and paid for once.
    """

    def __init__(self, device, setting: Optional[bool] = None, failures: Optional[dict] = None):
        self.device = torch.device(device)
        self.enabled = use_cuda_graphs(setting, self.device)
        self.failures = {} if failures is None else failures
        self._stream = None

    @property
    def pool(self):
        return shared_pool(self.device)

    @property
    def stream(self) -> torch.cuda.Stream:
        """The side stream warm-ups and captures run on (one, as ``make_graphed_callables`` does)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def capture(self, name: str, build: Callable[[], object]) -> Optional[object]:
        """``build()``'s graphed object; None (run eagerly) when graphs are off, when ``name`` failed before, or when
        ``build`` raises, which is logged with its reason."""
        if not self.enabled or name in self.failures:
            return None
        try:
            return build()
        except Exception as error:  # whatever stops a capture, the step still runs, eagerly
            self.failures[name] = failure_reason(error)
            log.warning("CUDA graph of the %s step not captured (%s); it runs eagerly", name, self.failures[name])
            return None


def failure_reason(error: BaseException) -> str:
    """One line: the error, and the one it happened while handling (a failed capture often raises twice)."""
    lines = [f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"]
    if error.__context__ is not None:
        lines.append(f"after {failure_reason(error.__context__)}")
    return "; ".join(lines)


# ----------------------------------------------------------------------------------------------- capture


def warm_up(fn: Callable[[], object], graphs: StepGraphs):
    """Run ``fn()`` once on the captures' side stream, as capture needs: libraries set themselves up outside it."""
    stream = graphs.stream
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        outputs = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return outputs


def capture_graph(fn: Callable[[], object], graphs: StepGraphs) -> tuple[torch.cuda.CUDAGraph, object]:
    """Record ``fn()`` (which must read and write fixed tensors only) as a CUDA graph; (graph, its outputs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=graphs.pool, stream=graphs.stream, capture_error_mode=CAPTURE_ERROR_MODE):
        outputs = fn()
    return graph, outputs


def capture_differentiable(fn: Callable[[torch.Tensor], object], example: torch.Tensor, graphs: StepGraphs):
    """``fn(x)`` with its backward to ``x`` as two CUDA graphs (``torch.cuda.make_graphed_callables``).

    ``example`` becomes the graph's input tensor: pass the tensor later calls pass (the optimised latent), and no
    copy is made. One warm-up pass, forward and backward, runs first (without touching ``example``'s gradient).
    """
    return torch.cuda.make_graphed_callables(fn, (example,), num_warmup_iters=1, pool=graphs.pool,
                                             capture_error_mode=CAPTURE_ERROR_MODE)


class ReplayedStep:
    """A step ``fn()`` that reads and writes fixed tensors only, replayed from a CUDA graph from its second call on.

    The first call runs ``fn`` eagerly, on a side stream (the warm-up capture needs); the second captures it and
    replays the capture; later calls replay. So every call runs the step exactly once, and a step with effects (an
    optimiser step) can be graphed as well as a pure one. When graphs are off, or the capture fails, every call runs
    ``fn`` eagerly. Graphed outputs are the same tensors at every replay: use them before the next call.

    Args:
        fn: the step.
        graphs: the edit's :class:`StepGraphs`.
        name: the kind of step, for the log and :attr:`StepGraphs.failures`.
        on_failure: called after a failed capture, before the step runs eagerly (to reset what the aborted capture
            left half-done on the Python side).
    """

    def __init__(self, fn: Callable[[], object], graphs: StepGraphs, name: str,
                 on_failure: Optional[Callable[[], None]] = None):
        self.fn = fn
        self.graphs = graphs
        self.name = name
        self.on_failure = on_failure
        self.eager = not graphs.enabled or name in graphs.failures
        self.warmed_up = False
        self.graph = None
        self.outputs = None

    def __call__(self):
        if self.eager:
            return self.fn()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if not self.warmed_up:
            self.warmed_up = True
            return warm_up(self.fn, self.graphs)
        captured = self.graphs.capture(self.name, lambda: capture_graph(self.fn, self.graphs))
        if captured is None:
            self.eager = True
            if self.on_failure is not None:
                self.on_failure()
            return self.fn()
        self.graph, self.outputs = captured
        self.graph.replay()
        return self.outputs


class GraphedFeatures:
    """A feature function whose calls with autograd replay CUDA graphs of its forward and backward passes.

    The graphs are captured at the first such call, with the latent passed then (the drag's optimised latent, the
    same tensor at every step) as their input. Calls without autograd (the starting features, the last evaluation)
    run eagerly; so does everything when the capture fails. ``features_only`` is the wrapped function's.

    Args:
        feature_fn: e.g. :class:`~adaptivedrag_core.features.UNetFeatures`.
        graphs: the edit's :class:`StepGraphs`.
    """

    def __init__(self, feature_fn, graphs: StepGraphs):
        self.feature_fn = feature_fn
        self.graphs = graphs
        self.features_only = getattr(feature_fn, "features_only", None)
        self.graphed = None

    def __call__(self, latent: torch.Tensor):
        if not (self.graphs.enabled and torch.is_grad_enabled() and latent.requires_grad):
            return self.feature_fn(latent)
        if self.graphed is None:
            self.graphed = self.graphs.capture(
                "drag", lambda: capture_differentiable(self.feature_fn, latent, self.graphs)) or self.feature_fn
        return self.graphed(latent)


class NoiseStep:
    """``noise(latent, t)`` (a :data:`~adaptivedrag_core.inversion.NoiseFn`) as capture-ready steps.

    The timestep goes to the UNet as a device tensor, refilled at each call (no copy from the host, no wait), and
    with ``control`` the reference keys and values come from its static buffers
    (:meth:`~adaptivedrag_core.reference.ReferenceControl.use_static_buffers`), refilled for the current step. A call
    without autograd copies the latent into a fixed buffer and runs the forward step (:class:`ReplayedStep`); a
    call with autograd on a latent that requires it (CLoss) runs the forward and backward graphs
    (:func:`capture_differentiable`) with that latent as input. Reference steps that replay and those that do not
    run different layers, so each gets its own graphs.

    Args:
        noise_fn: ``noise_fn(latent, timestep)`` that accepts a device tensor timestep (e.g.
            :func:`~adaptivedrag_core.inversion.unet_noise_fn`).
        graphs: the edit's :class:`StepGraphs`.
        name: the kind of step ("inversion", "sampling").
        control: the reference control the UNet runs under, or None.
    """

    def __init__(self, noise_fn, graphs: StepGraphs, name: str, control=None):
        self.noise_fn = noise_fn
        self.graphs = graphs
        self.name = name
        self.control = control
        if control is not None:
            control.use_static_buffers()
        self.timestep: Optional[torch.Tensor] = None
        self.latent: Optional[torch.Tensor] = None
        self._noise = None
        self.forward_steps: dict = {}
        self.differentiable: dict = {}

    def __call__(self, latent: torch.Tensor, timestep) -> torch.Tensor:
        replaying = self.load(latent, timestep)
        if torch.is_grad_enabled() and latent.requires_grad:
            return self._differentiable(replaying, latent)(latent)
        return self._forward(replaying)()

    def load(self, latent: torch.Tensor, timestep) -> bool:
        """Fill the fixed buffers for a call at ``latent`` and ``timestep`` (outside any graph); returns whether the
        reference control replays at this step."""
        if self.timestep is None:
            with torch.inference_mode(False):  # ordinary tensors, refilled in place in any mode
                self.timestep = torch.zeros(1, dtype=torch.int64, device=latent.device)
                self.latent = torch.empty_like(latent)
            self._noise = _at_timestep(self.noise_fn, self.timestep)
        self.timestep.fill_(timestep)
        with torch.no_grad():
            self.latent.copy_(latent)
        if self.control is None:
            return False
        self.control.load_step()
        return self.control.mode == "replay" and self.control.active()

    def forward(self) -> torch.Tensor:
        """The forward step, as captured: the noise at the loaded latent and timestep."""
        return self._noise(self.latent)

    def noise(self, latent: torch.Tensor) -> torch.Tensor:
        """The differentiable step, as captured: the noise at ``latent`` and the loaded timestep."""
        return self._noise(latent)

    def _forward(self, replaying: bool) -> ReplayedStep:
        if replaying not in self.forward_steps:
            self.forward_steps[replaying] = ReplayedStep(functools.partial(self._noise, self.latent), self.graphs,
                                                         self.name)
        return self.forward_steps[replaying]

    def _differentiable(self, replaying: bool, latent: torch.Tensor):
        if replaying not in self.differentiable:
            noise = self._noise
            self.differentiable[replaying] = self.graphs.capture(
                f"{self.name} backward", lambda: capture_differentiable(noise, latent, self.graphs)) or noise
        return self.differentiable[replaying]


def _at_timestep(noise_fn, timestep: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``latent -> noise_fn(latent, timestep)``. It holds no reference to its :class:`NoiseStep`: the step's graphs
    hold it, and a reference cycle would keep them, and their memory, alive until the garbage collector ran."""

    def noise(latent: torch.Tensor) -> torch.Tensor:
        return noise_fn(latent, timestep)

    return noise
