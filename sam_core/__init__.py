"""sam_core: Segment Anything, checkpoint-compatible with the official package."""

from .amg import SA1B_PRESET
from .automatic_mask_generator import SamAutomaticMaskGenerator
# As in the official package, ``sam_core.build_sam`` is the function; the module of that name
# (imported here first) stays importable as ``from sam_core.build_sam import ...``.
from .build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry
from .checkpoint import CheckpointError
from .config import PRESETS, SamConfig, get_config
from .predictor import ImageEmbedding, SamPredictor

__all__ = [
    "CheckpointError",
    "ImageEmbedding",
    "PRESETS",
    "SamConfig",
    "SA1B_PRESET",
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "get_config",
    "sam_model_registry",
]
