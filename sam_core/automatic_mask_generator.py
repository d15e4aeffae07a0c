"""``segment_anything.automatic_mask_generator`` under our package name (the generator is
defined in :mod:`sam_core.amg.generator`)."""

from .amg.generator import SamAutomaticMaskGenerator

__all__ = ["SamAutomaticMaskGenerator"]
