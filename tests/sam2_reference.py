"""Meta's SAM2 (the ``sam2`` package, a test-only dependency) as the reference for the transformers path: random
checkpoints with Meta's tensor names, and the image embedding as SAM2's own image predictor computes it."""

import warnings

import numpy as np
import torch

from adaptivedrag_core.sam2_generator import build_package_model
from adaptivedrag_core.sam2_loader import Sam2Spec


def reference_model(size: str, seed: int, version: str = "2.1"):
    """A random ``SAM2Base`` in eval mode whose every tensor is random: SAM2's initialisation leaves some at zero
    (positional embeddings, the "no memory" embedding), where a wrong name mapping would go unnoticed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_package_model(Sam2Spec(version, size)).eval()
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.add_(0.02 * torch.randn_like(tensor))
    return model


def reference_features(model, image: np.ndarray) -> torch.Tensor:
    """The embedding [256, 64, 64] that SAM2's image predictor hands to its mask decoder."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script in SAM2's transforms
        predictor = SAM2ImagePredictor(model)
    predictor.set_image(np.array(image, dtype=np.uint8))
    return predictor.get_image_embedding()[0].float().cpu()


class RecordedEncoder:
    """Returns a feature map computed once, so one forward pass serves several auto masks."""

    def __init__(self, feature_map: torch.Tensor):
        self.feature_map = feature_map

    def features(self, image):
        return self.feature_map
