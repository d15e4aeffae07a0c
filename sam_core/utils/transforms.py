"""``segment_anything.utils.transforms``: :class:`ResizeLongestSide` (see :mod:`sam_core.transforms`)."""

from ..transforms import ResizeLongestSide

__all__ = ["ResizeLongestSide"]
