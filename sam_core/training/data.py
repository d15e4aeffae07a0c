"""Training samples: procedural scenes (endless) and COCO instance-segmentation files (repeated).

Both yield :class:`~sam_core.training.finetune.Sample`. Our Parquet tables are read by
``pipeline.training_data.table_samples`` (it needs the pipeline's storage and image decoding).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from .finetune import Sample
from .scenes import SceneSpec, make_scene, scene_sizes

log = logging.getLogger(__name__)


def scene_samples(seed: int = 0, min_side: int = 192, max_side: int = 320,
                  spec: SceneSpec = SceneSpec()) -> Iterator[Sample]:
    """An endless, seeded stream of procedural scenes of random sizes."""
    rng = np.random.default_rng(seed)
    while True:
        image, masks = make_scene(rng, scene_sizes(rng, min_side, max_side), spec)
        if masks:
            yield Sample(image, masks)


def check_coco(path: str, doc: Any, image_keys: Sequence[str], annotation_keys: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``doc`` (the JSON of ``path``) has ``images`` and ``annotations``
    lists whose entries are objects with ``image_keys`` and ``annotation_keys``; the message names
    how many lack one and shows the first."""
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise ValueError(f"{path}: a COCO file needs 'images' and 'annotations' lists.")
    for what, keys in (("images", image_keys), ("annotations", annotation_keys)):
        entries = doc[what]
        bad = [i for i, e in enumerate(entries) if not isinstance(e, dict) or any(k not in e for k in keys)]
        if bad:
            raise ValueError(f"{path}: {len(bad)} of its {what} lack one of {', '.join(repr(k) for k in keys)} "
                             f"(e.g. {what}[{bad[0]}] = {json.dumps(entries[bad[0]])[:200]}).")


def coco_rle(segmentation: Any, height: int, width: int) -> Dict[str, Any]:
    """COCO segmentation (polygon list, uncompressed RLE or compressed RLE with str or bytes
    counts) -> compressed RLE in pycocotools' form (counts as bytes)."""
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation:
        counts = segmentation["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segmentation, height, width)
        return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    raise ValueError(f"Unsupported COCO segmentation of type {type(segmentation).__name__}.")


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons or RLE) -> HxW bool."""
    return mask_utils.decode(coco_rle(segmentation, height, width)).astype(bool)


def load_coco(json_path: str, image_root: Optional[str] = None) -> List[Tuple[str, Dict[str, Any], List[Dict[str, Any]]]]:
    """(image path, image entry, its non-crowd annotations) for every image with at least one
    annotation. Crowd annotations and images without annotations are counted in the log."""
    with open(json_path) as f:
        doc = json.load(f)
    check_coco(json_path, doc, ("id", "file_name"), ("image_id", "segmentation"))
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(json_path))
    anns: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    crowd = 0
    for a in doc.get("annotations", []):
        if a.get("iscrowd", 0):
            crowd += 1
            continue
        anns[a["image_id"]].append(a)
    out, empty = [], 0
    for img in doc.get("images", []):
        if not anns.get(img["id"]):
            empty += 1
            continue
        out.append((os.path.join(root, img["file_name"]), img, anns[img["id"]]))
    log.info("%s: %d images with masks; not used for training: %d crowd annotations, %d images "
             "without annotations", json_path, len(out), crowd, empty)
    if not out:
        raise ValueError(f"{json_path} has no image with a (non-crowd) annotation to train on.")
    return out


def read_rgb(path: str) -> np.ndarray:
    """An image file as upright HxWx3 uint8 RGB."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def coco_samples(json_path: str, image_root: Optional[str] = None, seed: int = 0) -> Iterator[Sample]:
    """Endless shuffled passes over a COCO instance-segmentation file's images."""
    entries = load_coco(json_path, image_root)
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.permutation(len(entries)):
            path, img, anns = entries[i]
            image = read_rgb(path)
            h, w = image.shape[:2]
            if (img.get("height", h), img.get("width", w)) != (h, w):
                raise ValueError(f"{path} is {w}x{h} but {json_path} says {img.get('width')}x{img.get('height')}.")
            yield Sample(image, [decode_segmentation(a["segmentation"], h, w) for a in anns])
