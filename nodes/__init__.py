"""The pack's nodes: one module per stage, each holding a plain run function and its :class:`NodeSpec`.

``NODE_SPECS`` is the pack's node list, in menu order. ComfyUI's V3 classes are generated from it by
``comfy_schema.py``; everything else here runs without ComfyUI.
"""

from . import closs_sampler, ddim_inversion, drag_points, identity_lora, sam2_mask, semantic_drag, working_copy

NODE_SPECS = (
    drag_points.SPEC,
    working_copy.SPEC,
    sam2_mask.LOADER_SPEC,
    sam2_mask.MASK_SPEC,
    identity_lora.SPEC,
    ddim_inversion.SPEC,
    semantic_drag.SPEC,
    closs_sampler.SPEC,
)
