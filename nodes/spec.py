"""A ComfyUI-free description of every node: inputs, outputs and the function that runs it.

The V3 schema classes ComfyUI loads are generated from these descriptions (``comfy_schema.py``), so the
node logic and the workflow checks run without ComfyUI installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

from adaptivedrag_core.errors import InputError

CATEGORY = "AdaptiveDrag"
NODE_ID_PREFIX = "AdaptiveDrag_"

# Custom socket types passed between this pack's nodes.
DRAG_POINTS = "DRAG_POINTS"
SUPERPIXELS = "SUPERPIXELS"
SAM2_MODEL = "SAM2_MODEL"
IDENTITY_LORA = "ADAPTIVEDRAG_LORA"
INVERTED_LATENT = "ADAPTIVEDRAG_INVERTED_LATENT"
DRAGGED_LATENT = "ADAPTIVEDRAG_DRAGGED_LATENT"

# The UI key under which a node's notes (facts and warnings of its run) reach the page.
NOTES_UI_KEY = "adaptivedrag_notes"

# Widget kinds; every other kind is a socket.
WIDGET_KINDS = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


@dataclass(frozen=True)
class InputSpec:
    """One node input.

    Args:
        name: the input id (the keyword the run function receives).
        kind: a socket type ("IMAGE", "MODEL", a custom type) or a widget kind from ``WIDGET_KINDS``.
        tooltip: shown when hovering the input.
        default: widget default.
        min, max, step: numeric widget bounds.
        options: combo choices, or a function that lists them when the node list is built (files on disk).
        optional: the input may be left unconnected (the run function then gets None).
        multiline: STRING widget shown as a text box.
    """

    name: str
    kind: str
    tooltip: str
    default: Any = None
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    options: Union[Sequence[str], Callable[[], Sequence[str]], None] = None
    optional: bool = False
    multiline: bool = False

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGET_KINDS

    def choices(self) -> list[str]:
        return list(self.options() if callable(self.options) else self.options or ())


@dataclass(frozen=True)
class OutputSpec:
    """One node output: its name, socket type and tooltip."""

    name: str
    kind: str
    tooltip: str


@dataclass
class NodeResult:
    """What a run function returns.

    Args:
        outputs: one value per ``NodeSpec.outputs`` entry, in order.
        ui_images: images to show on the node, by UI key, each an IMAGE tensor [B, H, W, C]; ComfyUI saves
            them as temporary files and sends ``{key: [{filename, subfolder, type}, ...]}`` to the browser.
        notes: facts and warnings of the run, one line each, shown on the node in the page (``NOTES_UI_KEY``).
    """

    outputs: tuple
    ui_images: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


@dataclass(frozen=True)
class Unavailable:
    """An output value that cannot be given this run; a node that takes it stops with ``message``.

    ComfyUI's wrapper turns it into an ``ExecutionBlocker``, so nodes that do not use the output still run.
    """

    message: str


class ShowAndStop(InputError):
    """Raised by a run function that shows something on its node (images, notes) and then stops with an error.

    Args:
        message: the error, shown on the node.
        ui_images: as :attr:`NodeResult.ui_images`.
    """

    def __init__(self, message: str, ui_images: Optional[dict] = None):
        super().__init__(message)
        self.ui_images = ui_images or {}


@dataclass(frozen=True)
class NodeSpec:
    """One node: stable id, names, inputs, outputs and the plain function that runs it."""

    node_id: str
    display_name: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    run: Callable[..., NodeResult]

    def __post_init__(self):
        if not self.node_id.startswith(NODE_ID_PREFIX):
            raise ValueError(f"node id {self.node_id!r} must start with {NODE_ID_PREFIX!r}")
        missing = [spec.name for spec in self.inputs if not spec.tooltip]
        if missing:
            raise ValueError(f"{self.node_id}: inputs without a tooltip: {missing}")

    @property
    def widgets(self) -> tuple[InputSpec, ...]:
        """The widget inputs in the order ComfyUI stores their values (required ones first)."""
        return tuple(sorted((spec for spec in self.inputs if spec.is_widget), key=lambda spec: spec.optional))

    def input(self, name: str) -> InputSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(f"{self.node_id} has no input {name!r}")
