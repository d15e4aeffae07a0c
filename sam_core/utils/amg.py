"""``segment_anything.utils.amg``: the automatic mask generator's helpers under their official
names and signatures, with the official results (checked in ``tests/test_model_parity.py``).
Most are :mod:`sam_core.amg.masks`' own; where ours take other argument names or more options,
the official call is kept here."""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Dict, Generator, List

import numpy as np
import torch

from ..amg import masks as _masks
from ..amg.mask_data import MaskData
from ..amg.masks import (area_from_rle, batched_mask_to_box, build_all_layer_point_grids, build_point_grid,
                         generate_crop_boxes, is_box_near_crop_edge, remove_small_regions, uncrop_boxes_xyxy,
                         uncrop_points)

__all__ = ["MaskData", "area_from_rle", "batch_iterator", "batched_mask_to_box", "box_xyxy_to_xywh",
           "build_all_layer_point_grids", "build_point_grid", "calculate_stability_score", "coco_encode_rle",
           "generate_crop_boxes", "is_box_near_crop_edge", "mask_to_rle_pytorch", "remove_small_regions",
           "rle_to_mask", "uncrop_boxes_xyxy", "uncrop_masks", "uncrop_points"]


def batch_iterator(batch_size: int, *args: Any) -> Generator[List[Any], None, None]:
    """Slices of ``batch_size`` along the first axis of every one of ``args`` (all the same length)."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("Batched iteration needs at least one input, all of the same length.")
    n_batches = len(args[0]) // batch_size + int(len(args[0]) % batch_size != 0)
    for b in range(n_batches):
        yield [arg[b * batch_size : (b + 1) * batch_size] for arg in args]


def box_xyxy_to_xywh(box_xyxy: torch.Tensor) -> torch.Tensor:
    """One XYXY box (a tensor, array or list of 4) as XYWH, a copy of the same type."""
    box_xywh = deepcopy(box_xyxy)
    box_xywh[2] = box_xywh[2] - box_xywh[0]
    box_xywh[3] = box_xywh[3] - box_xywh[1]
    return box_xywh


def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, threshold_offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``mask_threshold`` ± ``threshold_offset`` (logits ...xHxW -> ...)."""
    return _masks.calculate_stability_score(masks, mask_threshold, threshold_offset)


def coco_encode_rle(uncompressed_rle: Dict[str, Any]) -> Dict[str, Any]:
    """An uncompressed RLE as COCO's compressed one ({"size", "counts": str})."""
    return _masks.coco_encode_rle(uncompressed_rle)


def mask_to_rle_pytorch(tensor: torch.Tensor) -> List[Dict[str, Any]]:
    """BxHxW boolean masks -> B uncompressed RLEs (column-major runs, starting with background)."""
    return _masks.mask_to_rle(tensor)


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """An uncompressed RLE -> HxW bool array."""
    return _masks.rle_to_mask(rle)


def uncrop_masks(masks: torch.Tensor, crop_box: List[int], orig_h: int, orig_w: int) -> torch.Tensor:
    """Masks of crop ``crop_box`` (XYXY) padded with background to ``orig_h`` x ``orig_w``."""
    x0, y0, x1, y1 = crop_box
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return torch.nn.functional.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)
