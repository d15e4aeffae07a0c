"""SA-1B per-image JSON: ``{"image": {...}, "annotations": [...]}`` with COCO RLE counts as str."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import fsspec
import numpy as np

from .masks import coco_encode_rle

IMAGE_KEYS = ("image_id", "width", "height", "file_name")
ANNOTATION_KEYS = ("id", "segmentation", "bbox", "area", "predicted_iou", "stability_score",
                   "crop_box", "point_coords")


def to_coco_rle(segmentation: Any) -> Dict[str, Any]:
    """Any generator output (HxW bool array, uncompressed RLE, COCO RLE) -> COCO RLE, str counts."""
    if isinstance(segmentation, np.ndarray):
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(segmentation.astype(np.uint8)))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = coco_encode_rle(segmentation)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        rle = dict(segmentation)
    else:
        raise ValueError(f"Not a mask or RLE: {type(segmentation).__name__}.")
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]],
            "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def sa1b_document(
    image_id: int, file_name: str, width: int, height: int, records: Sequence[Dict[str, Any]],
    first_annotation_id: int = 0,
) -> Dict[str, Any]:
    """SA-1B JSON document for one image from generator records (any output mode)."""
    annotations = []
    for i, r in enumerate(records):
        annotations.append({
            "id": int(first_annotation_id + i),
            "segmentation": to_coco_rle(r["segmentation"]),
            "bbox": [float(v) for v in r["bbox"]],
            "area": int(r["area"]),
            "predicted_iou": float(r["predicted_iou"]),
            "stability_score": float(r["stability_score"]),
            "crop_box": [float(v) for v in r["crop_box"]],
            "point_coords": [[float(x), float(y)] for x, y in r["point_coords"]],
        })
    image = {"image_id": int(image_id), "width": int(width), "height": int(height),
             "file_name": str(file_name)}
    return {"image": image, "annotations": annotations}


def write_sa1b_json(path: str, document: Dict[str, Any], storage_options: Optional[Mapping[str, Any]] = None) -> None:
    """Write a document to a local path or fsspec URI (``storage_options`` for its filesystem)."""
    validate_sa1b(document)
    with fsspec.open(path, "w", **dict(storage_options or {})) as f:
        f.write(json.dumps(document))  # one C-encoded string; json.dump writes token by token, ~10x slower


def read_sa1b_json(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Read and validate an SA-1B JSON file from a local path or fsspec URI."""
    with fsspec.open(path, "r", **dict(storage_options or {})) as f:
        document = json.load(f)
    validate_sa1b(document, where=path)
    return document


def validate_sa1b(document: Dict[str, Any], where: str = "document") -> None:
    """Raise ValueError naming the first missing or malformed field."""
    if not isinstance(document, dict) or "image" not in document or "annotations" not in document:
        raise ValueError(f"{where}: expected an object with 'image' and 'annotations'.")
    missing = [k for k in IMAGE_KEYS if k not in document["image"]]
    if missing:
        raise ValueError(f"{where}: image lacks {missing}.")
    for i, ann in enumerate(document["annotations"]):
        missing = [k for k in ANNOTATION_KEYS if k not in ann]
        if missing:
            raise ValueError(f"{where}: annotation {i} lacks {missing}.")
        seg = ann["segmentation"]
        if not isinstance(seg.get("counts"), str) or len(seg.get("size", ())) != 2:
            raise ValueError(f"{where}: annotation {i} segmentation is not a COCO RLE with str counts.")


def decode_masks(document: Dict[str, Any]) -> List[np.ndarray]:
    """HxW bool masks of every annotation, decoded with pycocotools."""
    from pycocotools import mask as mask_utils

    return [mask_utils.decode(a["segmentation"]).astype(bool) for a in document["annotations"]]
