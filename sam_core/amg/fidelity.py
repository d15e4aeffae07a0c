"""How far one set of generated masks is from another (fast mode against exact mode)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from .sa1b import to_coco_rle


@dataclass(frozen=True)
class Fidelity:
    reference_masks: int  # masks in the reference (exact) output
    candidate_masks: int  # masks in the candidate (fast) output
    median_matched_iou: float  # median IoU of the one-to-one matches (0 when nothing matched)
    matched_at_0_9: float  # fraction of reference masks matched with IoU >= 0.9

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def compare_records(reference: Sequence[Dict[str, Any]], candidate: Sequence[Dict[str, Any]]) -> Fidelity:
    """Greedy one-to-one matching by mask IoU (highest first) of two generator outputs."""
    from pycocotools import mask as mask_utils

    ref = [to_coco_rle(r["segmentation"]) for r in reference]
    cand = [to_coco_rle(r["segmentation"]) for r in candidate]
    if not ref or not cand:
        both_empty = not ref and not cand
        return Fidelity(len(ref), len(cand), 1.0 if both_empty else 0.0, 1.0 if both_empty else 0.0)
    ious = np.asarray(mask_utils.iou(cand, ref, [0] * len(ref)))  # (candidate, reference)
    matched: List[float] = []
    used_c, used_r = set(), set()
    for flat in np.argsort(-ious, axis=None):
        c, r = np.unravel_index(flat, ious.shape)
        if c in used_c or r in used_r or ious[c, r] <= 0:
            continue
        used_c.add(c)
        used_r.add(r)
        matched.append(float(ious[c, r]))
    matched_arr = np.array(matched)
    return Fidelity(
        reference_masks=len(ref),
        candidate_masks=len(cand),
        median_matched_iou=float(np.median(matched_arr)) if matched else 0.0,
        matched_at_0_9=float((matched_arr >= 0.9).sum() / len(ref)),
    )
