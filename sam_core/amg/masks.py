"""Mask, box, grid and RLE operations of automatic mask generation.

Each function gives the same numbers as its namesake in ``segment_anything.utils.amg``; the RLE
encoder differs only in speed (one host transfer per batch instead of one per mask).
"""

from __future__ import annotations

import functools
import math
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

Rle = Dict[str, Any]  # uncompressed COCO RLE: {"size": [h, w], "counts": [int, ...]}, column-major


# ------------------------------------------------------------------ grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n)x2 grid of (x, y) points evenly spaced in [0, 1]^2, at cell centres."""
    offset = 1 / (2 * n_per_side)
    points_one_side = np.linspace(offset, 1 - offset, n_per_side)
    points_x = np.tile(points_one_side[None, :], (n_per_side, 1))
    points_y = np.tile(points_one_side[:, None], (1, n_per_side))
    return np.stack([points_x, points_y], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer; layer i has ``n_per_side / scale_per_layer**i`` points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes of every layer (layer i: (2**i)**2 overlapping crops) and their layer index."""
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes, layer_idxs = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n_crops_per_side = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n_crops_per_side))
        crop_w = crop_len(im_w, n_crops_per_side, overlap)
        crop_h = crop_len(im_h, n_crops_per_side, overlap)
        crop_box_x0 = [int((crop_w - overlap) * i) for i in range(n_crops_per_side)]
        crop_box_y0 = [int((crop_h - overlap) * i) for i in range(n_crops_per_side)]
        for x0, y0 in product(crop_box_x0, crop_box_y0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


# ------------------------------------------------------------------ boxes and scores
def calculate_stability_score(masks: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``: ...xHxW -> ...

    Counts accumulate as int16 per row then int32, as the official code does (same results).
    """
    intersections = (masks > (mask_threshold + offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    unions = (masks > (mask_threshold - offset)).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return intersections / unions


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """Tight XYXY boxes (inclusive max) of ...xHxW boolean masks -> ...x4 int64; [0,0,0,0] if empty."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device, dtype=torch.long)
    shape = masks.shape
    masks = masks.flatten(0, -3) if masks.dim() > 2 else masks.unsqueeze(0)  # (N, H, W)
    out = _boxes_from_projections(masks.amax(dim=-1), masks.amax(dim=-2))
    return out.reshape(*shape[:-2], 4) if len(shape) > 2 else out[0]


def _boxes_from_projections(in_height: torch.Tensor, in_width: torch.Tensor) -> torch.Tensor:
    """XYXY boxes from whether each row (N, H) and each column (N, W) has a pixel -> (N, 4) int64."""
    h, w = in_height.shape[-1], in_width.shape[-1]
    rows = torch.arange(h, device=in_height.device)
    cols = torch.arange(w, device=in_width.device)
    bottom = (in_height * rows).amax(dim=-1)
    top = (in_height * rows + h * ~in_height).amin(dim=-1)
    right = (in_width * cols).amax(dim=-1)
    left = (in_width * cols + w * ~in_width).amin(dim=-1)
    empty = (right < left) | (bottom < top)
    return torch.stack([left, top, right, bottom], dim=-1) * (~empty).unsqueeze(-1)


def _threshold_reductions(masks: torch.Tensor, low: Any, threshold: Any, high: Any,
                          with_area: bool = False) -> Tuple[torch.Tensor, ...]:
    """(M, H, W) logits and three thresholds (floats, or 0-dim tensors of the logits' dtype) ->
    pixels above ``high`` (M,) int32, above ``low`` (M,) int32, and whether each row (M, H) /
    column (M, W) has one above ``threshold``; with ``with_area`` then pixels above ``threshold``
    (M,) int64. Integer counts and comparisons only, so a compiled (fused) version gives the same values."""
    above_high = (masks > high).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    above_low = (masks > low).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    binary = masks > threshold
    out = (above_high, above_low, binary.amax(dim=-1), binary.amax(dim=-2))
    return out + (binary.sum(dim=(-2, -1), dtype=torch.int64),) if with_area else out


_compiled_reductions: Optional[Any] = None


def mask_statistics(masks: torch.Tensor, mask_threshold: float, offset: float,
                    compiled: bool = False, with_area: bool = False) -> Tuple[torch.Tensor, ...]:
    """Stability scores (M,) and XYXY boxes (M, 4) int64 of (M, H, W) logits: the values of
    ``calculate_stability_score(masks, mask_threshold, offset)`` and
    ``batched_mask_to_box(masks > mask_threshold)``; with ``with_area`` also the masks' areas
    (M,) int64, pixels above ``mask_threshold``.

    ``compiled``: run the reductions as one ``torch.compile``d function (with ``dynamic=True``, so
    the chunk and crop sizes share a compilation). Eager PyTorch makes five passes over the
    full-resolution logits and writes three boolean copies of them; the compiled one reads them
    about once. Same values either way: comparisons and integer counts only; the compiled one gets
    the thresholds as 0-dim tensors of the logits' dtype, so whatever the backend it compares in
    that dtype, as eager PyTorch does with the official Python floats.
    """
    global _compiled_reductions
    thresholds = (mask_threshold - offset, mask_threshold, mask_threshold + offset)
    if compiled and masks.numel() > 0:
        if _compiled_reductions is None:
            _compiled_reductions = torch.compile(_threshold_reductions, dynamic=True)
        reduced = _compiled_reductions(masks, *_threshold_tensors(thresholds, masks.dtype, masks.device),
                                       with_area=with_area)
    else:
        reduced = _threshold_reductions(masks, *thresholds, with_area=with_area)  # Python floats, as the official code
    above_high, above_low, in_height, in_width, *area = reduced
    return (above_high / above_low, _boxes_from_projections(in_height, in_width), *area)


@functools.lru_cache(maxsize=16)
def _threshold_tensors(values: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """0-dim tensors of ``values`` (made once per settings, so no host-to-device copy per chunk)."""
    return tuple(torch.tensor(v, dtype=dtype, device=device) for v in values)


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> torch.Tensor:
    """Nx4 crop-frame boxes -> N bools: touching a crop edge that is not an image edge."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = uncrop_boxes_xyxy(boxes, crop_box).float()
    near_crop = torch.isclose(boxes, crop_t[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig_t[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def box_xyxy_to_xywh(box: np.ndarray) -> np.ndarray:
    out = np.array(box, copy=True)
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


def uncrop_boxes_xyxy(boxes: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    x0, y0 = crop_box[0], crop_box[1]
    return boxes + torch.tensor([[x0, y0, x0, y0]], device=boxes.device)


def uncrop_points(points: torch.Tensor, crop_box: Sequence[int]) -> torch.Tensor:
    x0, y0 = crop_box[0], crop_box[1]
    return points + torch.tensor([[x0, y0]], device=points.device)


# ------------------------------------------------------------------ RLE
def mask_to_rle(masks: torch.Tensor, crop_box: Optional[Sequence[int]] = None,
                image_size: Optional[Tuple[int, int]] = None) -> List[Rle]:
    """NxHxW boolean masks -> N uncompressed RLEs, with one device-to-host transfer in all.

    With ``crop_box`` (XYXY) and ``image_size`` (H, W) the masks are crops (N x y1-y0 x x1-x0)
    and the RLEs are of the image, background outside the crop: the RLEs of the masks padded
    to the image, without building image-size masks. Runs alternate starting with background
    (a leading 0 when the first pixel is set), column by column.
    """
    n, h, w = masks.shape
    if (crop_box is None) != (image_size is None):
        raise ValueError("Give crop_box and image_size together (or neither).")
    x0, y0, x1, y1 = (int(v) for v in crop_box) if crop_box is not None else (0, 0, w, h)
    img_h, img_w = (int(v) for v in image_size) if image_size is not None else (h, w)
    if (y1 - y0, x1 - x0) != (h, w) or min(x0, y0) < 0 or x1 > img_w or y1 > img_h:
        raise ValueError(f"Masks of {h}x{w} do not fit crop box {[x0, y0, x1, y1]} (XYXY) "
                         f"in an image of {img_h}x{img_w}.")
    if n == 0:
        return []
    pixels = img_h * img_w
    # Changes found in the masks' own layout, one column at a time: change[:, r, c] says pixel
    # (r, c) differs from the one above it, the top row's from background and, at r = h, the
    # background below from the bottom row. Each is keyed by its mask and the image's
    # column-major index of the pixel after it, so sorting the keys gives RLE order.
    change = torch.empty(n, h + 1, w, dtype=torch.bool, device=masks.device)
    change[:, 0], change[:, h] = masks[:, 0], masks[:, -1]
    torch.bitwise_xor(masks[:, 1:], masks[:, :-1], out=change[:, 1:h])
    index, row, col = change.nonzero().unbind(1)
    keys = index * (pixels + 1) + (x0 + col) * img_h + y0 + row
    # A crop spanning whole columns puts a column's bottom change and the next column's top
    # change at the same index: together they are one change if the two pixels differ, i.e.
    # if exactly one of them was found. Pairs are dropped on the host, after the one transfer
    # (so the device waits twice per call: for the nonzero and for the transfer).
    keys = keys.sort().values.cpu().numpy()
    run_starts = np.flatnonzero(np.diff(keys, prepend=-1))
    odd = np.diff(run_starts, append=keys.size) % 2 == 1
    keys = keys[run_starts[odd]]
    index, positions = np.divmod(keys, pixels + 1)
    bounds = np.searchsorted(index, np.arange(n + 1))
    out = []
    for i in range(n):
        starts = positions[bounds[i] : bounds[i + 1]]  # where each run after the first begins
        if starts.size and starts[-1] == pixels:  # the last pixel is set: its run ends there
            starts = starts[:-1]
        counts = np.diff(np.concatenate(([0], starts, [pixels]))).tolist()
        out.append({"size": [img_h, img_w], "counts": counts})
    return out


def mask_to_rle_numpy(mask: np.ndarray, box: Optional[Tuple[int, int, int, int]] = None) -> Rle:
    """HxW bool array -> uncompressed RLE, as :func:`mask_to_rle` gives. Only the columns from
    the first to the last with a set pixel are scanned (the rest are one run of background);
    ``box`` ((left, top, right, bottom) inclusive), if the caller knows it, saves finding them."""
    h, w = mask.shape
    if box is None:
        cols = np.flatnonzero(mask.any(axis=0))
        if cols.size == 0:
            return {"size": [h, w], "counts": [h * w]}
        left, right = int(cols[0]), int(cols[-1])
    else:
        left, right = int(box[0]), int(box[2])
    start, end = left * h, (right + 1) * h  # that span in column-major order
    flat = mask[:, left : right + 1].T.ravel()
    changes = [np.flatnonzero(flat[1:] != flat[:-1]) + (start + 1)]
    if flat[0] and start > 0:
        changes.insert(0, np.array([start]))
    if flat[-1] and end < h * w:
        changes.append(np.array([end]))
    counts = np.diff(np.concatenate([[0], *changes, [h * w]])).tolist()
    return {"size": [h, w], "counts": ([0] + counts) if (flat[0] and start == 0) else counts}


def rle_to_mask(rle: Rle, box: Optional[Tuple[int, int, int, int]] = None) -> np.ndarray:
    """Uncompressed RLE -> HxW bool array. With the mask's ``box`` (:func:`rle_box`) only the
    columns it spans are written (the rest of the array is zeros the OS has not touched)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    if box is None:
        return np.repeat(values, counts).reshape(w, h).T
    lo, hi = box[0] * h, (box[2] + 1) * h  # the box's columns in column-major order
    ends = np.cumsum(counts)
    clipped = np.clip(ends, lo, hi) - np.clip(ends - counts, lo, hi)
    mask = np.zeros((w, h), dtype=bool)
    mask.reshape(-1)[lo:hi] = np.repeat(values, clipped)
    return mask.T


def rle_box(rle: Rle) -> Optional[Tuple[int, int, int, int]]:
    """(left, top, right, bottom), inclusive, of an uncompressed RLE's mask, from its runs
    alone; None if it is empty. A run that crosses into another column covers the bottom row of
    the first and the top row of the next."""
    h = int(rle["size"][0])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    ends = np.cumsum(counts)
    starts, ends = (ends - counts)[1::2], ends[1::2]  # runs of set pixels: [start, end)
    filled = ends > starts
    starts, ends = starts[filled], ends[filled] - 1
    if starts.size == 0:
        return None
    first_col, last_col = starts // h, ends // h
    in_one_col = first_col == last_col
    top = 0 if not in_one_col.all() else int((starts % h).min())
    bottom = h - 1 if not in_one_col.all() else int((ends % h).max())
    return int(first_col.min()), top, int(last_col.max()), bottom


def area_from_rle(rle: Rle) -> int:
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: Rle) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    h, w = rle["size"]
    out = mask_utils.frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out


# ------------------------------------------------------------------ small regions
def _box_or_none(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """(left, top, right, bottom), inclusive, of an HxW bool mask; None if it is empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return None
    rows = np.flatnonzero(mask[:, cols[0] : cols[-1] + 1].any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than ``area_thresh``
    in an HxW bool mask. Returns the mask and whether it changed.

    Same result as the official function, which labels the connected components of the whole
    image; here only a window around the mask's box is labelled (a mask usually covers a small
    part of the image, so this is many times faster). The window keeps one background pixel
    around the box and starts at even coordinates, so OpenCV's 2x2-block labelling numbers the
    components in the same order as on the whole image (that order decides which island is kept
    when all are small). Background outside the window is added to the size of the component it
    joins; if that component is a small hole the whole image is labelled instead.
    """
    mask, changed, _ = remove_small_regions_boxed(mask, area_thresh, mode, _box_or_none(mask))
    return mask, changed


def remove_small_regions_boxed(
    mask: np.ndarray, area_thresh: float, mode: str, box: Optional[Tuple[int, int, int, int]]
) -> Tuple[np.ndarray, bool, Optional[Tuple[int, int, int, int]]]:
    """:func:`remove_small_regions` of a mask whose box (as :func:`_box_or_none` gives it) the
    caller knows; also returns the box of the result. No pass over the whole image unless a
    small hole reaches beyond the window."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    correct_holes = mode == "holes"
    h, w = mask.shape
    if box is None:
        window = (0, h, 0, w)
    else:
        left, top, right, bottom = box
        window = (max(top - 1, 0) & ~1, min(bottom + 2, h), max(left - 1, 0) & ~1, min(right + 2, w))
    out, changed, (y0, y1, x0, x1) = _remove_small_regions_window(mask, area_thresh, correct_holes, window)
    if not changed:
        return mask, False, box
    inner = _box_or_none(out[y0:y1, x0:x1])  # every set pixel of the result is in the window labelled
    return out, True, None if inner is None else (inner[0] + x0, inner[1] + y0, inner[2] + x0, inner[3] + y0)


def _remove_small_regions_window(
    mask: np.ndarray, area_thresh: float, correct_holes: bool, window: Tuple[int, int, int, int]
) -> Tuple[np.ndarray, bool, Tuple[int, int, int, int]]:
    """:func:`remove_small_regions` labelling ``mask[y0:y1, x0:x1]``; the window holds every
    mask pixel and, on each side not at the image edge, at least one background pixel. Also
    returns the window labelled in the end (the whole image if a small hole reached outside)."""
    import cv2

    h, w = mask.shape
    y0, y1, x0, x1 = window
    working = (correct_holes ^ mask[y0:y1, x0:x1]).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    outside = set()  # labels of holes-mode components that go on outside the window
    if correct_holes:
        # The background strips beyond each window side, and a label on that side's window edge.
        for present, area, label in ((y0 > 0, y0 * w, regions[0, 0]), (y1 < h, (h - y1) * w, regions[-1, 0]),
                                     (x0 > 0, x0 * (y1 - y0), regions[0, 0]),
                                     (x1 < w, (w - x1) * (y1 - y0), regions[0, -1])):
            if present:
                sizes[label] += area
                outside.add(int(label))
    small = [i for i in range(1, n_labels) if sizes[i] < area_thresh]
    if not small:
        return mask, False, window
    if outside.intersection(small):  # a small hole reaching beyond the window: label everything
        return _remove_small_regions_window(mask, area_thresh, correct_holes, (0, h, 0, w))
    fill_labels = [0] + small
    if not correct_holes:
        fill_labels = [i for i in range(n_labels) if i not in fill_labels]
        if not fill_labels:  # every island is small: keep the largest
            fill_labels = [int(np.argmax(sizes[1:])) + 1]
    lookup = np.zeros(n_labels, dtype=bool)
    lookup[fill_labels] = True
    out = np.zeros((h, w), dtype=bool)  # outside the window: background, and it stays so
    out[y0:y1, x0:x1] = lookup[regions]
    return out, True, window
