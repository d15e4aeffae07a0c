"""Quality of generated masks against COCO-format ground truth.

Predictions are our tables (jobs.generate or jobs.prompt output) or a COCO JSON with RLE
segmentations (jobs.export --format coco, or any tool's). Ground-truth images are matched to
predicted ones by path: a ground-truth ``file_name`` matches the prediction whose source URI ends
with it (``scenes/0001.png`` matches ``s3://bucket/data/scenes/0001.png``).

Per image, predicted masks and ground-truth objects are matched one to one, greedily by IoU
(highest first, pairs with IoU > 0). Reported over all ground-truth objects:
- ``miou``: mean IoU of each object's matched mask (0 when unmatched);
- ``recall@0.5`` / ``recall@0.8``: share of objects matched with IoU at least 0.5 / 0.8;
- ``precision@0.5``: share of predicted masks matched with IoU at least 0.5;
- the same per COCO size (small < 32^2 pixels, medium < 96^2, large) by ground-truth area.
Ground-truth images without a usable prediction (absent, or an error row) count as all missed and
are listed; crowd annotations are not objects and are counted apart.
"""

from __future__ import annotations

import json
import posixpath
from collections import defaultdict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from sam_core.training.data import check_coco, coco_rle

from .output import OutputDir
from .storage import open_uri

SIZES = (("small", 0, 32**2), ("medium", 32**2, 96**2), ("large", 96**2, float("inf")))
THRESHOLDS = (0.5, 0.8)


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated together, with the reason."""


def load_ground_truth(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> Tuple[List[Dict[str, Any]], int]:
    """Images of a COCO JSON as dicts {file_name, height, width, objects: [RLE]}, and the number of
    crowd annotations left out."""
    with open_uri(path, "r", storage_options) as f:
        doc = json.load(f)
    check_coco(path, doc, ("id", "file_name", "height", "width"), ("image_id", "segmentation"))
    by_image: Dict[Any, List[Dict[str, Any]]] = defaultdict(list)
    crowd = 0
    for a in doc["annotations"]:
        if a.get("iscrowd", 0):
            crowd += 1
        else:
            by_image[a["image_id"]].append(a)
    images = []
    for img in doc["images"]:
        h, w = int(img["height"]), int(img["width"])
        images.append({"file_name": img["file_name"], "height": h, "width": w,
                       "objects": [coco_rle(a["segmentation"], h, w) for a in by_image.get(img["id"], [])]})
    if not images:
        raise EvaluationError(f"{path} lists no images.")
    return images, crowd


def load_predictions(path: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Predicted images by source URI: {uri: {status, reason, height, width, masks: [RLE]}} from
    our tables (a folder) or a COCO JSON (``source_uri`` or ``file_name`` of each image)."""
    if path.endswith(".json"):
        gt, _ = load_ground_truth(path, storage_options)
        with open_uri(path, "r", storage_options) as f:
            uris = [img.get("source_uri", img["file_name"]) for img in json.load(f)["images"]]
        return {uri: {"status": "ok", "reason": None, "height": g["height"], "width": g["width"],
                      "masks": g["objects"]} for uri, g in zip(uris, gt)}
    tables = OutputDir.of_run(path, storage_options)  # a folder without completed shards is an error
    preds, _ = predicted_images(tables)
    attach_masks(tables, preds, list(preds))
    return preds


def predicted_images(tables: OutputDir, names: Optional[Set[str]] = None) -> Tuple[Dict[str, Dict[str, Any]], int]:
    """(:func:`load_predictions` of tables without the masks (``masks: []``; see
    :func:`attach_masks`), the number of predicted images), from the images tables only. With
    ``names`` (file names), only images whose URI ends with one of them are kept: memory for the
    images a ground truth names, not for every image of the output."""
    out: Dict[str, Dict[str, Any]] = {}
    total = 0
    columns = ["image_id", "uri", "shard", "status", "error_reason", "height", "width"]
    for _, images in tables.each_shard(lambda s: tables.read_shard("images", s, columns).to_pylist()):
        total += len(images)
        for img in images:
            if names is None or posixpath.basename(img["uri"]) in names:
                out[img["uri"]] = {"status": img["status"], "reason": img["error_reason"], "height": img["height"],
                                   "width": img["width"], "masks": [], "image_id": img["image_id"],
                                   "shard": img["shard"]}
    return out, total


def attach_masks(tables: OutputDir, preds: Mapping[str, Dict[str, Any]], uris: Sequence[str]) -> None:
    """Fill in the masks of the ok images ``uris`` of ``preds`` (:func:`predicted_images`), reading
    the masks tables of their shards only: an output of millions of images is not read whole to
    score the images a ground truth covers."""
    by_id = {preds[u]["image_id"]: preds[u] for u in uris if preds[u]["status"] == "ok"}
    for image_id, rows in tables.masks_of(list(by_id), ["height", "width", "counts"]).items():
        by_id[image_id]["masks"] = [{"size": [r["height"], r["width"]], "counts": r["counts"].encode()} for r in rows]


