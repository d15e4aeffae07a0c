"""``segment_anything.build_sam`` under our package name: the model builders and registry
(defined in :mod:`sam_core.build`)."""

from .build import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, sam_model_registry

__all__ = ["build_sam", "build_sam_vit_b", "build_sam_vit_h", "build_sam_vit_l", "sam_model_registry"]
