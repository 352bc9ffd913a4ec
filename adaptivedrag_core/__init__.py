"""adaptivedrag_core: point-based drag editing for Stable Diffusion 1.5 (DragDiffusion, FreeDrag, AdaptiveDrag).

A pure library: it never imports ComfyUI. The ComfyUI nodes in ``nodes/`` wrap it.
"""

from .errors import InputError
from .points import DragPoints, PointsError

__all__ = ["DragPoints", "InputError", "PointsError"]
__version__ = "0.1.0"