def match_image(gt: Sequence[Dict[str, Any]], pred: Sequence[Dict[str, Any]]) -> Tuple[np.ndarray, int]:
    """Greedy one-to-one matching by IoU: the matched IoU of each ground-truth object (0 if none)
    and the number of predicted masks matched with IoU >= 0.5."""
    matched = np.zeros(len(gt))
    if not gt or not pred:
        return matched, 0
    iou = np.asarray(mask_utils.iou(list(pred), list(gt), [0] * len(gt)))  # (P, G)
    pairs = sorted(((iou[p, g], p, g) for p, g in zip(*np.nonzero(iou > 0))), reverse=True)
    used_p, used_g, good = set(), set(), 0
    for value, p, g in pairs:
        if p in used_p or g in used_g:
            continue
        used_p.add(p)
        used_g.add(g)
        matched[g] = value
        good += value >= 0.5
    return matched, good


def _find(file_name: str, predictions: Mapping[str, Dict[str, Any]], by_base: Mapping[str, List[str]]) -> Optional[str]:
    candidates = [u for u in by_base.get(posixpath.basename(file_name), [])
                  if u == file_name or u.endswith("/" + file_name.lstrip("/"))]
    if len(candidates) > 1:
        raise EvaluationError(f"Ground-truth image {file_name!r} matches several predicted images: {candidates}.")
    return candidates[0] if candidates else None


def evaluate(ground_truth: str, predictions: str, storage_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The report described in the module docstring, as a JSON-ready dict."""
    gt_images, crowd = load_ground_truth(ground_truth, storage_options)
    tables = None if predictions.endswith(".json") else OutputDir.of_run(predictions, storage_options)
    if tables is None:
        preds = load_predictions(predictions, storage_options)
        total = len(preds)
    else:  # only the images whose file names the ground truth has (then matched by their whole path)
        preds, total = predicted_images(tables, {posixpath.basename(img["file_name"]) for img in gt_images})
    by_base: Dict[str, List[str]] = defaultdict(list)
    for uri in preds:
        by_base[posixpath.basename(uri)].append(uri)
    found = [_find(img["file_name"], preds, by_base) for img in gt_images]
    if tables is not None:  # the masks of the images the ground truth covers, and only theirs
        attach_masks(tables, preds, [u for u in found if u])
    ious, areas, missing = [], [], []
    n_pred = n_pred_good = 0
    used = set()
    for img, uri in zip(gt_images, found):
        p = preds.get(uri) if uri else None
        if p is not None and p["status"] == "ok" and (p["height"], p["width"]) != (img["height"], img["width"]):
            raise EvaluationError(f"{img['file_name']}: ground truth is {img['width']}x{img['height']}, "
                                  f"the prediction {p['width']}x{p['height']} (a run with --resize-short-side "
                                  "makes masks of the downsampled image; evaluate one made without it).")
        if p is None or p["status"] != "ok":
            missing.append({"file_name": img["file_name"],
                            "reason": "no prediction" if p is None else f"error: {p['reason']}"})
            masks = []
        else:
            used.add(uri)
            masks = p["masks"]
        matched, good = match_image(img["objects"], masks)
        ious.extend(matched)
        if img["objects"]:
            areas.extend(float(a) for a in mask_utils.area(img["objects"]))
        n_pred += len(masks)
        n_pred_good += good
    ious_a, areas_a = np.asarray(ious), np.asarray(areas)
    report = {"ground_truth": ground_truth, "predictions": predictions, "images": len(gt_images),
              "images_without_prediction": missing, "predicted_images_not_in_ground_truth": total - len(used) - sum(
                  1 for m in missing if m["reason"] != "no prediction"),
              "crowd_annotations_ignored": crowd, "predicted_masks": n_pred,
              "precision@0.5": n_pred_good / n_pred if n_pred else None,
              **_summary(ious_a), "by_size": {}}
    for name, lo, hi in SIZES:
        report["by_size"][name] = _summary(ious_a[(areas_a >= lo) & (areas_a < hi)])
    return report


def _summary(ious: np.ndarray) -> Dict[str, Any]:
    out: Dict[str, Any] = {"objects": int(len(ious)), "miou": float(ious.mean()) if len(ious) else None}
    for t in THRESHOLDS:
        out[f"recall@{t}"] = float((ious >= t).mean()) if len(ious) else None
    return out


def format_report(r: Dict[str, Any]) -> str:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [f"images: {r['images']} ({len(r['images_without_prediction'])} without prediction), "
             f"objects: {r['objects']}, predicted masks: {r['predicted_masks']}",
             f"{'':8} {'objects':>8} {'mIoU':>7} {'R@0.5':>7} {'R@0.8':>7}"]
    for name, s in [("all", r)] + list(r["by_size"].items()):
        lines.append(f"{name:8} {s['objects']:>8} {pct(s['miou']):>7} {pct(s['recall@0.5']):>7} {pct(s['recall@0.8']):>7}")
    lines.append(f"precision@0.5 (predicted masks matching an object): {pct(r['precision@0.5'])}")
    for m in r["images_without_prediction"][:20]:
        lines.append(f"  missing {m['file_name']}: {m['reason']}")
    if len(r["images_without_prediction"]) > 20:
        lines.append(f"  ... and {len(r['images_without_prediction']) - 20} more")
    if r["crowd_annotations_ignored"]:
        lines.append(f"crowd annotations ignored: {r['crowd_annotations_ignored']}")
    return "\n".join(lines)
