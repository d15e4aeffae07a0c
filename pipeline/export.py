"""Exports of the Parquet tables: SA-1B per-image JSON files, SA-1B-style tar shards (jpg + json)
and COCO instance-segmentation JSON.

Each reads one completed shard at a time, so memory stays bounded by the largest shard.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections import Counter, defaultdict
from itertools import groupby
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import fsspec
from PIL import Image

from sam_core.amg.sa1b import sa1b_document, write_sa1b_json

from .decode import decode_image
from .output import OutputDir
from .shards import filesystem, read_source

EXIF_ORIENTATION = 0x0112
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


def export_stems(names: Sequence[str]) -> Dict[str, str]:
    """Per image name of one shard (``cam1/0001.jpg``), the stem its exported files are named by:
    the name without its extension (``cam1/0001``), or the whole name where that would name two
    images alike (``a.jpg`` and ``a.png`` stay ``a.jpg`` and ``a.png``)."""
    stems = {n: posixpath.splitext(n)[0] for n in names}
    while True:
        count = Counter(stems.values())
        clashing = [n for n, stem in stems.items() if count[stem] > 1 and stem != n]
        if not clashing:  # names are unique, so whole names never clash with each other
            return stems
        for n in clashing:
            stems[n] = n


def sa1b_documents(tables: OutputDir) -> Iterator[Tuple[Dict[str, Any], str, Dict[str, Any]]]:
    """(image row, file stem, SA-1B document) per ok image; the stem is unique within the
    image's shard (:func:`export_stems`). Image and annotation ids are numbered in shard and file
    order, annotation ids unique across the whole export."""
    next_ann, image_id = 0, 0
    for _, shard_images in groupby(images_with_masks(tables), key=lambda pair: pair[0]["shard"]):
        shard_images = list(shard_images)
        names = [image["image_id"].split("/", 1)[1] for image, _ in shard_images]
        stems = export_stems(names)
        for name, (image, masks) in zip(names, shard_images):
            doc = sa1b_document(image_id, name, image["width"], image["height"], [_record(m) for m in masks],
                                first_annotation_id=next_ann)
            next_ann += len(masks)
            image_id += 1
            yield image, stems[name], doc


def _tables(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]]) -> OutputDir:
    """The run's tables, after checking that both they and the destination can be opened (a
    mistyped path or a missing filesystem package fails before anything is read)."""
    filesystem(dest_uri, storage_options)
    return OutputDir.of_run(tables_uri, storage_options)


def export_sa1b_json(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> int:
    """Write ``<dest>/<shard>/<image stem>.json`` per ok image (the stem keeps the image's folders
    within its input: ``cam1/0001.json``). Returns the number of files written."""
    written = 0
    for image, stem, doc in sa1b_documents(_tables(tables_uri, dest_uri, storage_options)):
        write_sa1b_json(posixpath.join(dest_uri, image["shard"], stem + ".json"), doc, storage_options)
        written += 1
    return written


def export_sa1b_tar(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> int:
    """Write ``<dest>/<shard>.tar`` per shard with ``<stem>.jpg`` + ``<stem>.json`` pairs, as SA-1B's
    shards. JPEG sources are copied byte for byte unless EXIF rotates them; other formats (and
    rotated JPEGs) are written as the decoded, upright pixels at quality 95, so the masks always
    match the pixels. Returns the number of images written."""
    opts = dict(storage_options or {})
    written = 0
    tables = _tables(tables_uri, dest_uri, storage_options)
    tar, tar_shard, handle = None, None, None
    try:
        for image, stem, doc in sa1b_documents(tables):
            if image["shard"] != tar_shard:
                if tar is not None:
                    tar.close()
                    handle.close()
                tar_shard = image["shard"]
                handle = fsspec.open(posixpath.join(dest_uri, f"{tar_shard}.tar"), "wb", auto_mkdir=True,
                                     **opts).open()
                tar = tarfile.open(fileobj=handle, mode="w")
            doc["image"]["file_name"] = f"{stem}.jpg"
            _add(tar, f"{stem}.jpg", _upright_jpeg(read_source(image["uri"], storage_options)))
            _add(tar, f"{stem}.json", json.dumps(doc).encode())
            written += 1
    finally:
        if tar is not None:
            tar.close()
            handle.close()
    return written


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _upright_jpeg(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return data
    buf = io.BytesIO()
    Image.fromarray(decode_image(data)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def export_coco(tables_uri: str, dest_uri: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, int]:
    """One COCO instance-segmentation JSON (class-agnostic: every mask is category 1, "object"),
    loadable by ``pycocotools.coco.COCO`` and usable as results in ``COCOeval`` (``score`` =
    predicted IoU). Returns counts of images and annotations."""
    tables = _tables(tables_uri, dest_uri, storage_options)
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
