"""Exports of the Parquet tables: SA-1B per-image JSON files and COCO instance-segmentation JSON.

Both read one completed shard at a time, so memory stays bounded by the largest shard.
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import fsspec

from sam_core.amg.sa1b import sa1b_document, write_sa1b_json

from .output import OutputDir

COCO_CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


def images_with_masks(tables: OutputDir) -> Iterator[Tuple[Dict[str, Any], List[Dict[str, Any]]]]:
    """(image row, its mask rows in mask_id order) for every ok image, in shard and file order."""
    for shard_id in tables.shard_ids():
        by_image: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for row in tables.read_shard("masks", shard_id).to_pylist():
            by_image[row["image_id"]].append(row)
        for image in tables.read_shard("images", shard_id).to_pylist():
            if image["status"] == "ok":
                yield image, sorted(by_image.get(image["image_id"], []), key=lambda r: r["mask_id"])


def _record(row: Dict[str, Any]) -> Dict[str, Any]:
    """A masks-table row as a generator record (COCO RLE segmentation)."""
    return {
        "segmentation": {"size": [row["height"], row["width"]], "counts": row["counts"]},
        "area": row["area"], "bbox": row["bbox"], "predicted_iou": row["predicted_iou"],
        "stability_score": row["stability_score"],
        "point_coords": [] if row["point_coords"] is None else [row["point_coords"]],  # none: a box prompt
        "crop_box": row["crop_box"],
    }


def export_sa1b_json(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> int:
    """Write ``<dest>/<shard>/<image stem>.json`` per ok image; image and annotation ids are
    numbered in shard and file order. Returns the number of files written."""
    tables = OutputDir(tables_uri, storage_options)
    written, next_ann = 0, 0
    for image_id, (image, masks) in enumerate(images_with_masks(tables)):
        name = posixpath.basename(image["image_id"])
        doc = sa1b_document(image_id, name, image["width"], image["height"], [_record(m) for m in masks],
                            first_annotation_id=next_ann)
        next_ann += len(masks)
        write_sa1b_json(posixpath.join(dest_uri, image["shard"], posixpath.splitext(name)[0] + ".json"), doc)
        written += 1
    return written


def export_coco(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
    """One COCO instance-segmentation JSON (class-agnostic: every mask is category 1, "object"),
    loadable by ``pycocotools.coco.COCO`` and usable as results in ``COCOeval`` (``score`` =
    predicted IoU). Returns counts of images and annotations."""
    tables = OutputDir(tables_uri, storage_options)
    images, annotations = [], []
    for image_id, (image, masks) in enumerate(images_with_masks(tables), start=1):
        images.append({"id": image_id, "file_name": image["image_id"], "width": image["width"],
                       "height": image["height"], "source_uri": image["uri"]})
        for m in masks:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": COCO_CATEGORY["id"],
                "segmentation": {"size": [m["height"], m["width"]], "counts": m["counts"]},
                "area": m["area"], "bbox": m["bbox"], "iscrowd": 0, "score": m["predicted_iou"],
                "predicted_iou": m["predicted_iou"], "stability_score": m["stability_score"],
            })
    doc = {"info": {"description": "SAM automatic masks", "source_tables": tables_uri},
           "images": images, "annotations": annotations, "categories": [COCO_CATEGORY]}
    with fsspec.open(dest_uri, "w", **dict(storage_options or {})) as f:
        json.dump(doc, f)
    return {"images": len(images), "annotations": len(annotations)}
