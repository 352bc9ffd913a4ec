"""ComfyUI V3 node classes generated from the pack's :class:`~.spec.NodeSpec` list.

Only imported inside ComfyUI (it needs ``comfy_api``). Each generated class is an ``io.ComfyNode`` whose
``define_schema`` mirrors the spec and whose ``execute`` calls the spec's plain run function.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io, ui

from .spec import CATEGORY, InputSpec, NodeResult, NodeSpec

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
            numeric["control_after_generate"] = spec.seed_control or None
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
        )

    def execute(cls, **inputs) -> io.NodeOutput:
        result: NodeResult = spec.run(**inputs)
        saved = {key: ui.PreviewImage(images, cls=cls).values for key, images in result.ui_images.items()}
        return io.NodeOutput(*result.outputs, ui=saved or None)

    return type(spec.node_id, (io.ComfyNode,), {
        "__doc__": spec.description,
        "define_schema": classmethod(define_schema),
        "execute": classmethod(execute),
    })


class AdaptiveDragExtension(ComfyExtension):
    """The pack as a ComfyUI extension: one V3 node per spec."""

    def __init__(self, specs):
        self._nodes = [comfy_node_class(spec) for spec in specs]

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(self._nodes)
