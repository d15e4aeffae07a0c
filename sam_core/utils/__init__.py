"""The official package's helper modules under the same names, so that imports carry over:
``segment_anything.utils.transforms`` -> ``sam_core.utils.transforms`` and
``segment_anything.utils.amg`` -> ``sam_core.utils.amg`` (same functions, signatures and results)."""
