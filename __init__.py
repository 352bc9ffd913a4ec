"""ComfyUI-AdaptiveDrag: point-based drag editing (AdaptiveDrag, FreeDrag, DragDiffusion) for SD1.5 in ComfyUI.

ComfyUI loads this folder as a custom node pack and calls ``comfy_entrypoint`` (V3 node schema). Importing it
without ComfyUI works too (the entry point is then unusable, the node logic is not).
"""

import os
import sys

try:
    import adaptivedrag_core  # noqa: F401  (installed with pip, or found below)
except ImportError:
    # Appended, not prepended: the pack folder holds a `nodes` package that must not shadow ComfyUI's nodes.py.
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the pack's extension with every node.

    The nodes are imported here rather than at module level, so importing this file never fails: ComfyUI imports
    the folder as a package, but a tool (pytest, a linter) may import this file on its own, with no parent package.
    """
    from .nodes import NODE_SPECS
    from .nodes.comfy_schema import AdaptiveDragExtension

    return AdaptiveDragExtension(NODE_SPECS)


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
