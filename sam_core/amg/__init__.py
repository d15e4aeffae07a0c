"""Automatic mask generation: point grids, crops, filtering, NMS, RLE and SA-1B files."""

from .generator import PRESETS, SA1B_PRESET, SamAutomaticMaskGenerator, check_generator_settings
from .mask_data import MaskData

__all__ = ["MaskData", "PRESETS", "SA1B_PRESET", "SamAutomaticMaskGenerator", "check_generator_settings"]
