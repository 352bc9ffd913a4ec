"""ComfyUI V3 node classes generated from the pack's :class:`~.spec.NodeSpec` list.

Only imported inside ComfyUI (it needs ``comfy_api``). Each generated class is an ``io.ComfyNode`` whose
``define_schema`` mirrors the spec and whose ``execute`` calls the spec's plain run function.
"""

from __future__ import annotations

import logging
import os
import warnings

import adaptivedrag_core
from comfy_api.latest import ComfyExtension, io, ui
from comfy_execution.graph_utils import ExecutionBlocker

from .spec import CATEGORY, NOTES_UI_KEY, InputSpec, NodeResult, NodeSpec, ShowAndStop, Unavailable

# Warnings raised from files in these folders are the pack's own: they go on the node, not only to the console.
PACK_FOLDERS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep for path in (adaptivedrag_core.__file__,
                                                                                 __file__))

STANDARD_TYPES = {
    "IMAGE": io.Image,
    "MASK": io.Mask,
    "LATENT": io.Latent,
    "MODEL": io.Model,
    "CONDITIONING": io.Conditioning,
    "INT": io.Int,
    "FLOAT": io.Float,
    "BOOLEAN": io.Boolean,
    "STRING": io.String,
    "COMBO": io.Combo,
}
_custom_types: dict = {}


def comfy_type(kind: str):
    """The ``io`` type for a spec kind; custom kinds are created once and shared."""
    if kind in STANDARD_TYPES:
        return STANDARD_TYPES[kind]
    if kind not in _custom_types:
        _custom_types[kind] = io.Custom(kind)
    return _custom_types[kind]


def comfy_input(spec: InputSpec):
    """One V3 input from its spec."""
    common = {"tooltip": spec.tooltip, "optional": spec.optional}
    if spec.kind in ("INT", "FLOAT"):
        numeric = {"default": spec.default, "min": spec.min, "max": spec.max, "step": spec.step}
        if spec.kind == "INT":
            # Said explicitly: the page gives an INT named "seed" a "randomize after each run" control unless told
            # not to, and a randomised seed would retrain the identity LoRA on every run.
            numeric["control_after_generate"] = False
        else:
            numeric["round"] = False  # keep small values such as a 5e-4 learning rate exact
        return comfy_type(spec.kind).Input(spec.name, **common, **numeric)
    if spec.kind == "BOOLEAN":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.kind == "STRING":
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline, **common)
    if spec.kind == "COMBO":
        return io.Combo.Input(spec.name, options=spec.choices(), default=spec.default, **common)
    return comfy_type(spec.kind).Input(spec.name, **common)


def comfy_node_class(spec: NodeSpec) -> type[io.ComfyNode]:
    """A V3 node class for ``spec``, named after its node id."""

    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=CATEGORY,
            description=spec.description,
            inputs=[comfy_input(item) for item in spec.inputs],
            outputs=[comfy_type(item.kind).Output(display_name=item.name, tooltip=item.tooltip)
                     for item in spec.outputs],
            hidden=[io.Hidden.unique_id],
        )

    def execute(cls, **inputs) -> io.NodeOutput:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                result: NodeResult = spec.run(**inputs)
            except ShowAndStop as stop:
                send_to_node(cls.hidden.unique_id, page_output(cls, stop.ui_images, pack_warnings(caught)))
                raise
        outputs = [ExecutionBlocker(value.message) if isinstance(value, Unavailable) else value
                   for value in result.outputs]
        shown = page_output(cls, result.ui_images, result.notes + pack_warnings(caught))
        return io.NodeOutput(*outputs, ui=shown or None)

    return type(spec.node_id, (io.ComfyNode,), {
        "__doc__": spec.description,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    })


def pack_warnings(caught: list) -> list[str]:
    """The messages of the pack's own warnings among ``caught``; the others are logged as ComfyUI logs them."""
    own = []
    for record in caught:
        if os.path.abspath(record.filename).startswith(PACK_FOLDERS):
            own.append(f"warning: {record.message}")
        else:
            logging.warning("%s: %s", record.category.__name__, record.message)
    return own


def page_output(cls, ui_images: dict, notes: list[str]) -> dict:
    """The UI dict a node sends to the page: its images saved as temporary files, and its notes."""
    shown = {key: ui.PreviewImage(images, cls=cls).values for key, images in ui_images.items()}
    if notes:
        shown[NOTES_UI_KEY] = list(notes)
    return shown


def send_to_node(node_id: str, output: dict) -> None:
    """Send ``output`` to the node in the page now, as ComfyUI does when a node finishes.

    For a node about to stop with an error: ComfyUI sends nothing of a failed node, and the image it shows is what
    the user needs to fix the error (the canvas of Drag Points).
    """
    from server import PromptServer

    server = PromptServer.instance
    if output and node_id is not None:
        server.send_sync("executed", {"node": node_id, "display_node": node_id, "output": output,
                                      "prompt_id": server.last_prompt_id}, server.client_id)


class AdaptiveDragExtension(ComfyExtension):
    """The pack as a ComfyUI extension: one V3 node per spec."""

    def __init__(self, specs):
        self._nodes = [comfy_node_class(spec) for spec in specs]

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(self._nodes)
